"""Two processes under torchrun (gloo, loopback): the replicas stay identical, also when one
rank's batch has a NaN (both skip that step)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {str(HERE)!r})
        from train_helpers import tiny_config
        from genrep_fast.train.trainer import Trainer
        cfg = tiny_config({str(tmp_path / "run")!r}, "stage0.steps=2", "stage1.steps=2",
                          "stage2.steps=2", "data.batch_size=8")
        tr = Trainer(cfg)
        # one NaN pixel in a sample of rank 1's slice of stage 1's second batch: both ranks must
        # skip that step (the finiteness flag is all-reduced) and stay identical
        from genrep_fast.train.data import batch_indices
        it = batch_indices(len(tr.train_set), 8, cfg.seed + 1000, rank=1, world=2)
        next(it)
        tr.train_set.images[int(next(it)[0]), 0, 4, 4] = float("nan")
        tr.run()
        skipped = [(r["stage"], r["step"]) for r in tr.history if "skipped" in r]
        assert skipped == [(1, 2)], skipped
        flat = torch.cat([p.detach().reshape(-1) for p in tr.net.parameters()]
                         + [p.detach().reshape(-1) for p in tr.teacher.parameters()])
        torch.save(flat, {str(tmp_path)!r} + f"/rank{{tr.rank}}.pt")
        assert tr.world == 2 and torch.distributed.get_backend() == "gloo"
    """)
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(script),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0, r1)  # both replicas applied the same (all-reduced, aligned) updates
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()  # rank 0 wrote it
