"""Evaluation of a trained GenRep network on a held-out set.

* the head: top-1, NLL, ECE (15 bins);
* the generative posterior classifier ``argmax_y p(y|x)`` of a freshly built chain bank: top-1,
  NLL, ECE;
* class-conditional samples (a grid PNG) and the head's accuracy on them (does the head recognise
  what the generator was asked to draw?);
* a reliability diagram of both classifiers (PNG).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from genrep_fast import PreparedBank, class_posterior, mixture_log_likelihood
from genrep_fast.train import metrics
from genrep_fast.train.config import TrainConfig
from genrep_fast.train.network import GenRepNet, build_chain_bank


@torch.no_grad()
def head_probabilities(net: GenRepNet, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``[N, C]`` softmax of the head over ``images [N, *latent]`` (eval mode, no grad)."""
    from genrep_fast.models import eval_mode

    out = []
    with eval_mode(net):
        for lo in range(0, images.shape[0], batch_size):
            logits, _ = net.perceive(images[lo : lo + batch_size])
            out.append(logits.float().softmax(-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def posterior_probabilities(
    bank,
    images: torch.Tensor,
    precision: str = "ieee",
    backend: str = "auto",
    batch_size: int = 256,
) -> torch.Tensor:
    """``[N, C]`` class posterior of the bank's mixture likelihood (uniform prior).

    ``bank``: a ``ChainBank`` (its snapshot, ``bank.prepared()``, serves every batch) or a
    ``genrep_fast.PreparedBank``."""
    prepared = bank if isinstance(bank, PreparedBank) else bank.prepared()
    out = []
    for lo in range(0, images.shape[0], batch_size):
        x = images[lo : lo + batch_size].to(prepared.dtype)
        ll = mixture_log_likelihood(x, prepared, precision=precision, backend=backend)
        out.append(class_posterior(ll).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def generate(
    net: GenRepNet,
    cfg: TrainConfig,
    per_class: int,
    seed: int = 1234,
    use_modulation: bool | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` samples of every class: ``(x [C*per_class, *latent], y [C*per_class])``."""
    from genrep_fast.models import DDPMSampler

    if use_modulation is None:
        use_modulation = cfg.loss.semantic
    steps = cfg.eval.sample_steps or cfg.diffusion.num_steps
    sampler = DDPMSampler(net.adapter, steps, net.modulation if use_modulation else None)
    device = net.adapter.device
    y = torch.arange(net.num_classes, device=device).repeat_interleave(per_class)
    g = torch.Generator(device).manual_seed(seed)
    x = sampler.sample(y, generator=g, progress=progress)
    return x, y


def dataset_tensors(dataset, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(dataset) if not limit else min(limit, len(dataset))
    if hasattr(dataset, "images"):
        return dataset.images[:n], dataset.labels[:n]
    xs, ys = zip(*(dataset[i] for i in range(n)))
    return torch.stack(xs), torch.as_tensor(ys)


def evaluate(
    net: GenRepNet,
    cfg: TrainConfig,
    test_set,
    out_dir: str | Path,
    *,
    backend: str = "auto",
    bank=None,
    progress: bool = False,
    latent_space=None,
) -> dict:
    """All metrics of the module docstring; writes reliability.png and samples.png to out_dir.

    With ``model.vae`` (``latent_space``: a ``LatentSpace``, loaded from ``cfg`` when None),
    held-out images are encoded to latents first and the sample grid is decoded to pixels."""
    from genrep_fast.train.latent_space import LatentSpace

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = net.adapter.device
    d, e = cfg.diffusion, cfg.eval
    if latent_space is None:
        latent_space = LatentSpace.from_config(cfg, device)
    x, y = dataset_tensors(test_set, e.max_test_images)
    x, y = x.to(device), y.to(device)
    if latent_space is not None and latent_space.encodes:
        x = latent_space.encode(x, batch_size=256)
    res: dict = {"test_images": int(x.shape[0])}
    timing: dict[str, float] = {}

    t0 = time.perf_counter()
    p_head = head_probabilities(net, x)
    timing["eval_head"] = time.perf_counter() - t0
    yc = y.cpu()
    res.update(
        head_top1=metrics.top1(p_head, yc),
        head_nll=metrics.nll(p_head, yc),
        ece_head=metrics.ece(p_head, yc, e.ece_bins),
    )

    t0 = time.perf_counter()
    if bank is None:
        g = torch.Generator(device).manual_seed(cfg.seed + 99)
        bank = build_chain_bank(net, cfg, g, modulated=cfg.loss.semantic, progress=progress)
    timing["eval_bank"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    p_post = posterior_probabilities(bank, x, d.precision, backend)
    timing["eval_posterior"] = time.perf_counter() - t0
    res.update(
        posterior_top1=metrics.top1(p_post, yc),
        posterior_nll=metrics.nll(p_post, yc),
        ece_posterior=metrics.ece(p_post, yc, e.ece_bins),
    )
    metrics.reliability_diagram(
        {"head": (p_head, yc), "generative posterior": (p_post, yc)},
        out_dir / "reliability.png",
        e.ece_bins,
    )

    # The Diffusion Classifier baseline (genrep_fast.train.dc): dc_top1, dc_ece, dc_ms_per_image
    from genrep_fast.train.dc import evaluate_diffusion_classifier

    res.update(evaluate_diffusion_classifier(net, cfg, x, y))

    if e.samples_per_class:
        t0 = time.perf_counter()
        xs, ys = generate(net, cfg, e.samples_per_class, seed=cfg.seed + 7, progress=progress)
        timing["eval_sampling"] = time.perf_counter() - t0
        p_gen = head_probabilities(net, xs)
        res["gen_head_accuracy"] = metrics.top1(p_gen, ys.cpu())
        if latent_space is not None:
            xs = latent_space.decode(xs)
        if xs.dim() == 4 and xs.shape[1] in (1, 3):
            names = list(net.class_names)
            metrics.image_grid(
                xs,
                e.samples_per_class,
                out_dir / "samples.png",
                scale=max(1, 64 // xs.shape[-1]),
                row_labels=names,
            )
    res["class_names"] = list(net.class_names)
    res["eval_timing"] = timing
    return res
