"""The Diffusion Classifier (``genrep_fast.diffusion_classifier``) in the trainer: as the KL
teacher (``loss.teacher: diffusion_classifier``) and as an evaluation baseline (``dc_*`` metrics).

Both score the backbone's class-conditional noise prediction (no semantic modulation) over the
classes ``[0, num_classes)`` of a ``GenRepNet`` (its null-class row is never a candidate).
"""

from __future__ import annotations

import time

import torch

from genrep_fast.diffusion_classifier import diffusion_classifier
from genrep_fast.train import metrics
from genrep_fast.train.config import TrainConfig

# Seeds of the teacher's trials: a pure function of (run seed, stage, step, micro-batch), so a
# resumed run draws the trials an uninterrupted one would, with no generator state to save.
_TEACHER_SEED_SALT = 0x5DC


def teacher_seed(seed: int, stage: int, step: int, micro_batch: int = 0) -> int:
    return (
        ((seed * 1_000_003 + _TEACHER_SEED_SALT) * 7 + stage) * 1_000_003 + step
    ) * 64 + micro_batch


def dc_teacher_log_probs(net, x0: torch.Tensor, cfg: TrainConfig, seed: int) -> torch.Tensor:
    """``[B, C]`` teacher logits ``-errors / loss.dc_temperature`` (``-inf`` for pruned classes),
    the ``log_likelihood`` argument of ``posterior_kl_loss``; no gradient."""
    lo = cfg.loss
    g = torch.Generator(device=x0.device).manual_seed(seed)
    res = diffusion_classifier(
        net.adapter,
        x0.detach(),
        num_trials=lo.dc_trials,
        prune=lo.dc_prune,
        num_classes=net.num_classes,
        temperature=lo.dc_temperature,
        generator=g,
        batch_size=lo.dc_batch_size,
    )
    return res.logits


def evaluate_diffusion_classifier(
    net, cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, seed: int = 4321
) -> dict:
    """The Diffusion Classifier on held-out ``x [N, *latent]`` / ``y [N]``: ``dc_top1``,
    ``dc_ece``, ``dc_nll``, ``dc_ms_per_image`` (wall time of the batched classifier over the
    set, per image), ``dc_trials``, ``dc_rows_per_image``; with a non-empty ``loss.dc_prune``
    also the pruned classifier of ``loss.dc_trials`` as ``dc_pruned_*``. Empty when
    ``eval.dc_trials`` is 0."""
    e, lo = cfg.eval, cfg.loss
    if not e.dc_trials:
        return {}
    runs = [("dc", e.dc_trials, ())]
    if lo.dc_prune:
        runs.append(("dc_pruned", lo.dc_trials, lo.dc_prune))
    out: dict = {}
    yc = y.cpu()
    for name, trials, prune in runs:
        g = torch.Generator(device=x.device).manual_seed(seed)
        t0 = time.perf_counter()
        res = diffusion_classifier(
            net.adapter,
            x,
            num_trials=trials,
            prune=prune,
            num_classes=net.num_classes,
            temperature=lo.dc_temperature,
            generator=g,
            batch_size=lo.dc_batch_size,
        )
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        seconds = time.perf_counter() - t0
        p = res.probs.float().cpu()
        out.update(
            {
                f"{name}_top1": metrics.top1(p, yc),
                f"{name}_ece": metrics.ece(p, yc, e.ece_bins),
                f"{name}_nll": metrics.nll(p, yc),
                f"{name}_ms_per_image": 1000.0 * seconds / max(1, x.shape[0]),
                f"{name}_trials": trials,
                f"{name}_rows_per_image": res.rows,
            }
        )
    return out
