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


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``a [N, D]``, ``b [M, D]``:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` in float64, the matrix
    square roots by symmetric eigendecomposition (eigenvalues clamped at 0), so no complex
    round-off as with a general ``sqrtm(S_a S_b)``."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a and b must be [N, D] and [M, D] feature matrices, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"need at least 2 rows per set, got {a.shape[0]} and {b.shape[0]}")
    a, b = a.double().cpu(), b.double().cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)

    def psd_sqrt(m):
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp_min(0).sqrt()) @ v.T

    r = psd_sqrt(s_a)
    cross = torch.linalg.eigvalsh(r @ s_b @ r).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross)


def reliability_diagram(
    curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path, bins: int = 15
) -> Path:
    """One panel per classifier: accuracy per confidence bin against the diagonal, the number of
    images in each bin above its bar, ECE in the title.

    ``curves``: name -> (probs [N, C], labels [N]).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    acc_colour, gap_colour, gap_alpha = "tab:blue", "tab:red", 0.35
    # where accuracy exceeds confidence the translucent gap bar lies over the accuracy bar
    overlap = tuple(
        gap_alpha * r + (1 - gap_alpha) * b for r, b in zip(to_rgb(gap_colour), to_rgb(acc_colour))
    )
    fig, axes = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 4.6), squeeze=False)
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
            color=acc_colour,
            edgecolor="black",
            lw=0.5,
        )
        ax.bar(
            centers,
            (b["confidence"] - b["accuracy"])[filled],
            bottom=b["accuracy"][filled],
            width=width * 0.95,
            color=gap_colour,
            alpha=gap_alpha,
        )
        for x, top, n in zip(
            centers.tolist(),
            torch.maximum(b["accuracy"], b["confidence"])[filled].tolist(),
            b["count"][filled].long().tolist(),
        ):
            ax.text(x, min(top, 0.93) + 0.015, str(n), ha="center", va="bottom", fontsize=6)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("confidence (number above a bar: images in that bin)")
        ax.set_ylabel("accuracy")
        ax.set_title(
            f"{name}: top-1 {top1(probs, labels):.3f}, ECE {ece(probs, labels, bins):.3f}",
            fontsize=9,
        )
        ax.legend(
            handles=[
                Patch(facecolor=acc_colour, edgecolor="black", lw=0.5, label="accuracy"),
                Patch(facecolor=gap_colour, alpha=gap_alpha, label="over-confident gap"),
                Patch(facecolor=overlap, label="under-confident gap (overlap)"),
            ],
            loc="upper left",
            fontsize=7,
        )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def robustness_plot(pixel_rows: list[dict], diffusion_rows: list[dict], path: str | Path) -> Path:
    """Top-1 of every classifier column of the rows against Gaussian pixel noise sigma (left)
    and diffusion timestep t (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4), squeeze=False)
    for ax, rows, x_key, xlabel in (
        (axes[0][0], pixel_rows, "sigma", "Gaussian pixel noise sigma (images in [-1, 1])"),
        (axes[0][1], diffusion_rows, "t", "diffusion timestep t (x_t = q(x_t | x_0))"),
    ):
        if not rows:
            ax.set_visible(False)
            continue
        for key in [k for k in rows[0] if k.endswith("_top1")]:
            ax.plot([r[x_key] for r in rows], [r[key] for r in rows], "o-", label=key[:-5])
        ax.axhline(rows[0].get("chance", 0.0), color="grey", lw=0.8, ls=":", label="chance")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 on held-out images")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def loss_curves(records: list[dict], path: str | Path) -> Path | None:
    """One panel per stage with every loss part of the trainer's step records
    (``metrics.jsonl``) against the step; None when there is no step record."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = {"stage", "step", "time", "lr", "bad_steps"}
    stages = sorted({r["stage"] for r in records if "event" not in r and "step" in r})
    if not stages:
        return None
    fig, axes = plt.subplots(1, len(stages), figsize=(4.2 * len(stages), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        rows = [r for r in records if r.get("stage") == stage and "event" not in r]
        keys = [k for k in rows[-1] if k not in skip and isinstance(rows[-1][k], (int, float))]
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
        ax.set_yscale("log")
        ax.set_xlabel(f"stage {stage} step")
        ax.set_title(f"stage {stage} losses", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def alignment_histogram(cosines: list[float], alphas: list[float], path: str | Path) -> Path:
    """Histograms of the per-group gradient cosine and of alpha over stage 2's steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), squeeze=False)
    for ax, vals, name, rng in (
        (axes[0][0], cosines, "cos(p, g) per group and step", (-1, 1)),
        (axes[0][1], alphas, "alpha = ((cos + 1) / 2)^k", (0, 1)),
    ):
        ax.hist(vals, bins=40, range=rng, color="tab:blue")
        mean = sum(vals) / max(1, len(vals))
        ax.axvline(mean, color="black", lw=0.8, ls="--", label=f"mean {mean:.3f}")
        ax.set_xlabel(name)
        ax.set_ylabel(f"count (of {len(vals)})")
        ax.legend(fontsize=7)
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
