"""End to end: one stage-2 training step (both losses, two backward passes, alignment per
attention block, AdamW, EMA) with the package's fast ops vs the eager reference ops, same run.

Smoke (default): a tiny UNet on 8x8 digits. ``--benchmark``: on CUDA an ImageNet-like step
(4x32x32 latents, C=1000, 75 bank samples per class, posterior over 20 candidate classes, bf16
autocast); on CPU the tiny_digits demo's own step (batch 64). The chain bank is filled with random
Gaussians instead of being sampled: the bank's contents do not change the step's cost, and
sampling a 1000-class bank would dominate the benchmark's run time.
"""

from __future__ import annotations

import pytest
import torch

from genrep_fast.benchmarking import time_fn
from genrep_fast.train.config import load_config
from genrep_fast.train.data import Batches
from genrep_fast.train.trainer import Trainer

SMOKE = [
    "model.factory_kwargs={block_out_channels: [8, 16]}",
    "model.head_kwargs={hidden: 16}",
    "data.batch_size=16",
    "diffusion.num_steps=10",
    "diffusion.burn_in=2",
]
CUDA_REALISTIC = [
    "data.kind=latents",  # replaced by synthetic tensors below
    "data.root=unused",
    "model.sample_size=32",
    "model.in_channels=4",
    "model.num_classes=1000",
    "model.factory_kwargs={block_out_channels: [128, 256], layers_per_block: 2}",
    "diffusion.num_steps=200",
    "diffusion.burn_in=50",
    "diffusion.candidate_classes=20",
    "data.batch_size=32",
]


class _Synthetic:
    def __init__(self, shape, num_classes, device):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn((256, *shape), generator=g).clamp(-1, 1)
        self.y = torch.randint(0, num_classes, (256,), generator=g)

    def __len__(self):
        return 256

    def batch(self, idx):
        return self.x[idx], self.y[idx]


def _trainer(overrides, ops, tmp_path, device):
    from genrep_fast.models import ChainBank
    from genrep_fast.train import trainer as trainer_mod

    cfg = load_config(
        "tiny_digits",
        overrides
        + [
            f"runtime.ops={ops}",
            "runtime.progress=false",
            f"runtime.device={device}",
            f"out_dir={tmp_path / ops}",
        ],
    )
    if cfg.data.kind != "digits":  # synthetic latents: no files needed
        shape = (cfg.model.in_channels, cfg.model.sample_size, cfg.model.sample_size)
        data = _Synthetic(shape, cfg.model.num_classes, device)
        orig = trainer_mod.build_datasets
        trainer_mod.build_datasets = lambda *a, **k: (data, None)
        try:
            tr = Trainer(cfg)
        finally:
            trainer_mod.build_datasets = orig
    else:
        tr = Trainer(cfg)
    tr._enter_stage(1)
    tr._enter_stage(2)
    d = cfg.diffusion
    steps = len(range(d.burn_in, d.num_steps, d.thin)) * d.chains_per_class
    lat = tr.net.adapter.latent_shape
    g = torch.Generator().manual_seed(1)
    mu = torch.randn((tr.net.num_classes, steps, *lat), generator=g).to(tr.device)
    sigma = (0.05 + torch.rand((tr.net.num_classes, steps), generator=g)).to(tr.device)
    tr.bank = ChainBank(
        mu,
        sigma,
        torch.zeros(len(range(d.burn_in, d.num_steps, d.thin)), dtype=torch.int64),
        num_steps=d.num_steps,
        burn_in=d.burn_in,
        thin=d.thin,
        chains_per_class=d.chains_per_class,
        sigma_min=0.01,
    )
    batches = Batches(tr.train_set, cfg.data.batch_size, 0)
    return tr, batches


def test_stage2_step(realistic, bench_device, results, tmp_path):
    if realistic and bench_device == "cuda":
        overrides, case = CUDA_REALISTIC, "imagenet-like 4x32x32 C=1000 B=32"
    elif realistic:
        overrides, case = [], "tiny_digits B=64"
    else:
        overrides, case = SMOKE, "smoke B=16"
    timings = {}
    for ops in ("reference", "fast"):
        tr, batches = _trainer(overrides, ops, tmp_path, bench_device)
        tr.timer.seconds.clear()

        def step(tr=tr, batches=batches):
            tr.train_step(2, batches, 1)

        timings[f"{ops} ops"] = time_fn(
            step,
            device=bench_device,
            warmup=2,
            min_reps=3 if realistic else 2,
            min_time_s=1.0 if realistic else 0.0,
        )
        assert all(torch.isfinite(p).all() for p in tr.net.parameters())
        breakdown = {k: round(v, 4) for k, v in sorted(tr.timer.seconds.items())}
        print(
            f"{ops}: {timings[f'{ops} ops'] * 1e3:.1f} ms/step; sections (s, all reps): {breakdown}"
        )
    results.add(
        "train", f"stage-2 step, {case}", timings, baseline="reference ops", params={"case": case}
    )
    assert timings["fast ops"] > 0


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-s"]))
