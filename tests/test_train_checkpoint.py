"""Atomic checkpoints: round trip, corrupted / truncated / edited files, the previous one stays
intact, names never reused, killed writes, non-finite tensors refused."""

from __future__ import annotations

import json

import pytest
import torch

from genrep_fast.train import checkpoint as ckpt


def _tensors(v: float):
    return {"net/w": torch.full((3, 5), v), "net/b": torch.arange(4, dtype=torch.int64)}


def test_round_trip_and_latest(tmp_path):
    ckpt.save_checkpoint(tmp_path, "stage1-00000001", _tensors(1.0), {"step": 1})
    ckpt.save_checkpoint(tmp_path, "stage1-00000002", _tensors(2.0), {"step": 2})
    tensors, meta = ckpt.load_checkpoint(tmp_path)
    assert meta["step"] == 2
    assert torch.equal(tensors["net/w"], torch.full((3, 5), 2.0))
    assert torch.equal(tensors["net/b"], torch.arange(4))
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind


def test_keep_prunes_old(tmp_path):
    for s in range(4):
        ckpt.save_checkpoint(tmp_path, f"stage1-{s:08d}", _tensors(s), {"step": s}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "stage1-00000002",
        "stage1-00000003",
    ]


@pytest.mark.parametrize("damage", ["truncate", "flip", "meta", "missing"])
def test_damaged_checkpoint_is_a_clear_error_and_previous_is_intact(tmp_path, damage):
    ckpt.save_checkpoint(tmp_path, "stage1-00000001", _tensors(1.0), {"step": 1})
    bad = ckpt.save_checkpoint(tmp_path, "stage1-00000002", _tensors(2.0), {"step": 2})
    state = bad / ckpt.STATE_FILE
    if damage == "truncate":
        data = state.read_bytes()
        state.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray(state.read_bytes())
        data[-3] ^= 0xFF
        state.write_bytes(bytes(data))
    elif damage == "meta":
        (bad / ckpt.META_FILE).write_text("{not json")
    else:
        state.unlink()
    with pytest.raises(ckpt.CheckpointError, match=str(bad.name)):
        ckpt.load_checkpoint(bad)
    # the run's checkpoints folder: latest is broken, the newest intact one is used, with a warning
    with pytest.warns(UserWarning, match=f"using stage1-00000001.*{bad.name}"):
        tensors, meta = ckpt.load_checkpoint(tmp_path)
    assert meta["step"] == 1 and torch.equal(tensors["net/w"], torch.full((3, 5), 1.0))


def test_failed_write_leaves_previous_checkpoint(tmp_path):
    ckpt.save_checkpoint(tmp_path, "stage1-00000001", _tensors(1.0), {"step": 1})
    with pytest.raises(TypeError):
        ckpt.save_checkpoint(tmp_path, "stage1-00000002", {"net/w": "not a tensor"}, {"step": 2})
    assert (tmp_path / ckpt.LATEST).read_text().strip() == "stage1-00000001"
    assert not (tmp_path / "stage1-00000002").exists()
    assert not list(tmp_path.glob(".*tmp*"))
    _, meta = ckpt.load_checkpoint(tmp_path)
    assert meta["step"] == 1


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint"):
        ckpt.load_checkpoint(tmp_path)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / ckpt.META_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ckpt.CheckpointError, match="unknown checkpoint format"):
        ckpt.load_checkpoint(tmp_path / "x")


def test_optimizer_state_round_trip():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    tensors, meta = ckpt.optimizer_to_flat(opt)
    meta = json.loads(json.dumps(meta))  # what a checkpoint stores
    opt2 = torch.optim.AdamW(model.parameters(), lr=5.0)
    ckpt.optimizer_from_flat(opt2, tensors, meta)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k in a["state"][i]:
            assert torch.equal(a["state"][i][k], b["state"][i][k])


def test_a_name_is_never_written_twice(tmp_path):
    first = ckpt.save_checkpoint(tmp_path, "stage1-00000004", _tensors(1.0), {"step": 4}, keep=3)
    again = ckpt.save_checkpoint(tmp_path, "stage1-00000004", _tensors(2.0), {"step": 4}, keep=3)
    assert first.name == "stage1-00000004" and again.name == "stage1-00000004.2"
    assert (tmp_path / ckpt.LATEST).read_text().strip() == again.name
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [first.name, again.name]
    tensors, _ = ckpt.load_checkpoint(first)  # the first write is untouched
    assert torch.equal(tensors["net/w"], torch.full((3, 5), 1.0))


class _Killed(BaseException):
    """Stands in for SIGKILL at a rename: nothing after it runs (but ``finally`` blocks do)."""


@pytest.mark.parametrize("killed_call", [1, 2, 3])
def test_killed_at_any_rename_leaves_latest_complete(tmp_path, monkeypatch, killed_call):
    """A save killed at its first, second or third rename / replace: ``latest`` still names a
    complete checkpoint and loading the run works (format 1 renamed the old folder away first)."""
    import os
    from pathlib import Path

    ckpt.save_checkpoint(tmp_path, "stage1-00000004", _tensors(1.0), {"step": 4})
    calls = []
    real_rename, real_replace = Path.rename, os.replace

    def counted(real):
        def f(*a, **k):
            calls.append(a)
            if len(calls) == killed_call:
                raise _Killed
            return real(*a, **k)

        return f

    monkeypatch.setattr(Path, "rename", counted(real_rename))
    monkeypatch.setattr(os, "replace", counted(real_replace))
    try:  # (a save with fewer renames than killed_call completes)
        ckpt.save_checkpoint(tmp_path, "stage1-00000004", _tensors(2.0), {"step": 4})
    except _Killed:
        pass
    monkeypatch.undo()
    name = (tmp_path / ckpt.LATEST).read_text().strip()
    assert (tmp_path / name / ckpt.META_FILE).exists()
    _, meta = ckpt.load_checkpoint(tmp_path)
    assert meta["step"] == 4


def test_latest_naming_a_missing_folder_falls_back(tmp_path):
    ckpt.save_checkpoint(tmp_path, "stage1-00000001", _tensors(1.0), {"step": 1})
    ckpt.save_checkpoint(tmp_path, "stage1-00000002", _tensors(2.0), {"step": 2})
    (tmp_path / ckpt.LATEST).write_text("stage1-00000009\n")
    with pytest.warns(UserWarning, match="using stage1-00000002.*does not exist"):
        _, meta = ckpt.load_checkpoint(tmp_path)
    assert meta["step"] == 2
    assert ckpt.resolve_checkpoint(tmp_path).name == "stage1-00000002"


def test_edited_meta_is_detected(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, "stage1-00000002", _tensors(2.0), {"step": 2})
    meta_path = path / ckpt.META_FILE
    meta = json.loads(meta_path.read_text())
    meta["step"] = 7
    meta_path.write_text(json.dumps(meta, indent=1))
    with pytest.raises(ckpt.CheckpointError, match="meta.json: SHA-256 mismatch"):
        ckpt.load_checkpoint(path)


def test_stale_temporaries_are_removed(tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ckpt.save_checkpoint(tmp_path, "stage1-00000001", _tensors(1.0), {"step": 1})
    stale = tmp_path / f".stage1-00000002.tmp-{dead.pid}"
    stale.mkdir()
    (stale / ckpt.STATE_FILE).write_bytes(b"\0" * 1000)
    stale_latest = tmp_path / f".latest.tmp-{dead.pid}"
    stale_latest.write_text("stage1-00000002\n")
    live = tmp_path / f".stage1-00000003.tmp-{os.getppid()}"  # a process that still runs
    live.mkdir()
    removed = ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted([stale, stale_latest])
    assert not stale.exists() and not stale_latest.exists() and live.exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["stage1-00000001"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_checkpoint_is_refused_and_the_finite_ones_stay(tmp_path, bad):
    ckpt.save_checkpoint(tmp_path, "stage1-00000001", _tensors(1.0), {"step": 1}, keep=1)
    tensors = _tensors(2.0)
    tensors["net/w"][1, 2] = bad
    with pytest.raises(ckpt.NonFiniteCheckpointError, match="net/w"):
        ckpt.save_checkpoint(tmp_path, "stage1-00000002", tensors, {"step": 2}, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["stage1-00000001"]
    assert (tmp_path / ckpt.LATEST).read_text().strip() == "stage1-00000001"
    assert not list(tmp_path.glob(".*tmp*"))


def test_load_only_some_tensors(tmp_path):
    ckpt.save_checkpoint(tmp_path, "stage1-00000001", _tensors(1.0), {"step": 1})
    tensors, _ = ckpt.load_checkpoint(tmp_path, prefixes=("net/w",))
    assert list(tensors) == ["net/w"]
