"""Mechanism diagnostics the trainer logs to ``metrics.jsonl`` (read back by the demo's report).

* At each bank refresh: the teacher's (the bank posterior's) top-1 on a fixed subset of the
  training images and on validation images (``{"event": "bank_refresh", "teacher_top1_train":
  ..., "teacher_top1_val" | "teacher_top1_heldout": ...}``).
* In stage 2: the per-group cosine of the two task gradients and alpha, every step, from the
  ``[G, 3]`` sums the alignment computes anyway (kept on the device, read when the step is
  logged: ``align_cos`` / ``align_alpha``, one list of G values per step since the last log).
"""

from __future__ import annotations

import torch

# images per split the teacher is scored on at each refresh (a posterior over 256 images of the
# tiny_digits bank takes ~5 ms on one core)
TEACHER_PROBE_IMAGES = 256


def probe_subset(dataset, limit: int = TEACHER_PROBE_IMAGES, seed: int = 0):
    """``(x, y)``: at most ``limit`` images of ``dataset``, a fixed random subset."""
    n = len(dataset)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
    if hasattr(dataset, "images"):
        return dataset.images[idx], dataset.labels[idx]
    xs, ys = zip(*(dataset[int(i)] for i in idx))
    return torch.stack(xs), torch.as_tensor(ys)


@torch.no_grad()
def teacher_top1(bank, x: torch.Tensor, y: torch.Tensor, precision: str, backend: str) -> float:
    """Top-1 of the bank's class posterior on ``(x, y)``."""
    from genrep_fast.train.evaluation import posterior_probabilities

    p = posterior_probabilities(bank, x.to(bank.mu.device), precision, backend)
    return float((p.argmax(-1) == y.cpu()).double().mean())


def cosine_and_alpha(sums: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, alpha)`` per group from the alignment's sums ``[..., G, 3] = (<p,g>, |p|^2,
    |g|^2)``: the same formulas as ``reference.alignment_coefficients`` (cos 0 for a zero
    gradient), ``alpha = ((cos + 1) / 2) ** k``."""
    d, pp, gg = sums.double().unbind(-1)
    norm = pp.sqrt() * gg.sqrt()
    cos = torch.where(norm > 0, d / torch.where(norm > 0, norm, 1.0), torch.zeros_like(d))
    cos = cos.clamp(-1.0, 1.0)
    return cos, ((cos + 1.0) * 0.5) ** k


def alignment_record(kept: list[torch.Tensor], k: float) -> dict:
    """The ``align_cos`` / ``align_alpha`` entries of a log record from the sums kept per step."""
    cos, alpha = cosine_and_alpha(torch.stack(kept), k)
    return {
        "align_cos": [[round(v, 5) for v in row] for row in cos.tolist()],
        "align_alpha": [[round(v, 5) for v in row] for row in alpha.tolist()],
    }


def read_records(path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (an absent file: none)."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
