"""Evaluation of a trained GenRep network on a held-out set.

* the head: top-1, NLL, ECE (15 bins);
* the generative posterior classifier ``argmax_y p(y|x)`` of a freshly built chain bank: top-1,
  NLL, ECE;
* class-conditional samples (a grid PNG) and the head's accuracy on them (does the head recognise
  what the generator was asked to draw?);
* a reliability diagram of both classifiers (PNG);
* with the training set (``train_set``; ``eval.independent``), the independent evaluation:
  a discriminative baseline ``SmallCNN`` trained on the same images and budget
  (``cnn_baseline_top1``); the samples judged by that CNN, which never saw a generated image
  (``samples_classifier_top1``, and ``samples_fd``: the Frechet distance between its pooled
  features of the samples and of the held-out images); a linear probe of x_sem
  (``xsem_probe_top1``, beside ``pixel_probe_top1``, the same probe on the raw pixels); the
  teacher's bandwidth and validation NLL; top-1 of the GenRep head, its posterior, a CE-only head
  on the same frozen features (``ce_head_top1``) and the CNN under Gaussian pixel noise
  (``noise_robustness``) and diffusion noise (``diffusion_noise_robustness``), robustness.png.
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
    train_set=None,
    history: list[dict] | None = None,
    cache: dict | None = None,
) -> dict:
    """All metrics of the module docstring; writes reliability.png and samples.png to out_dir
    (and robustness.png with ``train_set``). ``history``: the trainer's log records, read for
    the teacher's bandwidth and validation NLL when it logged them. ``cache``: see
    ``independent_evaluation``.

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

    xs = ys = None
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
    # (pixel models only for now: with model.vae the held-out set here is latents while the
    # baselines and the sample judge work on images)
    if train_set is not None and e.independent and latent_space is None:
        t0 = time.perf_counter()
        res.update(
            independent_evaluation(
                net, cfg, train_set, x, y, bank, out_dir, xs, ys, backend, history or [], cache
            )
        )
        timing["eval_independent"] = time.perf_counter() - t0
    res["eval_timing"] = timing
    return res


CHANCE_KEYS = (
    "head_top1",
    "posterior_top1",
    "gen_head_accuracy",
    "cnn_baseline_top1",
    "ce_head_top1",
    "samples_classifier_top1",
    "xsem_probe_top1",
    "pixel_probe_top1",
)


def independent_evaluation(
    net: GenRepNet,
    cfg: TrainConfig,
    train_set,
    x: torch.Tensor,
    y: torch.Tensor,
    bank,
    out_dir: Path,
    samples: torch.Tensor | None,
    sample_labels: torch.Tensor | None,
    backend: str,
    history: list[dict],
    cache: dict | None = None,
) -> dict:
    """The independent half of ``evaluate`` (module docstring) on held-out ``(x, y)``.
    ``cache``: a dict shared by runs with the same training set and seed (the baseline CNN is
    trained once for them)."""
    from genrep_fast.train.baselines import (
        backbone_features,
        cnn_outputs,
        linear_probe_top1,
        train_ce_head,
        train_cnn,
    )

    e, d = cfg.eval, cfg.diffusion
    device = x.device
    xt, yt = dataset_tensors(train_set)
    xt, yt = xt.to(device), yt.to(device)
    yc = y.cpu()
    res: dict = {"chance_top1": 1.0 / net.num_classes}

    steps = e.cnn_steps or (cfg.stage1.steps + cfg.stage2.steps)
    # the CNN depends on the training set, the seed, the steps and the batch size only: runs that
    # share them (the ablation's rows of one seed) pass one ``cache`` and train it once
    cnn_key = ("cnn", cfg.seed, max(1, steps), cfg.data.batch_size, xt.shape, net.num_classes)
    cnn = None if cache is None else cache.get(cnn_key)
    if cnn is None:
        cnn = train_cnn(
            xt,
            yt,
            net.num_classes,
            steps=max(1, steps),
            batch_size=cfg.data.batch_size,
            seed=cfg.seed,
        )
        if cache is not None:
            cache[cnn_key] = cnn
    ce_head = train_ce_head(
        net,
        backbone_features(net, xt),
        yt,
        steps=max(1, cfg.stage1.steps),
        batch_size=cfg.data.batch_size,
        lr=cfg.stage1.lr,
        seed=cfg.seed,
        head_kwargs=cfg.model.head_kwargs,
    )
    p_cnn, f_real = cnn_outputs(cnn, x)
    res.update(
        cnn_baseline_steps=max(1, steps),
        cnn_baseline_top1=metrics.top1(p_cnn, yc),
        ece_cnn_baseline=metrics.ece(p_cnn, yc, e.ece_bins),
    )
    if samples is not None:
        p_s, f_s = cnn_outputs(cnn, samples)
        res["samples_classifier_top1"] = metrics.top1(p_s, sample_labels.cpu())
        res["samples_fd"] = metrics.frechet_distance(f_s, f_real)
        # the same distance for as many real training images as there are samples: what a
        # generator drawing real digits would score at this sample size (FD is biased by size)
        g_sub = torch.Generator().manual_seed(cfg.seed + 17)
        sub = torch.randperm(xt.shape[0], generator=g_sub)[: samples.shape[0]].to(device)
        res["train_vs_heldout_fd"] = metrics.frechet_distance(cnn_outputs(cnn, xt[sub])[1], f_real)

    with torch.no_grad():
        from genrep_fast.models import eval_mode

        with eval_mode(net):
            sem_train = torch.cat(
                [net.perceive(xt[i : i + 256])[1] for i in range(0, len(xt), 256)]
            )
            sem_test = torch.cat([net.perceive(x[i : i + 256])[1] for i in range(0, len(x), 256)])
    res["xsem_probe_top1"] = linear_probe_top1(sem_train.float(), yt, sem_test.float(), y)
    res["pixel_probe_top1"] = linear_probe_top1(xt, yt, x, y)

    res.update(teacher_bandwidth_and_nll(cfg, bank, history, train_set, backend))

    def top1s(images: torch.Tensor) -> dict:
        from genrep_fast.models import eval_mode

        feats = backbone_features(net, images)
        with torch.no_grad(), eval_mode(net):
            p_ce = ce_head(feats)[0].float().softmax(-1).cpu()
            p_head = net.head(feats)[0].float().softmax(-1).cpu()
        return {
            "head_top1": metrics.top1(p_head, yc),
            "ce_head_top1": metrics.top1(p_ce, yc),
            "posterior_top1": metrics.top1(
                posterior_probabilities(bank, images, d.precision, backend), yc
            ),
            "cnn_baseline_top1": metrics.top1(cnn_outputs(cnn, images)[0], yc),
        }

    g = torch.Generator(device).manual_seed(cfg.seed + 4242)
    noise = torch.randn(x.shape, generator=g, device=device)
    chance = 1.0 / net.num_classes
    # unclipped: the noisy image leaves [-1, 1], as the diffusion model's own inputs do
    res["noise_robustness"] = [
        {"sigma": float(s), **top1s(x + float(s) * noise), "chance": chance} for s in e.noise_sigmas
    ]
    clean = [r for r in res["noise_robustness"] if r["sigma"] == 0.0]
    res["ce_head_top1"] = clean[0]["ce_head_top1"] if clean else top1s(x)["ce_head_top1"]
    sched = net.scheduler
    res["diffusion_noise_robustness"] = [
        {
            "t": int(t),
            **top1s(sched.add_noise(x, noise, torch.full((x.shape[0],), int(t), device=device))),
            "chance": chance,
        }
        for t in e.noise_timesteps
    ]
    metrics.robustness_plot(
        res["noise_robustness"], res["diffusion_noise_robustness"], out_dir / "robustness.png"
    )
    return res


def teacher_bandwidth_and_nll(cfg: TrainConfig, bank, history: list[dict], train_set, backend):
    """``teacher_bandwidth`` and ``teacher_val_nll``: the last values the trainer logged under
    those keys (``diffusion.sigma_min: auto`` chooses and logs them), else the configured
    ``sigma_min`` and the NLL (nats) of the bank posterior on a fixed subset of the training
    images (the trainer has no validation split then; ``teacher_val_split`` says which)."""
    logged = [r for r in history if "teacher_bandwidth" in r and "teacher_val_nll" in r]
    if logged:
        r = logged[-1]
        return {
            "teacher_bandwidth": float(r["teacher_bandwidth"]),
            "teacher_val_nll": float(r["teacher_val_nll"]),
            "teacher_val_split": "validation (logged by the trainer)",
        }
    from genrep_fast.train.diagnostics import probe_subset

    xv, yv = probe_subset(train_set, seed=cfg.seed)
    p = posterior_probabilities(bank, xv.to(bank.mu.device), cfg.diffusion.precision, backend)
    return {
        "teacher_bandwidth": float(bank.sigma_min) if bank.sigma_min is not None else None,
        "teacher_val_nll": metrics.nll(p, yv.cpu()),
        "teacher_val_split": f"{xv.shape[0]} training images (no validation split)",
    }
