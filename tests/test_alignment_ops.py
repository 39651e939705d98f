"""The gradient-alignment ops (group_sums + align_combine) and align_gradients against the float64
reference and an independent NumPy transcription of docs/METHOD.md section 3 (the projection form, not
the expanded a/b form the kernels use).
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from genrep_fast import _ops, reference
from genrep_fast.alignment import MODES, align_gradients

pytestmark = pytest.mark.skipif(not _ops.HAS_EXTENSION, reason="genrep_fast._C is not built")

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
KS = (0.0, 1.0, 2.0, 3.5)


# ---------------------------------------------------------------------------------------------
# Independent NumPy oracle
# ---------------------------------------------------------------------------------------------


def np_align(ps, gs, ids, k, w_p, w_g, mode):
    """docs/METHOD.md section 3 literally, per group, in float64 NumPy. ids[i] = -1: in no group."""
    n = len(ps)
    p64 = [None if p is None else p.double().numpy().ravel() for p in ps]
    g64 = [None if g is None else g.double().numpy().ravel() for g in gs]
    for i in range(n):
        if p64[i] is None and g64[i] is not None:
            p64[i] = np.zeros_like(g64[i])
        if g64[i] is None and p64[i] is not None:
            g64[i] = np.zeros_like(p64[i])
    out = [None] * n
    for grp in sorted(set(ids)):
        members = [i for i in range(n) if ids[i] == grp and p64[i] is not None]
        if not members:
            continue
        p = np.concatenate([p64[i] for i in members])
        g = np.concatenate([g64[i] for i in members])
        if grp < 0:
            upd = w_p * p + w_g * g
        else:
            with np.errstate(all="ignore"):
                d, np2, ng2 = float(p @ g), float(p @ p), float(g @ g)
                finite = np.isfinite([d, np2, ng2]).all()
                cos = d / (np.sqrt(np2) * np.sqrt(ng2)) if np2 > 0 and ng2 > 0 else 0.0
                alpha = ((min(max(cos, -1.0), 1.0) + 1) / 2) ** k
                par_p = (d / ng2) * g if ng2 > 0 else np.zeros_like(g)
                par_g = (d / np2) * p if np2 > 0 else np.zeros_like(p)
                ap = (p - par_p) + alpha * par_p
                ag = (g - par_g) + alpha * par_g
                if mode in ("none", "perception"):
                    ag = g  # the generation gradient is left as is
                if mode in ("none", "generation"):
                    ap = p
                upd = w_p * ap + w_g * ag
                if not finite:
                    upd = np.full_like(p, np.nan)
        off = 0
        for i in members:
            m = p64[i].size
            out[i] = upd[off : off + m]
            off += m
    return out


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def random_case(rng: random.Random, dtype, n_tensors=7, scale=1.0, none_at=None):
    shapes = [(rng.randint(0, 3), rng.randint(1, 40)) for _ in range(n_tensors)]
    shapes[0] = (33000,)  # crosses the CPU chunk boundary (2^15)
    ps, gs = [], []
    for idx, s in enumerate(shapes):
        p = torch.randn(s, dtype=torch.float64) * scale
        g = (0.3 * p + torch.randn(s, dtype=torch.float64) * scale) * (1 if idx % 2 else -1)
        ps.append(p.to(dtype))
        gs.append(g.to(dtype))
    if none_at is not None:
        ps[none_at] = None
    return ps, gs


def random_groups(rng: random.Random, n: int):
    order = list(range(n))
    rng.shuffle(order)
    n_out = rng.randint(0, 2)  # some tensors in no group
    inside = order[n_out:]
    cuts = sorted(rng.sample(range(1, len(inside)), k=min(2, len(inside) - 1)))
    bounds = [0, *cuts, len(inside)]
    return [inside[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def tol(dtype):
    # Low precision: one rounding of a float64 result to `dtype`, twice for safety (the ops and
    # the reference both compute in float64 and round once at the end). float64: the sums are
    # added in a different order than torch's, so a and b differ in their last bits.
    return 1e-12 if dtype == torch.float64 else 2 * torch.finfo(dtype).eps


def assert_close_update(got, want, dtype, label="", scale=0.0):
    """|got - want| <= tol * (|want| + max|want| + scale) elementwise, same non-finite entries.

    ``scale``: the inputs' magnitude, where the update cancels to ~0 (anti-parallel gradients)."""
    assert (got is None) == (want is None), label
    if got is None:
        return
    want = want if isinstance(want, torch.Tensor) else torch.from_numpy(np.asarray(want))
    want = want.reshape(got.shape).double()
    got64 = got.double()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got64), finite), label
    if not finite.any():
        return
    want, got64 = want[finite], got64[finite]
    bound = tol(dtype) * (want.abs() + want.abs().max() + scale)
    err = (got64 - want).abs()
    assert bool((err <= bound).all()), f"{label}: max error {err.max().item():.3e}"


# ---------------------------------------------------------------------------------------------
# Correctness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_and_numpy(dtype, mode):
    # crc32, not hash(): str hashes change with PYTHONHASHSEED, and the cases must not.
    rng = random.Random(zlib.crc32(f"{dtype}-{mode}".encode()))
    torch.manual_seed(rng.randint(0, 10**6))
    for k in KS:
        ps, gs = random_case(rng, dtype, none_at=rng.choice([None, 3]))
        groups = random_groups(rng, len(ps))
        ids = reference.resolve_groups(groups, len(ps))
        got = align_gradients(ps, gs, groups=groups, k=k, mode=mode, backend="ops")
        ref = reference.align_gradients(ps, gs, groups=groups, k=k, mode=mode)
        ora = np_align(ps, gs, ids, k, 0.7, 0.3, mode)
        for i, (a, r, o) in enumerate(zip(got, ref, ora)):
            assert a is None or a.dtype == dtype
            assert_close_update(a, r, dtype, f"ref {i} k={k} groups={groups}")
            assert_close_update(a, o, dtype, f"numpy {i} k={k} groups={groups}")


@pytest.mark.parametrize("groups", [None, "global"])
def test_group_presets(groups):
    rng = random.Random(1)
    ps, gs = random_case(rng, torch.float32)
    got = align_gradients(ps, gs, groups=groups, backend="ops")
    ids = reference.resolve_groups(groups, len(ps))
    for a, o in zip(got, np_align(ps, gs, ids, 2.0, 0.7, 0.3, "symmetric")):
        assert_close_update(a, o, torch.float32)


@pytest.mark.parametrize("relation", ["parallel", "anti", "orthogonal", "zero_p", "zero_g", "zero"])
@pytest.mark.parametrize("mode", MODES)
def test_special_directions(relation, mode):
    torch.manual_seed(0)
    p = torch.randn(3, 50, dtype=torch.float64)
    q = torch.randn(3, 50, dtype=torch.float64)
    q = q - (q * p).sum() / (p * p).sum() * p  # orthogonal to p
    g = {
        "parallel": 2.5 * p,
        "anti": -0.5 * p,
        "orthogonal": q,
        "zero_p": p,
        "zero_g": torch.zeros_like(p),
        "zero": torch.zeros_like(p),
    }[relation]
    if relation in ("zero_p", "zero"):
        p = torch.zeros_like(p)
    for k in KS:
        got = align_gradients([p], [g], k=k, mode=mode, backend="ops")[0]
        want = np_align([p], [g], [0], k, 0.7, 0.3, mode)[0]
        scale = p.abs().max().item() + g.abs().max().item()
        assert_close_update(got, want, torch.float64, f"{relation} k={k}", scale=scale)
    if relation == "anti" and mode == "symmetric":
        # cos = -1 -> alpha = 0 for k > 0: both projections are removed entirely, and with
        # g = -0.5 p the projections are the whole gradients: the update is 0.
        got = align_gradients([p], [g], k=2.0, mode=mode, backend="ops")[0]
        assert got.abs().max().item() < 1e-14
    if relation == "orthogonal":
        # cos = 0: nothing is projected out, alpha is irrelevant.
        got = align_gradients([p], [g], k=3.5, mode=mode, backend="ops")[0]
        torch.testing.assert_close(got, 0.7 * p + 0.3 * g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_tiny_and_huge_magnitudes(dtype, scale):
    # float32 squares of 1e-30 underflow to 0 and of 1e30 overflow to inf: the float64 sums keep
    # the direction, so the update equals the unit-scale update times `scale`.
    rng = random.Random(7)
    ps, gs = random_case(rng, torch.float64)
    ps = [(p * scale).to(dtype) for p in ps]
    gs = [(g * scale).to(dtype) for g in gs]
    got = align_gradients(ps, gs, groups="global", backend="ops")
    want = np_align(ps, gs, [0] * len(ps), 2.0, 0.7, 0.3, "symmetric")
    for a, o in zip(got, want):
        assert torch.isfinite(a).all()
        assert_close_update(a, o, dtype)
    assert max(a.abs().max().item() for a in got if a.numel()) > scale * 1e-3


def test_none_gradients_count_as_zeros():
    p = torch.randn(10, 10)
    g = torch.randn(10, 10)
    got = align_gradients([p, None, None], [g, g.clone(), None], groups="global", backend="ops")
    want = reference.align_gradients([p, None, None], [g, g.clone(), None], groups="global")
    assert got[2] is None and want[2] is None
    for a, r in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, r, rtol=tol(torch.float32), atol=1e-6)
    # p None in its own group: |p| = 0 -> cos = 0 -> update = w_g * g.
    got = align_gradients([None], [g], backend="ops")[0]
    torch.testing.assert_close(got, 0.3 * g)


def test_non_finite_group_propagates():
    p = [torch.randn(4), torch.randn(5), torch.randn(6)]
    g = [torch.randn(4), torch.randn(5), torch.randn(6)]
    p[1][2] = float("inf")
    out = align_gradients(p, g, groups=[[0, 1], [2]], backend="ops")
    assert torch.isnan(out[0]).all() and torch.isnan(out[1]).all()
    assert torch.isfinite(out[2]).all()


def test_deterministic_bitwise_and_thread_independent():
    rng = random.Random(3)
    ps, gs = random_case(rng, torch.float32, n_tensors=12)
    ps[0] = torch.randn(300_000)
    gs[0] = torch.randn(300_000)
    groups = random_groups(rng, len(ps))
    ids = reference.resolve_groups(groups, len(ps))
    g_count = len(groups)
    threads = torch.get_num_threads()
    try:
        runs = []
        for nt in (1, max(2, threads), 1):
            torch.set_num_threads(nt)
            sums = torch.ops.genrep_fast.group_sums(ps, gs, ids, g_count)
            upd = align_gradients(ps, gs, groups=groups, backend="ops")
            runs.append((sums, upd))
    finally:
        torch.set_num_threads(threads)
    for sums, upd in runs[1:]:
        assert torch.equal(sums, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(upd, runs[0][1]))


def _cpu_has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


# The CPU kernels' chunk loops exist twice (csrc/alignment_cpu.cpp): the extension's baseline ISA
# and an AVX2 clone picked at run time; GENREP_FAST_CPU_ISA=baseline forces the first.
ISAS = ["native", "baseline"]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_loads_and_stores_are_exact(dtype, isa, monkeypatch):
    """The CPU kernels convert 16-bit values to double and back themselves (vectorised, not
    through c10's scalar conversions): every one of the 65536 bit patterns must load exactly
    (group_sums of p alone: |p|^2 of one value, in double) and, for the non-NaN ones, store back
    unchanged (out = 1 * p + 0 * 0 outside any group; -0 turns +0); a NaN is stored as c10 stores
    it. Rounding on store, to nearest even through float as c10 does: a * p + b * g against
    torch's own double -> float -> 16-bit conversion, bit for bit, over random values and the
    format's edges (subnormals, the largest finite, the overflow threshold)."""
    monkeypatch.setenv("GENREP_FAST_CPU_ISA", isa)
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    p = bits.view(dtype)
    zeros = torch.zeros_like(p)
    nan = torch.isnan(p)
    # Loads: each value in a tensor of its own, among 7 zeros (at lane i % 8 of the 8-wide
    # vector loops; 8 values are not a tail), so |p|^2 is one exact product plus zeros.
    rows = torch.zeros(len(p), 8, dtype=dtype)
    rows[torch.arange(len(p)), torch.arange(len(p)) % 8] = p
    vals = list(rows.unbind(0))
    ids = list(range(len(vals)))
    sums = torch.ops.genrep_fast.group_sums(vals, [None] * len(vals), ids, len(vals))
    want = p.double() ** 2
    got = sums[:, 1]
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got[~torch.isnan(want)], want[~torch.isnan(want)])
    # Round trip of every pattern.
    out = torch.empty_like(p)
    torch.ops.genrep_fast.align_combine([p], [zeros], torch.zeros(0, 3, dtype=torch.float64), [-1],
                                        2.0, 1.0, 0.0, "symmetric", [out])  # fmt: skip
    same = (1.0 * p.double() + 0.0 * zeros.double()).to(dtype)  # p itself; -0 + 0 is +0
    assert torch.equal(out[~nan].view(torch.int16), same[~nan].view(torch.int16))
    # A NaN is stored as c10 stores it: bf16 0x7FC0; fp16 0x7E00 with the NaN's sign (a
    # conversion that kept the payload's top bits would differ).
    quiet = 0x7FC0 if dtype == torch.bfloat16 else (bits[nan] & -0x8000) | 0x7E00
    assert bool((out[nan].view(torch.int16) == quiet).all())
    # Rounding on store.
    info = torch.finfo(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g, dtype=torch.float64)
    x = x * torch.exp2(torch.randint(-30, 20, x.shape, generator=g).double())
    edges = torch.tensor(
        [info.max, info.tiny, info.smallest_normal / 2, info.eps], dtype=torch.float64
    )
    x = torch.cat([x, edges, edges * (1 + 2**-11), edges * (1 - 2**-12), -edges])
    if dtype == torch.float16:
        x = torch.cat(
            [x, torch.tensor([65519.99, 65520.0, 65536.0, 2**-25, 3 * 2**-26, 2**-24 * 1.5])]
        )
    ps = x.to(dtype)
    gs = (x * 0.37).to(dtype)
    out = torch.empty_like(ps)
    a, b = 1.0000001, -0.7000003
    torch.ops.genrep_fast.align_combine([ps], [gs], torch.zeros(0, 3, dtype=torch.float64), [-1],
                                        2.0, a, b, "symmetric", [out])  # fmt: skip
    want = (a * ps.double() + b * gs.double()).float().to(dtype)
    mismatch = out.view(torch.int16) != want.view(torch.int16)
    assert not bool(mismatch.any()), (ps[mismatch][:5], gs[mismatch][:5], out[mismatch][:5])


@pytest.mark.skipif(not _cpu_has_avx2(), reason="this CPU has no AVX2: only the baseline loops run")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_avx2_and_baseline_loops_agree(dtype, monkeypatch):
    """The AVX2 clone adds group_sums' partials in 4 lanes where the baseline adds them in 2: the
    sums agree to rounding (and each to the float64 oracle); given the same sums, the combine is
    elementwise in double without FMA, so its outputs are the same bits."""
    rng = random.Random(11)
    ps, gs = random_case(rng, dtype, n_tensors=9)
    ids = reference.resolve_groups(random_groups(rng, len(ps)), len(ps))
    n = max(ids) + 1
    sums, outs = {}, {}
    for isa in ISAS:
        monkeypatch.setenv("GENREP_FAST_CPU_ISA", isa)
        sums[isa] = torch.ops.genrep_fast.group_sums(ps, gs, ids, n)
        outs[isa] = [torch.empty_like(p) for p in ps]
        torch.ops.genrep_fast.align_combine(ps, gs, sums["native"], ids, 2.0, 0.7, 0.3,
                                            "symmetric", outs[isa])  # fmt: skip
    want = torch.zeros(n, 3, dtype=torch.float64)
    for p, g, i in zip(ps, gs, ids):
        if i >= 0:
            p, g = p.double(), g.double()
            want[i] += torch.stack([(p * g).sum(), (p * p).sum(), (g * g).sum()])
    for isa in ISAS:
        torch.testing.assert_close(sums[isa], want, rtol=1e-13, atol=0)
    for a, b in zip(outs["native"], outs["baseline"]):
        assert torch.equal(a, b)


def test_out_in_place_strided_and_zero_size():
    p = torch.randn(64, 48)
    g = torch.randn(64, 48)
    strided_p = torch.randn(48, 64).t()  # non-contiguous
    strided_g = torch.randn(48, 64).t()
    empty = torch.empty(0, 5)
    ps = [p.clone(), strided_p.clone(), empty.clone()]
    gs = [g, strided_g, empty.clone()]
    want = reference.align_gradients(ps, gs, groups="global")
    out = [ps[0], ps[1], ps[2]]  # in place into p, including the strided one
    res = align_gradients(ps, gs, groups="global", out=out, backend="ops")
    assert res[0] is out[0] and res[1] is out[1]
    assert not out[1].is_contiguous()
    for a, r in zip(out, want):
        torch.testing.assert_close(a, r, rtol=tol(torch.float32), atol=1e-6)
    # out aliasing g works the same way
    gs2 = [g.clone(), strided_g.clone(), empty]
    align_gradients([p, strided_p, empty], gs2, groups="global", out=gs2, backend="ops")
    want = reference.align_gradients([p, strided_p, empty], [g, strided_g, empty], groups="global")
    for a, r in zip(gs2, want):
        torch.testing.assert_close(a, r, rtol=tol(torch.float32), atol=1e-6)


def test_many_tensors_mixed_dtypes():
    rng = random.Random(5)
    dts = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    ps, gs = [], []
    for i in range(2000):
        n = rng.choice([0, 1, 3, 17, 64])
        dt = dts[i % 4]
        ps.append(torch.randn(n).to(dt))
        gs.append(torch.randn(n).to(dt))
    groups = [list(range(s, min(s + 37, 2000))) for s in range(0, 2000, 37)]
    got = align_gradients(ps, gs, groups=groups, backend="ops")
    want = reference.align_gradients(ps, gs, groups=groups)
    for i, (a, r) in enumerate(zip(got, want)):
        assert a.dtype == ps[i].dtype
        torch.testing.assert_close(a, r, rtol=tol(a.dtype), atol=tol(a.dtype) * 4, msg=str(i))


def test_reference_backend_with_out_and_reduce_sums():
    p = [torch.randn(7), torch.randn(3, 3)]
    g = [torch.randn(7), torch.randn(3, 3)]
    out = [torch.empty(7), torch.empty(3, 3)]
    align_gradients(p, g, groups="global", out=out, backend="reference")
    want = reference.align_gradients(p, g, groups="global")
    for a, r in zip(out, want):
        assert torch.equal(a, r)
    # reduce_sums doubling the sums changes nothing (a, b are ratios), on both backends
    for backend in ("ops", "reference"):
        got = align_gradients(p, g, groups="global", reduce_sums=lambda s: 2 * s, backend=backend)
        for a, r in zip(got, want):
            torch.testing.assert_close(a, r)


# ---------------------------------------------------------------------------------------------
# Op registration: opcheck, fake tensors, compile
# ---------------------------------------------------------------------------------------------


def _op_args():
    ps = [torch.randn(5, 3), None, torch.randn(40, dtype=torch.float64)]
    gs = [torch.randn(5, 3), torch.randn(4), torch.randn(40, dtype=torch.float64)]
    return ps, gs, [0, 1, -1], 2


def test_opcheck_group_sums():
    ps, gs, ids, n = _op_args()
    torch.library.opcheck(torch.ops.genrep_fast.group_sums.default, (ps, gs, ids, n))


def test_opcheck_align_combine():
    ps, gs, ids, n = _op_args()
    sums = torch.ops.genrep_fast.group_sums(ps, gs, ids, n)
    out = [torch.empty(5, 3), torch.empty(4), torch.empty(40, dtype=torch.float64)]
    torch.library.opcheck(
        torch.ops.genrep_fast.align_combine.default,
        (ps, gs, sums, ids, 2.0, 0.7, 0.3, "symmetric", out),
    )


def test_compiles_without_graph_break():
    ps = [torch.randn(6, 4), torch.randn(9)]
    gs = [torch.randn(6, 4), torch.randn(9)]

    def step(ps, gs):
        sums = torch.ops.genrep_fast.group_sums(ps, gs, [0, 0], 1)
        out = [torch.empty_like(p) for p in ps]
        torch.ops.genrep_fast.align_combine(ps, gs, sums, [0, 0], 2.0, 0.7, 0.3, "symmetric", out)
        return out

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for a, r in zip(compiled(ps, gs), reference.align_gradients(ps, gs, groups="global")):
        torch.testing.assert_close(a, r)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_python():
    p, g = [torch.randn(3)], [torch.randn(3)]
    with pytest.raises(ValueError, match="same length"):
        align_gradients(p, g + [torch.randn(2)])
    with pytest.raises(ValueError, match="shape"):
        align_gradients(p, [torch.randn(4)])
    with pytest.raises(TypeError, match="dtype"):
        align_gradients(p, [torch.randn(3, dtype=torch.float64)])
    with pytest.raises(ValueError, match="device"):
        align_gradients(p, [torch.randn(3, device="meta")])
    with pytest.raises(ValueError, match="out of range"):
        align_gradients(p, g, groups=[[0, 1]])
    with pytest.raises(ValueError, match="overlap"):
        align_gradients(p + p, g + g, groups=[[0, 1], [1]])
    with pytest.raises(ValueError, match="k must be >= 0"):
        align_gradients(p, g, k=-1.0)
    with pytest.raises(ValueError, match="mode"):
        align_gradients(p, g, mode="both")
    with pytest.raises(ValueError, match="out"):
        align_gradients(p, g, out=[torch.empty(3), torch.empty(3)])
    with pytest.raises(TypeError, match=r"out\[0\]"):
        align_gradients(p, g, out=[torch.empty(3, dtype=torch.float64)])
    with pytest.raises(TypeError, match="floating"):
        align_gradients([torch.ones(3, dtype=torch.int64)], [torch.ones(3, dtype=torch.int64)])


def test_bad_inputs_ops():
    p, g = [torch.randn(3)], [torch.randn(3)]
    ops = torch.ops.genrep_fast
    with pytest.raises(ValueError, match="same length"):
        ops.group_sums(p, g + g, [0], 1)
    with pytest.raises(ValueError, match="out of range"):
        ops.group_sums(p, g, [1], 1)
    with pytest.raises(ValueError, match="shape"):
        ops.group_sums(p, [torch.randn(4)], [0], 1)
    with pytest.raises(TypeError, match="dtype"):
        ops.group_sums(p, [torch.randn(3, dtype=torch.float64)], [0], 1)
    sums = ops.group_sums(p, g, [0], 1)
    with pytest.raises(ValueError, match="k must be >= 0"):
        ops.align_combine(p, g, sums, [0], -1.0, 0.7, 0.3, "symmetric", [torch.empty(3)])
    with pytest.raises(ValueError, match="mode"):
        ops.align_combine(p, g, sums, [0], 2.0, 0.7, 0.3, "both", [torch.empty(3)])
    with pytest.raises(ValueError, match=r"sums must be \[G, 3\]"):
        ops.align_combine(p, g, sums[:, :2], [0], 2.0, 0.7, 0.3, "symmetric", [torch.empty(3)])
    with pytest.raises(TypeError, match="float64"):
        ops.align_combine(p, g, sums.float(), [0], 2.0, 0.7, 0.3, "symmetric", [torch.empty(3)])
    with pytest.raises(ValueError, match=r"out\[0\] has shape"):
        ops.align_combine(p, g, sums, [0], 2.0, 0.7, 0.3, "symmetric", [torch.empty(4)])


# ---------------------------------------------------------------------------------------------
# CUDA (owed on a GPU machine)
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu_ops(dtype):
    if not _ops.HAS_CUDA_OPS:
        pytest.skip("extension built without CUDA kernels")
    rng = random.Random(11)
    ps, gs = random_case(rng, dtype, n_tensors=60, none_at=4)
    ps[1] = torch.randn(3 * 65536 + 5).to(dtype)  # several chunks, ragged tail
    gs[1] = torch.randn(3 * 65536 + 5).to(dtype)
    groups = random_groups(rng, len(ps))
    for mode in MODES:
        cpu = align_gradients(ps, gs, groups=groups, mode=mode, backend="ops")
        dev = [None if t is None else t.cuda() for t in ps], [t.cuda() for t in gs]
        gpu = align_gradients(*dev, groups=groups, mode=mode, backend="ops")
        gpu2 = align_gradients(*dev, groups=groups, mode=mode, backend="ops")
        for a, b, c in zip(cpu, gpu, gpu2):
            assert torch.equal(b, c)  # deterministic
            torch.testing.assert_close(b.cpu().double(), a.double(), rtol=tol(dtype), atol=1e-6)


@pytest.mark.gpu
def test_cuda_thousands_of_tensors_unaligned_and_in_place():
    if not _ops.HAS_CUDA_OPS:
        pytest.skip("extension built without CUDA kernels")
    rng = random.Random(12)
    dts = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    ps, gs = [], []
    for i in range(3000):
        n = rng.choice([0, 1, 7, 33, 1000])
        base = torch.randn(n + 1, device="cuda").to(dts[i % 4])
        ps.append(base[1:] if i % 3 == 0 else base[:n])  # misaligned starts: scalar path
        gs.append(torch.randn(n, device="cuda").to(dts[i % 4]))
    groups = [list(range(s, min(s + 50, 3000))) for s in range(0, 3000, 50)]
    want = reference.align_gradients(ps, gs, groups=groups)
    out = [p.clone() for p in ps]
    align_gradients(out, gs, groups=groups, out=out, backend="ops")
    for a, r in zip(out, want):
        torch.testing.assert_close(a, r, rtol=tol(a.dtype), atol=tol(a.dtype) * 4)


@pytest.mark.gpu
def test_cuda_graph_capture():
    if not _ops.HAS_CUDA_OPS:
        pytest.skip("extension built without CUDA kernels")
    ps = [torch.randn(1000, device="cuda"), torch.randn(70000, device="cuda")]
    gs = [torch.randn(1000, device="cuda"), torch.randn(70000, device="cuda")]
    out = [torch.empty_like(p) for p in ps]
    ops = torch.ops.genrep_fast
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sums = ops.group_sums(ps, gs, [0, 0], 1)
        ops.align_combine(ps, gs, sums, [0, 0], 2.0, 0.7, 0.3, "symmetric", out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sums = ops.group_sums(ps, gs, [0, 0], 1)
        ops.align_combine(ps, gs, sums, [0, 0], 2.0, 0.7, 0.3, "symmetric", out)
    for p, g in zip(ps, gs):
        p.normal_()
        g.normal_()
    graph.replay()
    torch.cuda.synchronize()
    for a, r in zip(out, reference.align_gradients(ps, gs, groups="global")):
        torch.testing.assert_close(a, r)


@pytest.mark.gpu
def test_cuda_grid_stride_over_many_waves_and_launches():
    """More chunks than one grid holds (kWaves x the blocks resident at once: ~1,000-2,000 on an
    H100), so each block walks several chunks, and more tensors than one launch takes (80), so the
    list spans three launches with a group's chunks in all of them. A chunk walked by the wrong
    block, a skipped chunk or a partial slot written twice changes the sums."""
    if not _ops.HAS_CUDA_OPS:
        pytest.skip("extension built without CUDA kernels")
    rng = random.Random(13)
    gen = torch.Generator(device="cuda").manual_seed(0)
    sizes = [rng.choice([1, 100, 65536, 65537, 200000]) for _ in range(200)]
    sizes[100] = 5000 * 65536 + 3  # 5,001 chunks in one tensor (1.3 GB of fp32 per list)
    ps = [torch.randn(n, device="cuda", generator=gen) for n in sizes]
    gs = [0.5 * p + torch.randn(n, device="cuda", generator=gen) for p, n in zip(ps, sizes)]
    ids = [i % 3 for i in range(len(ps))]
    ops = torch.ops.genrep_fast
    sums = ops.group_sums(ps, gs, ids, 3)
    assert torch.equal(sums, ops.group_sums(ps, gs, ids, 3))  # deterministic
    want = torch.zeros(3, 3, dtype=torch.float64, device="cuda")
    for p, g, gid in zip(ps, gs, ids):
        p64, g64 = p.double(), g.double()
        want[gid] += torch.stack([(p64 * g64).sum(), (p64 * p64).sum(), (g64 * g64).sum()])
    torch.testing.assert_close(sums, want, rtol=1e-10, atol=0.0)
    out = [torch.empty_like(p) for p in ps]
    ops.align_combine(ps, gs, sums, ids, 2.0, 0.7, 0.3, "symmetric", out)
    a, b = reference.alignment_coefficients(want, 2.0, 0.7, 0.3, "symmetric")
    for i in (0, 99, 100, 101, 199):  # around the big tensor and at both ends of the list
        upd = (a[ids[i]] * ps[i].double() + b[ids[i]] * gs[i].double()).float()
        torch.testing.assert_close(out[i], upd, rtol=1e-6, atol=1e-6)
