"""The command line: train / eval / sample / classify, config errors, checkpoint errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from train_helpers import TINY

from genrep_fast.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run")
    args = ["train", "--out", str(out), "--no-eval"]
    for o in TINY + ["stage2.steps=2"]:
        args += ["--set", o]
    assert main(args) == 0
    return out


def test_train_writes_checkpoint_and_metrics(run_dir):
    assert (run_dir / "checkpoints" / "latest").exists()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["stage"] == 2


def test_eval_sample_classify(run_dir, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(run_dir), "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "eval.json").read_text())
    k = res["head_top1"] * res["test_images"]  # an accuracy is a count over the images
    assert 0 <= k <= res["test_images"] and k == pytest.approx(round(k), abs=1e-6), res
    assert (tmp_path / "reliability.png").exists()
    png = tmp_path / "s.png"
    assert (
        main(["sample", "--checkpoint", str(run_dir), "--out", str(png), "--per-class", "1"]) == 0
    )
    assert png.stat().st_size > 0
    capsys.readouterr()
    assert main(["classify", "--checkpoint", str(run_dir), str(png)]) == 0
    out = capsys.readouterr().out.strip()
    # "<file>: 7 (0.212), 1 (0.180), 4 (0.101)": the digits' class names, three of them
    names = [part.split(" (")[0] for part in out.split(": ", 1)[1].split(", ")]
    assert len(names) == 3 and set(names) <= {str(i) for i in range(10)}


def test_bad_config_key_exits_2_naming_it(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--set", "stage2.stepz=3"]) == 2
    assert "stage2.stepz: unknown key" in capsys.readouterr().err


def test_bad_checkpoint_exits_3(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 3
    assert "checkpoint error" in capsys.readouterr().err


def test_python_dash_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "genrep_fast", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    for cmd in ("train", "eval", "sample", "classify", "bench", "demo"):
        assert cmd in proc.stdout


def _snapshot(folder):
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
        for p in sorted(folder.rglob("*"))
    }


def test_read_only_commands_leave_the_run_alone(run_dir, tmp_path, monkeypatch, capsys):
    """eval / sample / classify write nothing into the run folder and never read the training
    set (eval reads the held-out set only)."""
    import genrep_fast.train.data as data
    import genrep_fast.train.trainer as trainer

    def no_training_data(*a, **k):
        raise AssertionError("the training data were read")

    monkeypatch.setattr(data, "build_datasets", no_training_data)
    monkeypatch.setattr(trainer, "build_datasets", no_training_data)
    monkeypatch.chdir(tmp_path)
    before = _snapshot(run_dir)
    assert main(["eval", "--checkpoint", str(run_dir)]) == 0  # default --out: ./eval-<ckpt>
    (out,) = tmp_path.glob("eval-stage2-*")
    assert (out / "eval.json").exists()
    png = tmp_path / "s.png"
    assert (
        main(["sample", "--checkpoint", str(run_dir), "--out", str(png), "--per-class", "1"]) == 0
    )
    assert main(["classify", "--checkpoint", str(run_dir), str(png)]) == 0
    assert _snapshot(run_dir) == before
    capsys.readouterr()
