"""How many blocks of a compiled kernel fit on one SM, and in how many waves a grid runs: the
occupancy that Nsight Compute reports as "Block Limit Registers / Shared Mem / Warps / SM",
"Theoretical Occupancy" and "Waves Per SM", computed from what the compile gate knows without a
GPU (registers per thread from ptxas, shared memory from Triton's metadata, warps per block).

The rules are NVIDIA's occupancy rules for compute capability 8.0 and 9.0:

- registers are allocated per warp in units of 256, out of 16 Ki per SM sub-partition (4 per SM),
  so a warp of 101-register threads takes 3328 and a sub-partition holds 4 of them;
- shared memory is allocated per block in units of 128 bytes, plus 1 KiB the system reserves for
  each block, out of the SM's carveout (at most 164 KiB on sm_80, 228 KiB on sm_90);
- at most 64 warps and 32 blocks per SM.

``tests/test_occupancy.py`` checks these rules against the ncu profiles the H100 runs committed
(bench/results/gpu-h100-*/): every block limit, the occupancy and the waves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SmLimits:
    """One SM of a compute capability: ``sms`` on the card this project measures (A100: 108,
    H100 SXM: 132), its shared-memory carveout at most (bytes), and the fixed limits."""

    sms: int
    shared_per_sm: int
    registers_per_sm: int = 65536
    sub_partitions: int = 4
    register_unit: int = 256
    shared_unit: int = 128
    shared_reserved_per_block: int = 1024
    max_warps: int = 64
    max_blocks: int = 32


SM_LIMITS = {
    80: SmLimits(sms=108, shared_per_sm=167936),
    90: SmLimits(sms=132, shared_per_sm=233472),
}


@dataclass(frozen=True)
class Occupancy:
    """Blocks of one kernel resident per SM (``blocks``, the least of ``limits``; ``limiter``
    names which), its warps per SM and the fraction of the SM's warps they are."""

    blocks: int
    limiter: str
    limits: dict[str, int]
    warps: int
    fraction: float


def _limits(arch: int) -> SmLimits:
    if arch not in SM_LIMITS:
        raise ValueError(f"arch={arch}: occupancy is modelled for {sorted(SM_LIMITS)}")
    return SM_LIMITS[arch]


def _warps_by_registers(sm: SmLimits, registers: int) -> int:
    """Warps of ``registers``-register threads the SM's register file holds (whole warps per
    sub-partition)."""
    per_warp = max(1, math.ceil(registers * 32 / sm.register_unit)) * sm.register_unit
    return (sm.registers_per_sm // sm.sub_partitions // per_warp) * sm.sub_partitions


MAX_REGISTERS_PER_THREAD = 255


def register_ceiling(num_warps: int, sm: SmLimits = SM_LIMITS[90]) -> int:
    """The most registers per thread (at most 255) with which one block of ``num_warps`` warps
    still fits the register file: past it ptxas caps the kernel (or, with ``maxnreg``, it
    compiles and then cannot launch). 8.x and 9.0 share the register file, hence one default.
    ``65536 // (32 * num_warps)`` for the power-of-two warp counts Triton uses."""
    if num_warps < 1:
        raise ValueError(f"num_warps={num_warps}: expected >= 1")
    fits = [r for r in range(1, MAX_REGISTERS_PER_THREAD + 1)
            if _warps_by_registers(sm, r) >= num_warps]  # fmt: skip
    return max(fits, default=0)


def occupancy(
    arch: int, num_warps: int, registers: int, shared: int, carveout: int | None = None
) -> Occupancy:
    """Blocks per SM of a kernel of ``num_warps`` warps, ``registers`` per thread and ``shared``
    bytes of shared memory per block on ``sm_<arch>``; ``carveout`` (bytes): the SM's shared
    memory as configured for the launch (ncu's "Shared Memory Configuration Size"; default the
    largest, which the driver picks when a kernel's shared memory limits its blocks)."""
    sm = _limits(arch)
    if num_warps < 1 or registers < 0 or shared < 0:
        raise ValueError(
            f"num_warps={num_warps}, registers={registers}, shared={shared}: expected num_warps "
            ">= 1 and registers, shared >= 0"
        )
    warps_by_registers = _warps_by_registers(sm, registers)
    per_block = math.ceil(shared / sm.shared_unit) * sm.shared_unit + sm.shared_reserved_per_block
    limits = {
        "registers": warps_by_registers // num_warps,
        "shared": (sm.shared_per_sm if carveout is None else carveout) // per_block,
        "warps": sm.max_warps // num_warps,
        "blocks": sm.max_blocks,
    }
    limiter = min(limits, key=limits.__getitem__)
    blocks = limits[limiter]
    return Occupancy(blocks, limiter, limits, blocks * num_warps, blocks * num_warps / sm.max_warps)


def waves(arch: int, programs: int, blocks_per_sm: int) -> float:
    """Waves of a grid of ``programs`` blocks at ``blocks_per_sm`` on the card's SMs (ncu's
    "Waves Per SM"): 2.42 means two full waves and a last one 42% full."""
    if blocks_per_sm < 1:
        raise ValueError(f"blocks_per_sm={blocks_per_sm}: the kernel does not fit on an SM")
    return programs / (blocks_per_sm * _limits(arch).sms)


def tail_fill(wave_count: float) -> float:
    """How busy the machine is on average over ``ceil(waves)`` waves: 1.0 for whole waves,
    2.42 waves -> 2.42 / 3 = 0.81."""
    return wave_count / math.ceil(wave_count) if wave_count > 0 else 0.0
