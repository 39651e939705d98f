"""Gradient alignment under data parallelism (docs/METHOD.md section 3, last paragraph).

Alignment is non-linear in the gradients, so it must see the gradients of the *global* batch:

* **Replicated parameters (DDP).** Both gradient lists are averaged over the ranks before
  alignment. DDP's own hooks all-reduce only the gradient of a ``.backward()`` into ``.grad``;
  ``GradientAligner`` takes both gradients with ``torch.autograd.grad`` instead, which fires no
  DDP hook. So: run the forward pass under ``ddp_model.no_sync()`` (DDP then skips its reducer
  for that graph) and give the aligner ``process_group=...``; it all-reduces each list with
  ``all_reduce_gradients`` (flattened buckets of ``bucket_bytes`` per dtype, one collective per
  bucket, averaged), then aligns. Every rank computes the same update from the same averaged
  gradients, so the replicas stay identical.
* **The trainer's way (DDP's own reducer).** ``genrep_fast.train.trainer`` instead runs each task
  loss as its own forward *through* the DDP wrapper followed by ``loss.backward()``: DDP's
  bucketed all-reduce then averages that loss's gradient while its backward runs (overlapped),
  the trainer moves the averaged ``.grad`` into the loss's list, and aligns the two lists. That
  path needs no call to ``all_reduce_gradients``; it stays for loops built on ``GradientAligner``.
* **Sharded parameters.** A rank holding a shard of every parameter (already reduced over the
  data-parallel ranks, e.g. by a reduce-scatter) only needs the three sums per group of the whole
  parameter: ``all_reduce_sums_fn(group)`` passed as ``reduce_sums`` to ``align_gradients`` sums the
  ``[G, 3]`` float64 table over the ranks (3 * G values, no gradient traffic), and every rank then
  forms the same ``a``, ``b`` and updates its shard.

Determinism: the bucket layout depends only on the gradient list, so repeated steps issue the same
collectives in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

DEFAULT_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


def all_reduce_gradients(
    grads: Sequence[torch.Tensor | None],
    group: dist.ProcessGroup | None = None,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> None:
    """Average ``grads`` over the ranks of ``group`` in place.

    Tensors are packed into flat buckets of at most ``bucket_bytes`` (one dtype and device per
    bucket; a larger tensor gets a bucket of its own), each bucket is all-reduced once and copied
    back. None entries are skipped: the set of None gradients must be the same on every rank (as
    DDP assumes for a static graph).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("all_reduce_gradients needs an initialised torch.distributed group")
    if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, int) or bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be a positive int, got {bucket_bytes!r}")
    world = dist.get_world_size(group)
    if world == 1:
        return
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in grads:
        if t is not None:
            by_kind.setdefault((t.dtype, t.device), []).append(t)
    for tensors in by_kind.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for t in tensors:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > bucket_bytes:
                _reduce_bucket(bucket, group, world)
                bucket, size = [], 0
            bucket.append(t)
            size += nbytes
        if bucket:
            _reduce_bucket(bucket, group, world)


def _reduce_bucket(bucket: list[torch.Tensor], group, world: int) -> None:
    flat = torch.cat([t.reshape(-1) for t in bucket])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat.div_(world)
    offset = 0
    for t in bucket:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def all_reduce_sums_fn(
    group: dist.ProcessGroup | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``reduce_sums`` for sharded parameters: sums the ``[G, 3]`` table over ``group``."""

    def reduce_sums(sums: torch.Tensor) -> torch.Tensor:
        sums = sums.clone()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        return sums

    return reduce_sums
