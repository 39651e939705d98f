"""Shared tiny configuration of the trainer tests (seconds per run on a 2-core CPU)."""

from __future__ import annotations

TINY = [
    "model.factory_kwargs={block_out_channels: [8, 16]}",
    "model.head_kwargs={hidden: 16}",
    "diffusion.num_steps=10",
    "diffusion.burn_in=2",
    "diffusion.thin=2",
    "diffusion.chains_per_class=1",
    "diffusion.bank_refresh_every=2",
    # a fixed bandwidth: these runs are too short to choose one (tests/test_train_wiring.py and
    # the auto case of the resume test cover diffusion.sigma_min: auto), and the training set
    # stays whole
    "diffusion.sigma_min=0.7",
    "data.batch_size=16",
    "stage0.steps=3",
    "stage0.warmup_steps=0",
    "stage1.steps=3",
    "stage2.steps=3",
    "runtime.progress=false",
    "runtime.log_every=1",
    "runtime.threads=1",
    "eval.samples_per_class=2",
    "eval.max_test_images=40",
]


def tiny_config(tmp_path, *extra: str):
    from genrep_fast.train.config import load_config

    return load_config("tiny_digits", TINY + [f"out_dir={tmp_path}", *extra])
