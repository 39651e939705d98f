"""The occupancy model (genrep_fast/occupancy.py) against what Nsight Compute measured on the H100:
every kernel profiled in the committed GPU runs (bench/results/gpu-h100-*/**/ncu*.csv), from its
registers, shared memory and block size, gets ncu's block limits, theoretical occupancy and waves.
"""

from __future__ import annotations

import ast
import csv
from pathlib import Path

import pytest

from genrep_fast import occupancy

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "bench" / "results").glob("gpu-h100-*/**/ncu*.csv"))
UNITS = {"byte": 1, "Kbyte": 1000, "Mbyte": 1000**2}


def _bytes(value: str, unit: str) -> int:
    """ncu prints KB as 1000 bytes with two decimals: 16.38 Kbyte is 16 KiB."""
    n = float(value.replace(",", "")) * UNITS[unit.split("/")[0]]
    return round(n / 1024) * 1024 if n >= 1024 else round(n)


def _kernels() -> list[tuple[str, dict]]:
    out = []
    for path in PROFILES:
        by_id: dict[str, dict] = {}
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row["Metric Name"]:
                    by_id.setdefault(row["ID"], {})[row["Metric Name"]] = (
                        row["Metric Value"], row["Metric Unit"], row["Block Size"], row["Grid Size"]
                    )  # fmt: skip
        rel = path.relative_to(ROOT / "bench" / "results")
        out += [(f"{rel}#{i}", m) for i, m in by_id.items() if "Block Limit Registers" in m]
    return out


KERNELS = _kernels()


def _number(m: dict, name: str) -> float:
    return float(m[name][0].replace(",", ""))


def test_the_committed_profiles_are_found():
    # Nine kernels (one profiled twice) in three H100 runs at the time of writing.
    assert len(KERNELS) >= 9, [p.name for p in PROFILES]


@pytest.mark.parametrize("name,m", KERNELS, ids=[k for k, _ in KERNELS])
def test_model_matches_ncu(name, m):
    threads = ast.literal_eval(m["Block Size"][2])  # "(256, 1, 1)"
    grid = ast.literal_eval(m["Grid Size"][3])
    num_warps = threads[0] * threads[1] * threads[2] // 32
    programs = grid[0] * grid[1] * grid[2]
    shared = sum(
        _bytes(m[k][0], m[k][1])
        for k in ("Dynamic Shared Memory Per Block", "Static Shared Memory Per Block")
    )
    carveout = _bytes(*m["Shared Memory Configuration Size"][:2])
    occ = occupancy.occupancy(
        90, num_warps, int(_number(m, "Registers Per Thread")), shared, carveout=carveout
    )
    for limit, metric in (
        ("registers", "Block Limit Registers"),
        ("shared", "Block Limit Shared Mem"),
        ("warps", "Block Limit Warps"),
        ("blocks", "Block Limit SM"),
    ):
        assert occ.limits[limit] == _number(m, metric), (limit, occ)
    assert occ.warps == _number(m, "Theoretical Active Warps per SM")
    assert occ.fraction * 100 == pytest.approx(_number(m, "Theoretical Occupancy"), abs=0.01)
    waves = occupancy.waves(90, programs, occ.blocks)
    assert waves == pytest.approx(_number(m, "Waves Per SM"), abs=0.006)


def test_the_carveout_defaults_to_the_largest():
    """A 49 KiB GEMM tile: 1 block in the 64 KiB carveout ncu saw, 4 in the 228 KiB one the driver
    gives when shared memory limits the blocks."""
    occ = occupancy.occupancy(90, 4, 100, 49152)
    assert occ.limits["shared"] == 233472 // (49152 + 1024) == 4
    assert occupancy.occupancy(80, 4, 100, 49152).limits["shared"] == 167936 // 50176 == 3


def test_register_allocation_rounds_per_warp_and_per_sub_partition():
    # 128 registers: 4096 per warp, 4 per sub-partition, 16 per SM; 129 rounds to 4352: 3 per
    # sub-partition (12 per SM), which a per-SM count (65536 // 4352 = 15) would not see.
    assert occupancy.occupancy(90, 4, 128, 0).limits["registers"] == 4
    assert occupancy.occupancy(90, 4, 129, 0).limits["registers"] == 3
    assert occupancy.occupancy(90, 1, 129, 0).limits["registers"] == 12
    assert occupancy.occupancy(90, 8, 255, 0).blocks == 1


def test_waves_and_tail_fill():
    assert occupancy.waves(90, 640, 2) == pytest.approx(640 / 264)
    assert occupancy.tail_fill(occupancy.waves(90, 640, 2)) == pytest.approx(640 / 792)
    assert occupancy.tail_fill(4.0) == 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(arch=75, num_warps=4, registers=32, shared=0), "arch=75"),
        (dict(arch=90, num_warps=0, registers=32, shared=0), "num_warps=0"),
        (dict(arch=90, num_warps=4, registers=-1, shared=0), "registers=-1"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        occupancy.occupancy(**kwargs)
    with pytest.raises(ValueError, match="blocks_per_sm=0"):
        occupancy.waves(90, 10, 0)
