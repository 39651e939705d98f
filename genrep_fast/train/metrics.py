"""Classification metrics and pictures: top-1, NLL, ECE with a reliability diagram, sample grids.

All functions take plain tensors (probabilities ``[N, C]``, labels ``[N]``) so they serve the head
and the generative posterior classifier alike.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def top1(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the label."""
    return float((probs.argmax(-1) == labels).float().mean())


def nll(probs: torch.Tensor, labels: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-probability of the true class, in nats (probabilities floored at eps)."""
    p = probs.double().gather(1, labels[:, None]).squeeze(1)
    return float(-(p.clamp_min(eps)).log().mean())


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """Equal-width confidence bins on [0, 1]: count, mean confidence and accuracy per bin."""
    conf, pred = probs.double().max(-1)
    correct = (pred == labels).double()
    # bin b holds confidences in (b/bins, (b+1)/bins]; confidence 0 goes to bin 0.
    idx = (conf * bins).ceil().long().clamp(1, bins) - 1
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, conf)
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx, correct)
    safe = count.clamp_min(1)
    return {"count": count, "confidence": conf_sum / safe, "accuracy": acc_sum / safe}


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error: sum_b (n_b / N) |acc_b - conf_b| over equal-width bins.

    Kept here rather than torchmetrics' ``MulticlassCalibrationError(norm="l1")``, which gives the
    same value (tests/test_train_metrics.py checks to 1e-6 where torchmetrics is installed):
    torchmetrics is not a dependency, and ``calibration_bins`` also feeds the reliability diagram.
    """
    b = calibration_bins(probs, labels, bins)
    n = b["count"].sum()
    return float((b["count"] / n * (b["accuracy"] - b["confidence"]).abs()).sum())


def reliability_diagram(
    curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path, bins: int = 15
) -> Path:
    """One panel per classifier: accuracy per confidence bin against the diagonal, ECE in title.

    ``curves``: name -> (probs [N, C], labels [N]).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 4.2), squeeze=False)
    edges = torch.linspace(0, 1, bins + 1)
    width = 1.0 / bins
    for ax, (name, (probs, labels)) in zip(axes[0], curves.items()):
        b = calibration_bins(probs, labels, bins)
        filled = b["count"] > 0
        centers = (edges[:-1] + width / 2)[filled]
        ax.bar(
            centers,
            b["accuracy"][filled],
            width=width * 0.95,
            color="tab:blue",
            edgecolor="black",
            lw=0.5,
            label="accuracy",
        )
        ax.bar(
            centers,
            (b["confidence"] - b["accuracy"])[filled],
            bottom=b["accuracy"][filled],
            width=width * 0.95,
            color="tab:red",
            alpha=0.35,
            label="gap to confidence",
        )
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(
            f"{name}: top-1 {top1(probs, labels):.3f}, ECE {ece(probs, labels, bins):.3f}",
            fontsize=9,
        )
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def image_grid(
    images: torch.Tensor,
    nrow: int,
    path: str | Path,
    scale: int = 8,
    row_labels: list[str] | None = None,
) -> Path:
    """Save ``images [N, C, H, W]`` in [-1, 1] as a grid PNG with ``nrow`` images per row,
    each pixel enlarged ``scale`` times (nearest), 1 or 3 channels (other counts: the first),
    on white with a ``scale``-pixel gap; ``row_labels`` are written in a white strip on the left.

    The tiles are laid out by diffusers' ``make_image_grid`` (a PIL grid); torchvision's
    ``make_grid`` would serve as well but torchvision is not a dependency of the package.
    """
    from diffusers.utils import make_image_grid
    from PIL import Image, ImageDraw, ImageOps

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, c, h, w = x.shape
    if c not in (1, 3):
        x = x[:, :1]
        c = 1
    mode = "L" if c == 1 else "RGB"
    rows = math.ceil(n / nrow)
    gap = scale  # one source pixel between tiles and around the grid
    tiles = []
    for i in range(rows * nrow):  # make_image_grid wants rows * cols tiles: white ones pad
        if i < n:
            arr = x[i].permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr[..., 0] if c == 1 else arr, mode=mode)
            tile = tile.resize((w * scale, h * scale), Image.NEAREST)
        else:
            tile = Image.new(mode, (w * scale, h * scale), "white")
        # gap on the left and top of every tile; the right and bottom edge are added below
        tiles.append(ImageOps.expand(tile, border=(gap, gap, 0, 0), fill="white"))
    im = make_image_grid(tiles, rows, nrow)  # (always RGB)
    im = ImageOps.expand(im, border=(0, 0, gap, gap), fill="white").convert(mode)
    if row_labels:
        probe = ImageDraw.Draw(im)
        label_w = 4 + max(math.ceil(probe.textlength(t)) for t in row_labels[:rows])
        # "white", not 255: for an RGB image 255 is (255, 0, 0), a red strip
        canvas = Image.new(mode, (im.width + label_w, im.height), "white")
        canvas.paste(im, (label_w, 0))
        draw = ImageDraw.Draw(canvas)
        for r, text in enumerate(row_labels[:rows]):
            draw.text((2, gap + r * (h * scale + gap) + h * scale / 2 - 5), text, fill="black")
        im = canvas
    path = Path(path)
    im.save(path)
    return path
