"""The command line's pre-flight checks: every common mistake stops before training with one line
naming the key or path (exit 2), no traceback, nothing written; --version, config show,
non-empty output folders (--resume / --overwrite)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_helpers import TINY

from genrep_fast.cli import main
from genrep_fast.train import preflight
from genrep_fast.train.config import ConfigError, TrainConfig, flatten, load_config

FAST = TINY + ["stage0.steps=1", "stage1.steps=0", "stage2.steps=0"]


def _sets(*overrides: str) -> list[str]:
    out = []
    for o in overrides:
        out += ["--set", o]
    return out


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "genrep_fast", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def _one_line_error(text: str, *needles: str) -> None:
    assert "Traceback" not in text, text
    lines = [x for x in text.splitlines() if x.startswith("genrep-fast:")]
    assert len(lines) == 1, text
    for n in needles:
        assert n in lines[0], lines[0]


def _main_exit(capsys, args: list[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``two/{cat,dog}`` (8 RGB 8x8 PNGs each), ``one/cat``, ``bad/`` (``two`` plus a truncated
    PNG and a file that only looks like one)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, classes, n in (("two", ("cat", "dog"), 8), ("one", ("cat",), 2)):
        for c in classes:
            (root / name / c).mkdir(parents=True)
            for i in range(n):
                px = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(px).save(root / name / c / f"{i}.png")
    import shutil

    shutil.copytree(root / "two", root / "bad")
    good = (root / "two" / "cat" / "0.png").read_bytes()
    (root / "bad" / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "bad" / "dog" / "not_an_image.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def _folder_args(out: Path, root: Path, *extra: str) -> list[str]:
    return ["train", "--out", str(out), "--no-eval"] + _sets(
        *FAST,
        "data.kind=image_folder",
        f"data.root={root}",
        "data.batch_size=4",
        "model.num_classes=2",
        *extra,
    )


# ------------------------------------------------------------------ subprocess: real CLI runs
# (a few: each pays the interpreter's imports; the rest call main() in this process)


def test_missing_data_root_one_line_exit_2(tmp_path):
    out = tmp_path / "run"
    proc = _cli(*_folder_args(out, tmp_path / "no_such_folder"))
    assert proc.returncode == 2
    _one_line_error(proc.stderr, "data.root:", "no_such_folder", "does not exist")
    assert not out.exists()  # bad input changes nothing


def test_missing_pretrained_folder_one_line_exit_2(tmp_path, capsys):
    code, err = _main_exit(
        capsys,
        ["train", "--out", str(tmp_path / "run")]
        + _sets(*FAST, f"model.pretrained={tmp_path}/unet"),
    )
    assert code == 2
    _one_line_error(err, "model.pretrained:", "unet", "is not a folder")
    assert "internet" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_on_cpu_torch_one_line_exit_2(tmp_path):
    proc = _cli("train", "--out", str(tmp_path / "run"), *_sets(*FAST, "runtime.device=cuda"))
    assert proc.returncode == 2
    _one_line_error(proc.stderr, "runtime.device:", "'cuda'", "runtime.device=cpu")
    assert not (tmp_path / "run").exists()


def test_sample_out_in_missing_folder_fails_before_sampling(tmp_path):
    # The checkpoint does not exist either: a checkpoint error would be exit 3, so exit 2 shows
    # the output is checked first, before any checkpoint is read or any sample drawn.
    proc = _cli(
        "sample", "--checkpoint", str(tmp_path / "run"), "--out", "nodir/x.png", cwd=tmp_path
    )
    assert proc.returncode == 2
    _one_line_error(proc.stderr, "sample --out:", "nodir", "does not exist")


def test_version_flag(capsys):
    from genrep_fast import __version__

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"genrep-fast {__version__}"


def test_tensorboard_without_the_package_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import importlib.util

    args = ["train", "--out", str(tmp_path / "run")] + _sets(*FAST, "runtime.tensorboard=true")
    if importlib.util.find_spec("tensorboard") is not None:  # installed: hide it from the check
        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: None if name == "tensorboard" else real(name, *a),
        )
    code, err = _main_exit(capsys, args)
    assert code == 2
    _one_line_error(err, "runtime.tensorboard:", "pip install tensorboard")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ in-process: data vs model


def test_corrupt_images_are_named_before_training(tmp_path, folders, capsys):
    code, err = _main_exit(capsys, _folder_args(tmp_path / "run", folders / "bad"))
    assert code == 2
    _one_line_error(err, "data.root:", "2 of 18 images", "truncated.png", "not_an_image.png")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("root", "extra", "needles"),
    [
        ("two", ["model.num_classes=10"], ["data.root:", "2 class sub-folders (cat, dog)", "10"]),
        ("one", ["model.num_classes=10"], ["data.root:", "1 class sub-folder", "at least 2"]),
        ("two", ["data.image_size=16"], ["model.sample_size:", "data.image_size is 16"]),
        ("two", ["data.grayscale=false"], ["model.in_channels:", "3-channel"]),
        ("two", ["data.batch_size=64"], ["data.batch_size:", "16 training examples"]),
        ("two", ["data.test_root={one}"], ["data.test_root:", "same class sub-folders"]),
    ],
    ids=["num_classes", "one_class", "image_size", "grayscale_channels", "batch_size", "test"],
)
def test_data_model_mismatch_one_line_exit_2(tmp_path, folders, capsys, root, extra, needles):
    extra = [e.format(one=folders / "one") for e in extra]
    code, err = _main_exit(capsys, _folder_args(tmp_path / "run", folders / root, *extra))
    assert code == 2
    _one_line_error(err, *needles)
    assert not (tmp_path / "run").exists()


def test_matching_folder_passes_the_checks(folders):
    cfg = load_config(
        "tiny_digits",
        FAST
        + [
            "data.kind=image_folder",
            f"data.root={folders / 'two'}",
            "model.num_classes=2",
            "data.batch_size=4",
        ],
    )
    preflight.check_run(cfg)  # raises nothing: the checks above fire on the mismatch only


def _save_unet(folder: Path, class_rows: int) -> Path:
    from genrep_fast.models import tiny_unet2d

    tiny_unet2d(num_classes=class_rows, block_out_channels=(8, 16)).save_pretrained(folder)
    return folder


def test_pretrained_unet_without_null_row_one_line_exit_2(tmp_path, capsys):
    unet = _save_unet(tmp_path / "unet10", 10)
    args = ["train", "--out", str(tmp_path / "run")] + _sets(*FAST, f"model.pretrained={unet}")
    code, err = _main_exit(capsys, args)
    assert code == 2
    _one_line_error(err, "model.pretrained:", "num_class_embeds=10", "11", "null class")
    # with the extra row the same config passes
    cfg = load_config("tiny_digits", FAST + [f"model.pretrained={_save_unet(tmp_path / 'u', 11)}"])
    preflight.check_pretrained(cfg)


def test_output_folder_not_writable_one_line_exit_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = _main_exit(capsys, ["train", "--out", str(blocker / "run")] + _sets(*FAST))
    assert code == 2
    _one_line_error(err, "--out:", "a_file is a file")
    code, err = _main_exit(
        capsys, ["eval", "--checkpoint", str(tmp_path), "--out", str(blocker / "ev")]
    )
    assert code == 2
    _one_line_error(err, "eval --out:", "a_file is a file")
    assert blocker.read_text() == "x"


def test_unwritable_folder_is_refused(tmp_path):
    """The writability probe itself (root ignores permission bits, so this creates the failure
    the probe must see: a folder that cannot hold a new file)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        probe = tmp_path / "ro" / "probe"
        probe.write_text("")  # root: writable despite the bits; nothing to test
        probe.unlink()
        pytest.skip("running as root: permission bits do not stop writes")
    except PermissionError:
        with pytest.raises(ConfigError, match="cannot write into"):
            preflight.check_writable_dir(ro / "run", "--out")
    finally:
        ro.chmod(0o700)


# ------------------------------------------------------------------ config show


def test_config_show_lists_every_key_with_default_and_help(capsys):
    assert main(["config", "show", "tiny_digits"]) == 0
    out = capsys.readouterr().out
    cfg = load_config("tiny_digits")
    defaults = flatten(TrainConfig().to_dict())
    lines = {ln.strip().split(":", 1)[0]: ln for ln in out.splitlines() if ":" in ln}
    for key, value in flatten(cfg.to_dict()).items():
        assert key in lines, key
        assert "  # " in lines[key], f"{key} has no help"
        if value != defaults[key]:
            assert "(default: " in lines[key], key
    assert "diffusion.chains_per_class: 16  (default: 1)" in out


def test_config_show_without_name_prints_the_defaults(capsys):
    assert main(["config", "show", "--set", "seed=5"]) == 0
    out = capsys.readouterr().out
    assert "seed: 5  (default: 0)" in out and "runtime.tensorboard: false" in out
    n_keys = len(flatten(TrainConfig().to_dict()))
    assert sum(1 for ln in out.splitlines() if ln.strip() and not ln.startswith("#")) >= n_keys


def test_every_config_key_has_help():
    from genrep_fast.train.config_help import key_help

    helps = key_help()
    assert set(helps) == set(flatten(TrainConfig().to_dict()))
    assert [k for k, v in helps.items() if not v] == []


# ------------------------------------------------------------------ non-empty output folders


def test_train_refuses_a_non_empty_out(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"stage": 0, "step": 1}\n')
    code, err = _main_exit(capsys, ["train", "--out", str(out)] + _sets(*FAST))
    assert code == 2
    _one_line_error(err, "--out:", "is not empty", "--resume", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
    assert (out / "metrics.jsonl").read_text() == '{"stage": 0, "step": 1}\n'


def test_demo_refuses_a_non_empty_out(tmp_path, capsys):
    (tmp_path / "report.md").write_text("old")
    code, err = _main_exit(capsys, ["demo", "--out", str(tmp_path)] + _sets(*FAST))
    assert code == 2
    _one_line_error(err, "--out:", "is not empty", "--overwrite")
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_overwrite_clears_the_run_files_and_keeps_the_rest(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "stage9-00000099").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"stage": 9, "step": 99}\n')
    (out / "notes.txt").write_text("mine")
    assert main(["train", "--out", str(out), "--overwrite", "--no-eval"] + _sets(*FAST)) == 0
    assert "--overwrite removed checkpoints, metrics.jsonl" in capsys.readouterr().err
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["stage"] == 0 for r in records)  # the old line is gone
    assert not (out / "checkpoints" / "stage9-00000099").exists()
    assert (out / "checkpoints" / "latest").exists()
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_a_folder_that_holds_no_run(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("mine")
    code, err = _main_exit(capsys, ["train", "--out", str(tmp_path), "--overwrite"] + _sets(*FAST))
    assert code == 2
    _one_line_error(err, "--out:", "holds no run", "thesis.tex")
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


def test_image_folder_starter_config_fits_a_folder(folders):
    cfg = load_config(
        "image_folder_32",
        [f"data.root={folders / 'two'}", "data.test_root=null", "data.batch_size=4"],
    )
    assert (cfg.data.image_size, cfg.model.sample_size, cfg.model.in_channels) == (32, 32, 3)
    preflight.check_run(cfg)
    with pytest.raises(ConfigError, match="model.num_classes is 10"):
        preflight.check_run(
            dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_classes=10))
        )


def test_demo_overwrite_then_resume_and_it_says_where_things_are(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints" / "stage9-00000099").mkdir(parents=True)
    (tmp_path / "report.md").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path), "--overwrite"] + _sets(*FAST)) == 0
    out = capsys.readouterr().out.splitlines()
    report = [x for x in out if x.startswith("report: ")]
    ckpt = [x for x in out if x.startswith("checkpoint: ")]
    assert report == [f"report: {tmp_path / 'report.md'}"]
    assert ckpt and ckpt[0].startswith(f"checkpoint: {tmp_path / 'run' / 'checkpoints' / 'latest'}")
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
    assert (tmp_path / "report.md").read_text() != "old"
    assert not (tmp_path / "run" / "checkpoints" / "stage9-00000099").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    # --resume continues the finished run: nothing left to train, the report is written again
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert main(["demo", "--out", str(tmp_path), "--resume"] + _sets(*FAST)) == 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() == lines


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["model.num_classes=9"], ["data.root:", "labels range over [0, 9]", "num_classes is 9"]),
        (["model.in_channels=3"], ["data.root:", "are [1, 8, 8]", "[3, 8, 8]"]),
    ],
    ids=["labels", "shape"],
)
def test_latent_shards_against_the_model_one_line_exit_2(tmp_path, capsys, extra, needles):
    from safetensors.torch import save_file

    (tmp_path / "lat").mkdir()
    save_file(
        {"latents": torch.zeros(32, 1, 8, 8), "labels": torch.arange(32) % 10},
        str(tmp_path / "lat" / "s0.safetensors"),
    )
    args = ["train", "--out", str(tmp_path / "run")] + _sets(
        *FAST, "data.kind=latents", f"data.root={tmp_path / 'lat'}", *extra
    )
    code, err = _main_exit(capsys, args)
    assert code == 2
    _one_line_error(err, *needles)
    assert not (tmp_path / "run").exists()


def test_classify_a_missing_image_one_line_exit_2(tmp_path, capsys):
    # checked before the checkpoint is read (a checkpoint error would be exit 3)
    code, err = _main_exit(
        capsys, ["classify", "--checkpoint", str(tmp_path), str(tmp_path / "nope.png")]
    )
    assert code == 2
    _one_line_error(err, "classify:", "nope.png", "no such file")


def test_eval_with_a_missing_test_root_one_line_exit_2(tmp_path, folders, capsys):
    run = tmp_path / "run"
    assert main(_folder_args(run, folders / "two")) == 0
    capsys.readouterr()
    code, err = _main_exit(
        capsys,
        ["eval", "--checkpoint", str(run), "--out", str(tmp_path / "ev")]
        + _sets(f"data.test_root={tmp_path / 'gone'}"),
    )
    assert code == 2
    _one_line_error(err, "data.test_root:", "gone", "is not a folder")
    assert not (tmp_path / "ev").exists()
