"""Alignment under data parallelism, 2 CPU processes with gloo on loopback.

* DDP: each rank sees half the batch; the forward runs under ``no_sync`` and the aligner averages
  both gradient lists before aligning. The resulting .grad equals the single-process update on the
  full batch.
* Sharded: each rank holds half of every (flattened) gradient; only the [G, 3] sums are
  all-reduced. Each rank's update equals its half of the full update.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _alignment_nets import Block
from torch import nn

from genrep_fast import distributed as gdist
from genrep_fast.alignment import GradientAligner, align_gradients

WORLD = 2


class Net(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)


def make_model_and_batch():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    return model, x


def losses(model, x):
    # Means over the batch: the mean of the two halves' losses is the full batch's loss.
    z = model(x)
    return z.pow(2).mean(), (z - 1).abs().mean() + z[:, 0].mean()


def full_batch_update():
    model, x = make_model_and_batch()
    aligner = GradientAligner(model, groups=GradientAligner.by_module(model, Block))
    aligner.backward(*losses(model, x))
    return [p.grad.clone() for p in model.parameters()]


def full_batch_gradients():
    model, x = make_model_and_batch()
    params = list(model.parameters())
    lp, lg = losses(model, x)
    gp = torch.autograd.grad(lp, params, retain_graph=True)
    gg = torch.autograd.grad(lg, params)
    return [t.reshape(-1) for t in gp], [t.reshape(-1) for t in gg]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, x = make_model_and_batch()
        ddp = nn.parallel.DistributedDataParallel(model)
        aligner = GradientAligner(
            ddp, groups=GradientAligner.by_module(model, Block), process_group=True
        )
        half = x.shape[0] // WORLD
        with ddp.no_sync():
            lp, lg = losses(ddp, x[rank * half : (rank + 1) * half])
        aligner.backward(lp, lg)
        ddp_grads = [p.grad.clone() for p in model.parameters()]

        # Sharded: this rank's half of every flattened full-batch gradient.
        gp, gg = full_batch_gradients()
        shard = [slice(rank * (t.numel() // 2), (rank + 1) * (t.numel() // 2)) for t in gp]
        # Odd sizes: rank 1 also takes the last element.
        shard = [
            slice(s.start, t.numel() if rank == WORLD - 1 else s.stop) for s, t in zip(shard, gp)
        ]
        sp = [t[s].clone() for t, s in zip(gp, shard)]
        sg = [t[s].clone() for t, s in zip(gg, shard)]
        groups = [[0, 1], [2, 3, 4, 5], [6, 7]]
        sharded = align_gradients(
            sp, sg, groups=groups, reduce_sums=gdist.all_reduce_sums_fn(), backend="auto"
        )
        torch.save(
            {"ddp": ddp_grads, "sharded": sharded, "shard": [(s.start, s.stop) for s in shard]},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_ddp_update_equals_full_batch(rank_results):
    want = full_batch_update()
    for res in rank_results:
        for got, w in zip(res["ddp"], want):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-7)
    # and not trivially: a single rank's half batch gives a different update
    model, x = make_model_and_batch()
    GradientAligner(model, groups=GradientAligner.by_module(model, Block)).backward(
        *losses(model, x[:8])
    )
    assert not torch.allclose(model.blocks[0].attn.weight.grad, want[2], rtol=1e-3)


def test_sharded_sums_equal_full_update(rank_results):
    gp, gg = full_batch_gradients()
    groups = [[0, 1], [2, 3, 4, 5], [6, 7]]
    want = align_gradients(gp, gg, groups=groups, backend="reference")
    for res in rank_results:
        for got, w, (start, stop) in zip(res["sharded"], want, res["shard"]):
            torch.testing.assert_close(got, w[start:stop], rtol=1e-6, atol=1e-7)
    # without the all-reduce a shard's own sums give a different update
    half = align_gradients(
        [t[: t.numel() // 2] for t in gp], [t[: t.numel() // 2] for t in gg], groups=groups
    )
    assert not all(torch.allclose(h, w[: h.numel()], rtol=1e-4) for h, w in zip(half, want))


def test_all_reduce_gradients_needs_init():
    with pytest.raises(RuntimeError, match="initialised"):
        gdist.all_reduce_gradients([torch.ones(2)])
