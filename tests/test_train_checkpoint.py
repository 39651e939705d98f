"""Atomic checkpoints: round trip, corrupted / truncated files, the previous one stays intact."""

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
        ckpt.load_checkpoint(tmp_path)
    tensors, meta = ckpt.load_checkpoint(tmp_path / "stage1-00000001")
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
