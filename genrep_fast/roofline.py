"""Roofline model of the benchmark cases: the bytes each case must move, the FLOPs it must do, and
the time the device cannot beat (``max(bytes / bandwidth, flops / peak)``).

Formulas (``s_x``, ``s_bank``: bytes per element of x and of the bank; outputs are fp32 ``[B, C]``
log-likelihoods; sigma is a ``[T]`` fp32 vector). FLOPs count the terms proportional to ``D``;
the log-sum-exp over T (``O(B C T)``, under ``1/D`` of the total) is left out.

* per-image bank (``mu [B, C, T, D]``, difference form, memory-bound):
  bytes ``= B C T D s_bank + B D s_x + T 4 + B C 4``; flops ``= 3 B C T D`` (subtract, square,
  add per bank element).
* shared bank, GEMM form (``mu [C, T, D]``, ``N = C T`` rows; ``-2 x.mu + |x|^2 + |mu|^2``):
  bytes ``= B D s_x + N D s_bank + T 4 + B C 4`` (x and the bank read once);
  flops ``= 2 B N D + 2 B D + 2 N D`` (the product, ``|x|^2``, ``|mu|^2``; a prepared bank has
  ``|mu|^2`` already: ``2 N D`` fewer). The compute roof is the GEMM's precision: tf32x3 does
  three tf32 products, so its roof is a third of tf32's.
* candidate classes (``class_index [B, K]`` into a shared bank, exact difference form): every image
  reads its own ``K T D`` bank rows (no reuse assumed between images):
  bytes ``= B K T D s_bank + B D s_x + B K 8 (int64 index) + T 4 + B K 4``; flops ``= 3 B K T D``.
* gradient alignment, the 5-access floor: read p and g for the sums, read p and g and write the
  update for the combine: bytes ``= 5 sum_i numel_i s_i``; flops ``= 9 sum_i numel_i`` (3 fma
  for ``<p,g>, |p|^2, |g|^2``; 2 mul + 1 add for ``a p + b g``), in float64 (the ops' contract).
* fused KL + posterior, forward + backward: bytes ``= 3 B C 4`` (read logits and log-likelihoods,
  write the logits' gradient); flops not counted (``O(B C)`` exp/log).

Roofs: the memory roof is always the copy bandwidth measured in the same run
(``benchmarking.copy_bandwidth``). The compute roof per precision is the datasheet dense peak for
an H100/H200 (``NOMINAL_GPU_PEAKS``: bf16 790 TFLOP/s, tf32 400 as in the kernel issue), else a
peak measured in the same run by a torch matmul in that precision (CPU: tf32 and tf32x3 run as
fp32).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import torch

PRECISIONS = ("fp64", "fp32", "tf32", "tf32x3", "bf16")

# H100 SXM dense peaks in FLOP/s. bf16 and tf32: the figures the kernel issue plans with; fp32
# (CUDA cores, no tensor cores) and fp64 (vector; the alignment kernels use scalar fma):
# NVIDIA's H100 SXM datasheet. The H200 has the same compute (more, faster memory).
NOMINAL_GPU_PEAKS = {
    "bf16": 790e12,
    "tf32": 400e12,
    "tf32x3": 400e12 / 3,
    "fp32": 67e12,
    "fp64": 34e12,
}
NOMINAL_GPU_NAMES = ("H100", "H200")


@dataclasses.dataclass(frozen=True)
class Cost:
    """What one call of a case must do: ``bytes`` moved to/from memory, ``flops``, and the
    precision whose compute roof applies (one of ``PRECISIONS``)."""

    bytes: float
    flops: float
    precision: str = "fp32"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")


def _check_dims(**dims: int) -> None:
    for name, v in dims.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")


def per_image_bank(
    b: int, c: int, t: int, d: int, *, s_bank: int = 4, s_x: int = 4, s_sigma: int = 0
) -> Cost:
    """Per-image bank ``mu [B, C, T, D]`` (difference form): 3 FLOPs per bank element (subtract,
    square, add). ``s_sigma``: bytes per element of a diagonal sigma of the bank's shape, read
    once beside the bank, with 2 FLOPs more per element (the division and the log-determinant's
    mantissa product); 0 for isotropic sigma ``[T]``."""
    _check_dims(b=b, c=c, t=t, d=d)
    n = b * c * t * d
    sigma_bytes = n * s_sigma if s_sigma else t * 4
    return Cost(
        bytes=float(n * s_bank + b * d * s_x + sigma_bytes + b * c * 4),
        flops=float((5 if s_sigma else 3) * n),
        precision="fp32",
    )


def shared_bank_gemm(
    b: int,
    c: int,
    t: int,
    d: int,
    *,
    precision: str = "tf32x3",
    s_bank: int = 4,
    s_x: int = 4,
    prepared: bool = False,
) -> Cost:
    """Shared bank ``mu [C, T, D]`` in GEMM form (``precision``: the GEMM's; ``ieee`` runs the
    difference form, see ``shared_bank_difference``)."""
    _check_dims(b=b, c=c, t=t, d=d)
    n = c * t
    flops = 2 * b * n * d + 2 * b * d + (0 if prepared else 2 * n * d)
    return Cost(
        bytes=float(b * d * s_x + n * d * s_bank + t * 4 + b * c * 4),
        flops=float(flops),
        precision=precision,
    )


def shared_bank_difference(
    b: int, c: int, t: int, d: int, *, s_bank: int = 4, s_x: int = 4
) -> Cost:
    """Shared bank in the exact difference form (``precision="ieee"``): every (image, row) pair
    is a subtract-square-add over D on the CUDA cores; x and the bank read once."""
    _check_dims(b=b, c=c, t=t, d=d)
    return Cost(
        bytes=float(b * d * s_x + c * t * d * s_bank + t * 4 + b * c * 4),
        flops=float(3 * b * c * t * d),
        precision="fp32",
    )


def candidate_classes(b: int, k: int, t: int, d: int, *, s_bank: int = 4, s_x: int = 4) -> Cost:
    """``K`` candidate classes per image out of a shared bank, exact (difference) form."""
    _check_dims(b=b, k=k, t=t, d=d)
    return Cost(
        bytes=float(b * k * t * d * s_bank + b * d * s_x + b * k * 8 + t * 4 + b * k * 4),
        flops=float(3 * b * k * t * d),
        precision="fp32",
    )


def alignment_floor(tensors: Iterable[tuple[int, int]]) -> Cost:
    """Gradient alignment over tensors given as ``(numel, bytes per element)``: the 5-access
    floor."""
    total_bytes = 0
    total_numel = 0
    for i, (numel, size) in enumerate(tensors):
        _check_dims(**{f"tensors[{i}].numel": numel, f"tensors[{i}].element_size": size})
        total_bytes += numel * size
        total_numel += numel
    return Cost(bytes=float(5 * total_bytes), flops=float(9 * total_numel), precision="fp64")


def kl_loss(b: int, c: int) -> Cost:
    """Fused KL + posterior, forward and backward, fp32 ``[B, C]``."""
    _check_dims(b=b, c=c)
    return Cost(bytes=float(3 * b * c * 4), flops=0.0, precision="fp32")


@dataclasses.dataclass(frozen=True)
class Roofs:
    """A device's limits: ``bandwidth`` in bytes/s, ``peak_flops`` per precision in FLOP/s."""

    name: str
    bandwidth: float
    peak_flops: dict
    source: str = ""


@dataclasses.dataclass(frozen=True)
class Bound:
    """The roofline bound of one cost on one device."""

    seconds: float  # max(memory_seconds, compute_seconds)
    kind: str  # "memory" or "compute"
    memory_seconds: float
    compute_seconds: float

    def fraction(self, measured_seconds: float) -> float:
        """Bound time / measured time: 1.0 runs at the roof."""
        return self.seconds / measured_seconds


def bound(cost: Cost, roofs: Roofs) -> Bound:
    if roofs.bandwidth <= 0:
        raise ValueError(f"roofs.bandwidth must be > 0, got {roofs.bandwidth}")
    if cost.precision not in roofs.peak_flops:
        raise ValueError(
            f"roofs {roofs.name!r} have no compute peak for precision {cost.precision!r} "
            f"(have {sorted(roofs.peak_flops)})"
        )
    mem = cost.bytes / roofs.bandwidth
    comp = cost.flops / roofs.peak_flops[cost.precision]
    return Bound(
        seconds=max(mem, comp),
        kind="memory" if mem >= comp else "compute",
        memory_seconds=mem,
        compute_seconds=comp,
    )


_MATMUL_DTYPE = {"fp64": torch.float64, "fp32": torch.float32, "tf32": torch.float32,
                 "bf16": torch.bfloat16}  # fmt: skip


def measured_matmul_peak(precision: str, device: str = "cpu", n: int = 512) -> float:
    """FLOP/s of an ``[n, n] @ [n, n]`` torch matmul in ``precision``'s dtype (fp64, fp32, tf32,
    bf16), measured now; tf32 products are allowed only for "tf32" on CUDA."""
    from genrep_fast.benchmarking import time_fn

    dev = torch.device(device)
    a = torch.randn(n, n, device=dev).to(_MATMUL_DTYPE[precision])
    bmat = torch.randn(n, n, device=dev).to(_MATMUL_DTYPE[precision])
    tf32 = precision == "tf32" and dev.type == "cuda"
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        sec = time_fn(lambda: a @ bmat, device=dev, min_time_s=0.1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2.0 * n**3 / sec


@functools.cache
def device_roofs(device: str = "cpu") -> Roofs:
    """The roofs of ``device`` for this run (measured once per process and cached)."""
    from genrep_fast.benchmarking import copy_bandwidth, environment

    name = environment(device)["device_name"]
    bw = copy_bandwidth(device)
    if torch.device(device).type == "cuda" and any(g in name for g in NOMINAL_GPU_NAMES):
        return Roofs(name, bw, dict(NOMINAL_GPU_PEAKS), "copy bandwidth measured; nominal peaks")
    peaks = {"fp64": measured_matmul_peak("fp64", device)}
    peaks["fp32"] = measured_matmul_peak("fp32", device)
    if torch.device(device).type == "cuda":
        peaks["tf32"] = measured_matmul_peak("tf32", device)
        peaks["tf32x3"] = peaks["tf32"] / 3
    else:
        peaks["tf32"] = peaks["tf32x3"] = peaks["fp32"]  # a CPU has no tf32: fp32 products
    peaks["bf16"] = measured_matmul_peak("bf16", device)
    return Roofs(name, bw, peaks, "copy bandwidth and matmul peaks measured in this run")
