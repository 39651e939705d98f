"""Backbone benchmarks: chain-bank refresh throughput (chains/s) and the t=0 features pass.

* ``bank_refresh``: ``ChainBank.refresh`` (DDPM chains with (mu, sigma) recorded at the thinned
  steps) against the plain diffusers loop (``DDPMScheduler.step`` over the same model calls, no
  recording): the difference is what the bank's transition math and bookkeeping cost.
* ``features``: ``BackboneAdapter.features`` (forward hooks on every attention block) against a
  plain forward pass of the same batch.

Smoke shapes by default (tiny models, a few steps); ``--benchmark``: a DiT-S/2-sized transformer
and an LDM-style UNet on 4x32x32 latents, 250 / 200 steps (meant for a GPU).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from genrep_fast.benchmarking import time_fn
from genrep_fast.models import ChainBank, make_adapter, tiny_dit, tiny_scheduler, tiny_unet2d


def _backbone(kind: str, realistic: bool, device: str):
    torch.manual_seed(0)
    if kind == "dit":
        if realistic:  # DiT-S/2 on 4x32x32 latents
            model = DiTTransformer2DModel(
                num_attention_heads=6,
                attention_head_dim=64,
                in_channels=4,
                out_channels=8,
                num_layers=12,
                sample_size=32,
                patch_size=2,
                num_embeds_ada_norm=1000,
            )
        else:
            model = tiny_dit()
        sched = tiny_scheduler(learned_variance=True)
    else:
        if realistic:  # LDM-style class-conditional UNet on 4x32x32 latents
            model = UNet2DModel(
                sample_size=32,
                in_channels=4,
                out_channels=4,
                block_out_channels=(128, 256, 256),
                layers_per_block=2,
                down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=32,
                num_class_embeds=1000,
            )
        else:
            model = tiny_unet2d(block_out_channels=(16, 32))
        sched = tiny_scheduler()
    return make_adapter(model.to(device).eval(), sched)


@pytest.mark.parametrize("kind", ["dit", "unet2d"])
def test_bank_refresh_throughput(kind, realistic, bench_device, results):
    ad = _backbone(kind, realistic, bench_device)
    if realistic and bench_device == "cuda":
        classes, steps, burn, batch = (16, 250, 50, 16) if kind == "dit" else (16, 200, 50, 16)
    elif realistic:
        # The realistic models on a CPU: a full 200-step chain of 16 classes would take an hour
        # (one DiT-S/2 step at batch 16 is ~0.3 TFLOP), so fewer steps and chains, same model.
        classes, steps, burn, batch = 4, 20, 4, 4
    else:
        classes, steps, burn, batch = 4, 6, 2, 4
    bank = ChainBank.build(ad, classes, num_steps=steps, burn_in=burn, thin=2, batch_size=batch)
    assert torch.isfinite(bank.mu).all() and (bank.sigma > 0).all()

    y = torch.arange(batch, device=bench_device) % classes

    @torch.no_grad()
    def diffusers_loop():
        sched = DDPMScheduler.from_config(ad.scheduler.config)
        sched.set_timesteps(steps)
        x = randn_tensor((batch, *ad.latent_shape), device=torch.device(bench_device))
        for t in sched.timesteps:
            x = sched.step(ad.predict(x, int(t), y), t, x).prev_sample
        return x

    # the bank runs `classes` chains in ceil(classes / batch) batches; compare per chain
    reps = dict(warmup=1, min_reps=1, max_reps=3, min_time_s=0.0)
    t_bank = time_fn(lambda: bank.refresh(ad), device=bench_device, **reps)
    t_loop = time_fn(diffusers_loop, device=bench_device, **reps)
    per_chain = {"bank_refresh": t_bank / classes, "diffusers_step_loop": t_loop / batch}
    recs = results.add(
        "models",
        f"bank_refresh_{kind}",
        per_chain,
        baseline="diffusers_step_loop",
        params={
            "classes": classes,
            "num_steps": steps,
            "burn_in": burn,
            "thin": 2,
            "batch": batch,
            "latent": list(ad.latent_shape),
            "T": len(bank.steps),
            "chains_per_s": classes / t_bank,
        },
    )
    print(
        f"\n{kind}: bank refresh {classes / t_bank:.2f} chains/s; plain diffusers loop "
        f"{batch / t_loop:.2f} chains/s ({recs[0].speedup:.2f}x)"
    )


@pytest.mark.parametrize("kind", ["dit", "unet2d"])
def test_features_pass(kind, realistic, bench_device, results):
    ad = _backbone(kind, realistic, bench_device)
    b = (64 if bench_device == "cuda" else 8) if realistic else 8
    x = torch.randn(b, *ad.latent_shape, device=bench_device)
    y = torch.arange(b, device=bench_device) % ad.num_classes
    t0 = torch.zeros(b, dtype=torch.int64, device=bench_device)

    @torch.no_grad()
    def plain():
        return ad.model(x, t0, class_labels=y, return_dict=False)[0]

    @torch.no_grad()
    def feats():
        return ad.features(x, y)

    assert len(feats()) == len(ad.attention_block_names)
    timings = {
        "features": time_fn(feats, device=bench_device),
        "forward": time_fn(plain, device=bench_device),
    }
    results.add(
        "models",
        f"features_{kind}",
        timings,
        baseline="forward",
        params={
            "batch": b,
            "latent": list(ad.latent_shape),
            "blocks": len(ad.attention_block_names),
            "images_per_s": b / timings["features"],
        },
    )
    print(
        f"\n{kind}: features {b / timings['features']:.1f} img/s, forward {b / timings['forward']:.1f} img/s"
    )
