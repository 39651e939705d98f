"""The roofline model of the benchmarks (genrep_fast/roofline.py): bytes and FLOPs of every case
against hand-computed values at a small shape, the bound on a made-up device, and the columns in
the results table."""

from __future__ import annotations

import pytest

from genrep_fast import benchmarking, roofline

# B=2 images, C=3 classes, T=5 steps, D=7 dims; fp32 unless said.
B, C, T, D = 2, 3, 5, 7


def test_per_image_bank():
    cost = roofline.per_image_bank(B, C, T, D)
    # bank 2*3*5*7*4 = 840, x 2*7*4 = 56, sigma 5*4 = 20, out 2*3*4 = 24
    assert cost.bytes == 940
    assert cost.flops == 630  # 3 * 210 bank elements
    bf16 = roofline.per_image_bank(B, C, T, D, s_bank=2, s_x=2)
    assert bf16.bytes == 420 + 28 + 20 + 24
    # Diagonal sigma of the bank's shape: read once, in place of sigma [T].
    diag = roofline.per_image_bank(B, C, T, D, s_bank=2, s_x=2, s_sigma=2)
    assert diag.bytes == 420 + 28 + 420 + 24
    assert diag.flops == 5 * 210


def test_shared_bank_gemm_and_difference():
    cost = roofline.shared_bank_gemm(B, C, T, D, precision="bf16")
    # N = 15 rows: product 2*2*15*7 = 420, |x|^2 2*2*7 = 28, |mu|^2 2*15*7 = 210
    assert cost.flops == 658
    assert cost.precision == "bf16"
    # x 56, bank 15*7*4 = 420, out 24, sigma 20
    assert cost.bytes == 520
    assert roofline.shared_bank_gemm(B, C, T, D, prepared=True).flops == 448
    diff = roofline.shared_bank_difference(B, C, T, D)
    assert (diff.bytes, diff.flops, diff.precision) == (520, 630, "fp32")


def test_candidate_classes():
    cost = roofline.candidate_classes(B, 2, T, D)
    # rows 2*2*5*7*4 = 560, x 56, index 2*2*8 = 32, sigma 20, out 2*2*4 = 16
    assert cost.bytes == 684
    assert cost.flops == 420
    # The kernel issue's figure: an image's K=20 of T=100, D=4096 bf16 rows are 16 MB, 5.4 us at
    # 3 TB/s.
    rows = roofline.candidate_classes(1, 20, 100, 4096, s_bank=2).bytes
    assert 16.3e6 < rows < 16.5e6
    roofs = roofline.Roofs("h100-like", 3.0e12, dict(roofline.NOMINAL_GPU_PEAKS))
    assert 5.4e-6 < roofline.bound(roofline.candidate_classes(1, 20, 100, 4096, s_bank=2),
                                   roofs).seconds < 5.5e-6  # fmt: skip


def test_alignment_floor_and_kl():
    cost = roofline.alignment_floor([(3, 4), (5, 2)])  # 3 fp32 + 5 bf16 elements
    assert cost.bytes == 5 * (12 + 10)
    assert cost.flops == 9 * 8
    assert cost.precision == "fp64"
    assert roofline.kl_loss(B, C).bytes == 72


def test_bound_picks_the_slower_roof():
    roofs = roofline.Roofs("toy", bandwidth=100.0, peak_flops={"fp32": 1000.0, "bf16": 10.0})
    mem = roofline.bound(roofline.Cost(bytes=940, flops=630, precision="fp32"), roofs)
    assert (mem.kind, mem.seconds, mem.compute_seconds) == ("memory", 9.4, 0.63)
    comp = roofline.bound(roofline.Cost(bytes=520, flops=658, precision="bf16"), roofs)
    assert (comp.kind, comp.seconds, comp.memory_seconds) == ("compute", 65.8, 5.2)
    assert comp.fraction(131.6) == 0.5
    with pytest.raises(ValueError, match="precision 'fp64'"):
        roofline.bound(roofline.Cost(1, 1, "fp64"), roofs)
    with pytest.raises(ValueError, match="precision must be one of"):
        roofline.Cost(1, 1, "fp16")
    with pytest.raises(ValueError, match="d must be an int >= 0"):
        roofline.per_image_bank(1, 1, 1, -1)


def test_results_table_has_the_roofline_columns(tmp_path):
    res = benchmarking.Results(device="cpu")
    cost = roofline.per_image_bank(4, 3, 5, 64)
    recs = res.add("posterior", "toy", {"a": 2e-3, "b": 1e-3}, baseline="a", cost=cost)
    roofs = roofline.device_roofs("cpu")
    want = roofline.bound(cost, roofs)
    assert recs[0].bound == want.kind and recs[0].bound_seconds == want.seconds
    assert recs[1].bound_fraction == pytest.approx(want.seconds / 1e-3)
    assert recs[0].bytes == cost.bytes
    assert roofs.peak_flops["fp32"] > 0 and roofs.bandwidth > 0
    md, _ = benchmarking.write_report(res.write(tmp_path / "r.json"))
    text = md.read_text()
    assert "| bound (ms) | of bound |" in text and "Roofline:" in text
    assert f"{want.seconds * 1e3:.3g} {want.kind}" in text
