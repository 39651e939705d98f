"""The evaluation's metrics and pictures: ECE against torchmetrics (where installed), sample grids."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from genrep_fast.train import metrics


def _probs(n: int, c: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 3
    labels = torch.randint(0, c, (n,), generator=g)
    return logits.softmax(-1), labels


@pytest.mark.parametrize("n,c,bins", [(1000, 10, 15), (257, 3, 10), (64, 2, 15)])
def test_ece_matches_torchmetrics(n, c, bins):
    tm = pytest.importorskip(
        "torchmetrics.classification",
        reason="torchmetrics is not installed (an optional cross-check, not a dependency)",
    )
    probs, labels = _probs(n, c, seed=n + c)
    theirs = tm.MulticlassCalibrationError(num_classes=c, n_bins=bins, norm="l1")(probs, labels)
    assert metrics.ece(probs, labels, bins) == pytest.approx(float(theirs), abs=1e-6)


def test_ece_of_a_calibrated_and_an_overconfident_classifier():
    # confidence 0.75 everywhere, right on 3 of 4: calibrated -> 0; right on 1 of 4 -> |0.25-0.75|
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert metrics.ece(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0)
    assert metrics.ece(probs, torch.tensor([0, 1, 1, 1])) == pytest.approx(0.5)
    # two bins, weighted by their counts: 3/4 * |1 - 0.95| + 1/4 * |0 - 0.55| = 0.175
    probs = torch.tensor([[0.95, 0.05]] * 3 + [[0.55, 0.45]])
    assert metrics.ece(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.175)


@pytest.mark.parametrize("c", [1, 3])
def test_image_grid_places_tiles_on_white(tmp_path, c):
    g = torch.Generator().manual_seed(c)
    n, nrow, h, w, scale = 5, 3, 4, 6, 2
    x = torch.rand(n, c, h, w, generator=g) * 2 - 1
    labels = ["cat", "dog"]
    path = metrics.image_grid(x, nrow, tmp_path / "g.png", scale=scale, row_labels=labels)
    im = Image.open(path)
    assert im.mode == ("L" if c == 1 else "RGB")
    white = 255 if c == 1 else (255, 255, 255)
    # the label strip's background is white (an RGB strip filled with 255 would be red)
    assert im.getpixel((0, 0)) == white and im.getpixel((0, im.height - 1)) == white
    tiles_w = (nrow * (w + 1) + 1) * scale
    label_w = im.width - tiles_w
    assert label_w > 0 and im.height == (2 * (h + 1) + 1) * scale
    u8 = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        for yy, xx in ((0, 0), (h - 1, w - 1), (h // 2, 1)):
            px = im.getpixel(
                (label_w + (1 + col * (w + 1) + xx) * scale, (1 + r * (h + 1) + yy) * scale)
            )
            want = u8[i, :, yy, xx].tolist()
            assert (list(px) if c == 3 else [px]) == want, (i, yy, xx)
    # the empty sixth place stays white
    assert im.getpixel((label_w + (1 + 2 * (w + 1)) * scale, (1 + (h + 1)) * scale)) == white
