"""Data parallelism on two processes under torchrun (gloo, loopback, CPU; ``runtime.device=cpu``
so that a machine with GPUs runs the same test).

* the replicas stay identical, also when one rank's batch has a NaN or one rank's loss is not
  finite (both skip that step);
* two processes train the same weights as one process on the full batch (DDP-averaged gradients,
  aligned after averaging; ``grad_accum`` exercises ``no_sync``);
* the sharded chain bank is bit-identical to the one-process bank;
* no collective per step: the stop flag is agreed on only at log / checkpoint / last steps, and a
  SIGTERM that reaches one rank stops both at the next such step.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import torch

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, body: str, name: str = "run.py") -> None:
    """Run ``body`` (a script; ``HERE`` and ``TMP`` are defined for it) on 2 gloo processes."""
    script = tmp_path / name
    head = f"import os, sys, torch\nHERE = {str(HERE)!r}\nTMP = {str(tmp_path)!r}\nsys.path.insert(0, HERE)\n"
    script.write_text(head + textwrap.dedent(body))
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
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_process_gloo_run(tmp_path):
    _torchrun(
        tmp_path,
        """
        from train_helpers import tiny_config
        from genrep_fast.train.trainer import Trainer
        cfg = tiny_config(TMP + "/run", "stage0.steps=2", "stage1.steps=2",
                          "stage2.steps=2", "data.batch_size=8", "runtime.device=cpu")
        tr = Trainer(cfg)
        # one NaN pixel in a sample of rank 1's slice of stage 1's second batch: both ranks must
        # skip that step (rank 1's NaN loss makes the averaged gradient NaN) and stay identical
        from genrep_fast.train.data import batch_indices
        it = batch_indices(len(tr.train_set), 8, cfg.seed + 1000, rank=1, world=2)
        next(it)
        tr.train_set.images[int(next(it)[0]), 0, 4, 4] = float("nan")
        # and a perception loss whose value is infinite on rank 0 only while its gradient is
        # finite (stage 2, step 1): rank 0 must poison its gradient so that rank 1 skips too
        import genrep_fast.train.trainer as trainer_module
        real_loss = trainer_module.perception_loss
        def perception_loss(*a, **k):
            loss, logits, parts = real_loss(*a, **k)
            if tr.rank == 0 and (tr.stage, tr.step) == (2, 0):
                loss = loss + float("inf")
            return loss, logits, parts
        trainer_module.perception_loss = perception_loss
        tr.run()
        skipped = [(r["stage"], r["step"]) for r in tr.history if "skipped" in r]
        assert skipped == [(1, 2), (2, 1)], skipped
        flat = torch.cat([p.detach().reshape(-1) for p in tr.net.parameters()]
                         + [p.detach().reshape(-1) for p in tr.teacher.parameters()])
        torch.save(flat, TMP + f"/rank{tr.rank}.pt")
        assert tr.world == 2 and torch.distributed.get_backend() == "gloo"
        """,
    )
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert torch.equal(r0, r1)  # both replicas applied the same (all-reduced, aligned) updates
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()  # rank 0 wrote it


# --------------------------------------------------------------------------- 2 processes = 1

# Stages 1 and 2 (stage 0 is plain DDPM: its randomness is covered by stage 2's), a bank refresh
# at step 0 of each, grad_accum=2. Two batch-level terms are made per-sample so that splitting
# the batch changes nothing mathematically: label dropout is off (its draws are per rank), and the
# variance KL's weight is 0 (it is normalised by the batch's count of noisy transitions, a ratio,
# not a mean over samples).
EQUIV = [
    "runtime.device=cpu",
    "stage0.steps=0",
    "stage1.steps=2",
    "stage2.steps=2",
    "diffusion.bank_refresh_every=2",
    "loss.label_dropout=0",
    "loss.vlb_weight=0",
]


def per_sample_noise() -> None:
    """Make the generation loss's ``(t, noise)`` of a sample a function of the sample alone (a
    generator seeded by a CRC of its pixels) instead of a draw from the rank's stream, so one
    process and two see the same noise for the same sample."""
    import genrep_fast.train.network as network

    real = network.sample_noising

    def noising(net, x0, num_steps, generator):
        outs = []
        for i in range(x0.shape[0]):
            g = torch.Generator().manual_seed(zlib.crc32(x0[i].cpu().numpy().tobytes()))
            outs.append(real(net, x0[i : i + 1], num_steps, g))
        return tuple(torch.cat(parts) for parts in zip(*outs))

    network.sample_noising = noising


def _weights(tr) -> torch.Tensor:
    return torch.cat(
        [p.detach().reshape(-1) for p in tr.net.parameters()]
        + [p.detach().reshape(-1) for p in tr.teacher.parameters()]
    )


def _one_process(out: Path, batch: int, accum: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial, final) weights of a one-process run (net twice at the start: the teacher is
    made from it)."""
    from train_helpers import tiny_config

    from genrep_fast.train.trainer import Trainer

    cfg = tiny_config(out, *EQUIV, f"data.batch_size={batch}", f"runtime.grad_accum={accum}")
    tr = Trainer(cfg)
    init = torch.cat([p.detach().reshape(-1) for p in tr.net.parameters()] * 2)
    tr.run()
    assert not any("skipped" in r for r in tr.history)
    return init, _weights(tr)


def test_two_processes_train_the_weights_of_one_on_the_full_batch(tmp_path, monkeypatch):
    import genrep_fast.train.network as network

    monkeypatch.setattr(network, "sample_noising", network.sample_noising)  # restored after
    per_sample_noise()
    # Two processes x 8 samples x 2 micro-batches: per step the 32 samples that one process sees
    # with batch 16 x 2 micro-batches (batch_indices slices one global permutation).
    _torchrun(
        tmp_path,
        """
        from test_train_ddp import EQUIV, per_sample_noise, _weights
        from train_helpers import tiny_config
        from genrep_fast.train.trainer import Trainer
        per_sample_noise()
        cfg = tiny_config(TMP + "/two", *EQUIV, "data.batch_size=8", "runtime.grad_accum=2")
        tr = Trainer(cfg)
        tr.run()
        assert tr.ddp is not None and not any("skipped" in r for r in tr.history)
        torch.save(_weights(tr), TMP + f"/two{tr.rank}.pt")
        """,
    )
    two0, two1 = torch.load(tmp_path / "two0.pt"), torch.load(tmp_path / "two1.pt")
    assert torch.equal(two0, two1)
    init, one = _one_process(tmp_path / "one", 16, 2)

    def distance(w: torch.Tensor) -> float:  # from the one-process weights, per unit of training
        return ((w - one).norm() / (one - init).norm()).item()

    # The tolerance is measured, not picked: the same 32 samples per step in 4 micro-batches of 8
    # on one process is the same mathematics in another float32 summation order, which is all
    # that splitting the batch over two processes changes (batch sums of 8 + 8, not 16). AdamW's
    # first steps (update ~ lr * g / |g|) turn rounding-sized gradients into +-lr updates, so the
    # weights do not agree to float32 rounding: measured on the 2-core CPU, both distances are
    # ~0.04, both from the same ~1150 of 152208 values (those > 1e-5 apart), while the same
    # run with grad_accum=1 (other samples) is 0.6 away, and two processes that drop the first
    # micro-batch's gradient 0.59; a gradient not averaged over the ranks breaks the replicas'
    # equality above.
    rounding = distance(_one_process(tmp_path / "regrouped", 8, 4)[1])
    assert distance(two0) <= 2 * rounding, (distance(two0), rounding)


# --------------------------------------------------------------------------- the sharded bank


def test_sharded_bank_is_the_one_process_bank(tmp_path):
    """10 classes x 3 chains in model batches of 4: 8 batches, rank 0 builds 16 chains, rank 1 14
    (padding of the gather); float32 and bfloat16 (sent as bytes)."""
    body = """
    from train_helpers import tiny_config
    from genrep_fast.train.network import build_chain_bank, build_network
    import torch.distributed as dist
    dist.init_process_group("gloo")
    for dtype in ("float32", "bfloat16"):
        cfg = tiny_config(TMP, "diffusion.chains_per_class=3", "diffusion.bank_batch_size=4",
                          f"diffusion.bank_dtype={dtype}")
        torch.manual_seed(cfg.seed)
        net = build_network(cfg, torch.device("cpu"))
        bank = build_chain_bank(net, cfg, None, modulated=True, seed=123, sharded=True)
        torch.save((bank.mu, bank.sigma), TMP + f"/bank{dist.get_rank()}-{dtype}.pt")
    # Torn down before exit: a process leaving with the gloo group alive aborted once in CI
    # ("terminate called without an active exception", SIGABRT on rank 0).
    dist.destroy_process_group()
    """
    _torchrun(tmp_path, body)
    # one thread, as each torchrun process has: the thread count changes CPU convolutions' float
    # summation order (measured: 2 threads give a bank 2e-6 away), the number of ranks must not
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare_banks(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _compare_banks(tmp_path: Path) -> None:
    from train_helpers import tiny_config

    from genrep_fast.train.network import build_chain_bank, build_network

    for dtype in ("float32", "bfloat16"):
        cfg = tiny_config(
            tmp_path,
            "diffusion.chains_per_class=3",
            "diffusion.bank_batch_size=4",
            f"diffusion.bank_dtype={dtype}",
        )
        torch.manual_seed(cfg.seed)
        net = build_network(cfg, torch.device("cpu"))
        one = build_chain_bank(net, cfg, None, modulated=True, seed=123)
        other_seed = build_chain_bank(net, cfg, None, modulated=True, seed=124)
        assert not torch.equal(
            one.mu, other_seed.mu
        )  # the seed matters: equality below is not vacuous
        for rank in (0, 1):
            mu, sigma = torch.load(tmp_path / f"bank{rank}-{dtype}.pt")
            assert mu.dtype == one.mu.dtype
            assert torch.equal(mu, one.mu) and torch.equal(sigma, one.sigma), (dtype, rank)


# --------------------------------------------------------------------------- collectives


def test_no_collective_per_step_and_a_one_rank_sigterm_stops_both(tmp_path):
    """Every Python-level collective is recorded with the trainer's (stage, step). Only the bank
    (all_gather at refreshes), the stop flag (all_reduce at log / last steps) and checkpoints
    (barrier) use them; DDP's gradient buckets are its own. A SIGTERM sent to rank 1 during
    stage 1's step 3 (log_every=2) stops both ranks after step 4 with one checkpoint."""
    _torchrun(
        tmp_path,
        """
        import json, signal
        import torch.distributed as dist
        from train_helpers import tiny_config
        from genrep_fast.train.trainer import Trainer, TrainingInterrupted
        cfg = tiny_config(TMP + "/run", "stage0.steps=3", "stage1.steps=6", "stage2.steps=2",
                          "data.batch_size=8", "runtime.log_every=2", "runtime.device=cpu",
                          "diffusion.bank_refresh_every=2")
        tr = Trainer(cfg)
        calls = []
        for name in ("all_reduce", "all_gather", "broadcast", "barrier", "all_gather_object",
                     "reduce", "gather", "scatter", "all_to_all", "all_gather_into_tensor",
                     "reduce_scatter_tensor", "broadcast_object_list"):
            real = getattr(dist, name)
            def counted(*a, _real=real, _name=name, **k):
                calls.append((_name, tr.stage, tr.step))
                return _real(*a, **k)
            setattr(dist, name, counted)
        step = tr.train_step
        def train_step(stage, batches, accum):
            out = step(stage, batches, accum)
            if tr.rank == 1 and stage == 1 and tr.step == 2:  # (the step becomes 3 after this)
                os.kill(os.getpid(), signal.SIGTERM)
            return out
        tr.train_step = train_step
        try:
            tr.run()
            raise AssertionError("not interrupted")
        except TrainingInterrupted as exc:
            assert exc.checkpoint is None or exc.checkpoint.name == "stage1-00000004"
        assert (tr.stage, tr.step) == (1, 4), (tr.stage, tr.step)
        json.dump(calls, open(TMP + f"/calls{tr.rank}.json", "w"))
        """,
    )
    import json

    for rank in (0, 1):
        calls = {tuple(c) for c in json.loads((tmp_path / f"calls{rank}.json").read_text())}
        reduces = sorted((s, t) for n, s, t in calls if n == "all_reduce")
        # stage 0: log step 2 and the last step 3; stage 1: log steps 2 and 4 (stopped)
        assert reduces == [(0, 2), (0, 3), (1, 2), (1, 4)], (rank, reduces)
        gathers = sorted((s, t) for n, s, t in calls if n == "all_gather")
        assert gathers == [(1, 0), (1, 2)], (rank, gathers)  # the bank, sharded, at refreshes
        others = {n for n, _, _ in calls} - {"all_reduce", "all_gather", "barrier"}
        assert not others, others
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("stage*"))
    assert ckpts == ["stage0-00000003", "stage1-00000004"], ckpts
