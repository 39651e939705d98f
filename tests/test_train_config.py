"""Config loading, overrides and validation errors that name the key."""

from __future__ import annotations

import re

import pytest

from genrep_fast.train.config import ConfigError, apply_overrides, bundled_configs, load_config


def test_bundled_configs_load_with_paper_settings():
    assert {"tiny_digits", "ldm8_imagenet256", "dit_xl2_imagenet256"} <= set(bundled_configs())
    for name, steps in (("ldm8_imagenet256", 200), ("dit_xl2_imagenet256", 250)):
        cfg = load_config(name)
        assert cfg.diffusion.num_steps == steps
        assert (cfg.diffusion.burn_in, cfg.diffusion.thin) == (50, 2)
        assert (cfg.align.k, cfg.align.w_p, cfg.align.w_g) == (2.0, 0.7, 0.3)
        assert cfg.ema_decay == 0.999


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(
        "tiny_digits",
        ["stage2.steps=7", "loss.gen_distil=false", "stage1.lr=3e-4", "stage1.betas=[0.5, 0.9]"],
    )
    assert cfg.stage2.steps == 7 and cfg.loss.gen_distil is False
    assert cfg.stage1.lr == pytest.approx(3e-4)
    assert cfg.stage1.betas == (0.5, 0.9)


@pytest.mark.parametrize(
    "override, key",
    [
        ("stage2.stepz=1", "stage2.stepz"),
        ("nonsense=1", "nonsense"),
        ("stage2.steps=abc", "stage2.steps"),
        ("stage2.steps=-1", "stage2.steps"),
        ("ema_decay=1.5", "ema_decay"),
        ("diffusion.burn_in=60", "diffusion.burn_in"),
        ("align.mode=sideways", "align.mode"),
        ("align.k=-1", "align.k"),
        ("runtime.ops=turbo", "runtime.ops"),
        ("loss.gen_distil=maybe", "loss.gen_distil"),
        ("data.kind=image_folder", "data.root"),
        ("stage1.betas=[0.9]", "stage1.betas"),
        ("stage0.lr=0", "stage0.lr"),
        ("loss.label_dropout=1", "loss.label_dropout"),
        ("diffusion.sigma_min=0", "diffusion.sigma_min"),
        ("diffusion.sigma_min=abc", "diffusion.sigma_min"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match="^" + re.escape(key) + ":"):
        load_config("tiny_digits", [override])


def test_malformed_override_and_missing_config():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config("tiny_digits", ["stage2.steps"])
    with pytest.raises(ConfigError, match="no bundled config"):
        load_config("does_not_exist")
    with pytest.raises(ConfigError, match="stage2.steps: is not a section"):
        apply_overrides({"stage2": {"steps": 3}}, ["stage2.steps.x=1"])
