"""The Triton mixture kernels (through TRITON_INTERPRET=1 on CPU) against the float64 reference.

Tolerance idiom (flash-attention): a kernel's error against float64 is at most ~2x the error of
torch computing the same form in the same precision, plus a floor of a few fp32 ulps of the result.
"""

from __future__ import annotations

import math

import pytest
import torch
from _mixture_cases import DEVICES, make_bank

import genrep_fast as G
from genrep_fast import reference as R
from genrep_fast.kernels import mixture as M

F64 = torch.float64


def lse_f64(x, mu, sigma, ci=None):
    per_image = mu.dim() == x.dim() + 2
    steps = mu.shape[2] if per_image else mu.shape[1]
    ll = R.mixture_log_likelihood(x.double(), mu.double(), sigma.double(), class_index=ci)
    return ll + math.log(steps)


def _round_operand(a: torch.Tensor, precision: str) -> torch.Tensor:
    if precision == "bf16":
        return a.bfloat16().float()
    if precision == "tf32":
        bits = a.float().view(torch.int32)
        return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return a.float()


def torch_gemm_form_lse(x, mu, sigma, precision):
    """The shared-bank GEMM form in torch, fp32 accumulation, operands rounded like the mode."""
    b, c, t = x.shape[0], mu.shape[0], mu.shape[1]
    x2 = x.reshape(b, -1).float()
    mu2 = mu.reshape(c * t, -1).float()
    d = x2.shape[1]
    if tuple(sigma.shape) == tuple(mu.shape):
        ivar = sigma.reshape(c * t, d).double().square().reciprocal()
        m1, m2 = (mu2.double() * ivar).float(), ivar.float()
        cross = _round_operand(x2.square(), precision) @ _round_operand(m2, precision).T
        cross -= 2 * _round_operand(x2, precision) @ _round_operand(m1, precision).T
        quad = (cross + (mu2.double().square() * ivar).sum(-1).float()).clamp_min(0)
        s = -0.5 * quad - torch.log(sigma.reshape(c * t, d)).sum(-1)
    else:
        sig = sigma.expand(c, t).reshape(c * t)
        cross = _round_operand(x2, precision) @ _round_operand(mu2, precision).T
        quad = (x2.square().sum(-1, keepdim=True) - 2 * cross + mu2.square().sum(-1)).clamp_min(0)
        s = -0.5 * quad / sig.square() - d * torch.log(sig)
    s = s - 0.5 * d * R.LOG_2PI
    return torch.logsumexp(s.reshape(b, c, t), -1)


def _floor(want: torch.Tensor) -> float:
    # A few fp32 ulps of the largest result: the kernel returns float32.
    return 4 * torch.finfo(torch.float32).eps * max(1.0, want.abs().max().item())


DIFF_CASES = [
    # (B, C, T, latent, per_image, sigma kind, candidates)
    (1, 1, 1, (1,), False, "t", False),
    (3, 7, 75, (5,), False, "c_t", False),
    (2, 7, 3, (3, 3), False, "diag", False),
    (3, 5, 4, (129,), False, "t", True),
    (2, 4, 3, (2, 5), False, "diag", True),
    (2, 1, 75, (7,), True, "b_c_t", False),
    (3, 7, 2, (6,), True, "t", False),
    (2, 3, 5, (4,), True, "diag", True),
]


@pytest.mark.parametrize("case", DIFF_CASES, ids=lambda c: "B{}C{}T{}L{}-{}{}-{}".format(*c))
def test_difference_kernel_matches_f64(case):
    b, c, t, latent, per_image, kind, cand = case
    x, mu, sigma = make_bank(b, c, t, latent, per_image=per_image, sigma_kind=kind)
    ci = torch.randint(0, c, (b, 3), generator=torch.Generator().manual_seed(1)) if cand else None
    got = M.mixture_lse_diff(x, mu, sigma, ci)
    want = lse_f64(x, mu, sigma, ci)
    # torch's fp32 difference form (the reference run in fp32) is the yardstick.
    torch32 = R.mixture_log_likelihood(x, mu, sigma, class_index=ci).double() + math.log(t)
    torch_err = (torch32 - want).abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert got.dtype == torch.float32
    assert err <= 2 * torch_err + _floor(want), (err, torch_err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_difference_kernel_input_dtypes(dtype):
    x, mu, sigma = make_bank(3, 4, 5, (9,), per_image=True, sigma_kind="t")
    x, mu, sigma = x.to(dtype), mu.to(dtype), sigma.to(dtype)
    got = M.mixture_lse_diff(x, mu, sigma, None)
    want = lse_f64(x, mu, sigma)  # the same rounded inputs, in float64
    assert got.dtype == (F64 if dtype == F64 else torch.float32)
    tol = 1e-12 * want.abs().max().item() if dtype == F64 else _floor(want)
    assert (got.double() - want).abs().max().item() <= tol


GEMM_CASES = [
    (1, 1, 1, (1,), "c_t"),
    (5, 3, 75, (37,), "c_t"),
    (17, 7, 3, (2, 9), "t"),
    (4, 2, 33, (16,), "diag"),
]


@pytest.mark.parametrize("precision", ["tf32x3", "tf32", "bf16"])
@pytest.mark.parametrize("case", GEMM_CASES, ids=lambda c: "B{}C{}T{}L{}-{}".format(*c))
def test_gemm_kernel_within_2x_torch_same_precision(case, precision):
    b, c, t, latent, kind = case
    x, mu, sigma = make_bank(b, c, t, latent, sigma_kind=kind)
    got = M.mixture_lse_gemm(x, mu, sigma, precision)
    want = lse_f64(x, mu, sigma)
    torch_prec = "ieee" if precision == "tf32x3" else precision
    torch_err = (torch_gemm_form_lse(x, mu, sigma, torch_prec).double() - want).abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert err <= 2 * torch_err + _floor(want), (err, torch_err)


def test_gemm_precision_modes_are_distinct():
    # A test that cannot fail is a defect: the modes must actually change the arithmetic.
    x, mu, sigma = make_bank(5, 3, 20, (64,))
    want = lse_f64(x, mu, sigma)
    errs = {
        p: (M.mixture_lse_gemm(x, mu, sigma, p, M.gemm_operands(mu, sigma, p)).double() - want)
        .abs()
        .max()
        .item()
        for p in ("tf32x3", "tf32", "bf16")
    }
    assert errs["tf32x3"] < errs["tf32"] / 10 < errs["bf16"] / 10, errs


def test_hard_regime_x_near_a_mean_small_sigma():
    """ieee (difference form) stays exact near a mean with sigma = 1e-3; the GEMM modes do not.

    Measured here (D=256, sigma=1e-3, interpreter): see docs/NUMERICS.md.
    """
    g = torch.Generator().manual_seed(4)
    _, mu, _ = make_bank(3, 4, 6, (256,))
    cls, steps = torch.tensor([0, 2, 3]), torch.tensor([5, 1, 0])
    x = mu[cls, steps] + 1e-3 * torch.randn(3, 256, generator=g)
    sigma = torch.full((4, 6), 1e-3)
    want = lse_f64(x, mu, sigma)[torch.arange(3), cls]
    got = M.mixture_lse(x, mu, sigma, None, precision="ieee")[torch.arange(3), cls].double()
    ref32 = R.mixture_log_likelihood(x, mu, sigma)[torch.arange(3), cls].double() + math.log(6)
    err, err_ref32 = (got - want).abs().max().item(), (ref32 - want).abs().max().item()
    assert err <= 2 * err_ref32 + _floor(want), (err, err_ref32)
    err_tf32x3 = (
        (
            M.mixture_lse(x, mu, sigma, None, precision="tf32x3")[torch.arange(3), cls].double()
            - want
        )
        .abs()
        .max()
        .item()
    )
    assert err_tf32x3 > 100 * err  # why "ieee" (not a GEMM mode) is the default


@pytest.mark.parametrize(
    "layout", [(False, "c_t", None), (True, "diag", None), (False, "t", "cand")]
)
def test_public_api_triton_backend_forward_and_backward(layout):
    per_image, kind, cand = layout
    x, mu, sigma = make_bank(3, 4, 5, (6,), per_image=per_image, sigma_kind=kind)
    ci = torch.tensor([[0, 3], [2, 2], [1, 0]]) if cand else None
    xs = [t.double().requires_grad_() for t in (x, mu, sigma)]
    want = R.mixture_log_likelihood(*xs, class_index=ci)
    want.sum().backward()
    xt = [t.clone().requires_grad_() for t in (x, mu, sigma)]
    got = G.mixture_log_likelihood(*xt, class_index=ci, backend="triton")
    got.sum().backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-4)
    for a, w in zip(xt, xs):
        torch.testing.assert_close(a.grad.double(), w.grad, rtol=1e-4, atol=1e-4)


# The large-shape GPU checks (past 2^31 values, every row) are in tests/test_gpu_large.py.


@pytest.mark.parametrize("precision", ["tf32x3", "tf32", "bf16"])
@pytest.mark.parametrize("kind", ["c_t", "diag"])
def test_gemm_operands_prepared_in_row_chunks(monkeypatch, kind, precision):
    # The float64 preparation runs over chunks of rows (bounded temporaries at ImageNet scale):
    # 2-row chunks of a 15-row bank give the one-chunk operands bitwise (tf32x3 with its split
    # form's parts, which tf32_parts makes in chunks too).
    _, mu, sigma = make_bank(2, 3, 5, (7,), sigma_kind=kind)
    split = precision == "tf32x3"
    whole = M.gemm_operands(mu, sigma, precision, split=split)
    monkeypatch.setattr(M, "PREP_CHUNK_VALUES", 14)
    chunked = M.gemm_operands(mu, sigma, precision, split=split)
    for name, a, b in zip(whole._fields, whole, chunked):
        assert (a is None and b is None and not split) or torch.equal(a, b), name


# ------------------------------------------------------------------------------------------------
# The GEMM kernel's N tiles: classes straddling tile edges, the carried log-sum-exp state
# ------------------------------------------------------------------------------------------------


def _flat_bank(b, c, t, d, seed=0):
    """Means close together and sigma ~ 2: every step of a class carries weight, so a row left
    out of (or counted twice in) a class's log-sum-exp moves it by >= ~1/T nats."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g)
    mu = 0.3 * torch.randn(c, t, d, generator=g)
    sigma = 2.0 + torch.rand(c, t, generator=g)
    return x, mu, sigma


TILE = M.GEMM_CONFIGS[0]  # BLOCK_N = 128
STRADDLE_CASES = [
    # (C, T, classes per program, config): what the tile edges cut
    pytest.param(5, 75, 5, TILE, id="T75-classes-straddle-128-row-tiles"),
    pytest.param(3, 128, 3, TILE, id="one-class-per-tile"),
    pytest.param(2, 300, 2, TILE, id="a-class-spans-3-tiles"),
    pytest.param(50, 3, 50, TILE, id="43-classes-in-a-tile"),
    pytest.param(7, 75, 3, TILE, id="last-program-holds-fewer-classes"),
    pytest.param(4, 40, 4, TILE._replace(BLOCK_N=16, BLOCK_D=16), id="T40-over-16-row-tiles"),
]
# The tile turned (images on the MMA's M side, 64-row N tiles): the same edges, and 20 images over
# two 16-image blocks (the second partial) of a 16 x 16 tile.
TILE_M = next(cfg for cfg in M.GEMM_CONFIGS if cfg.IMAGES_ON_M)  # BLOCK_N = 64
STRADDLE_CASES += [
    pytest.param(5, 75, 5, TILE_M, id="images-on-M-T75-classes-straddle-64-row-tiles"),
    pytest.param(2, 300, 2, TILE_M, id="images-on-M-a-class-spans-5-tiles"),
    pytest.param(50, 3, 50, TILE_M, id="images-on-M-22-classes-in-a-tile"),
    pytest.param(7, 75, 3, TILE_M, id="images-on-M-last-program-holds-fewer-classes"),
    pytest.param(
        4, 40, 4, TILE_M._replace(BLOCK_B=16, BLOCK_N=16, BLOCK_D=16), id="images-on-M-20-images"
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c, t, per_program, config", STRADDLE_CASES)
def test_gemm_kernel_classes_across_tile_edges(c, t, per_program, config, device):
    x, mu, sigma = _flat_bank(20 if config.BLOCK_B == 16 else 3, c, t, 8)
    want = lse_f64(x, mu, sigma)
    torch_err = (torch_gemm_form_lse(x, mu, sigma, "ieee").double() - want).abs().max().item()
    xd, mud, sigd = (a.to(device) for a in (x, mu, sigma))
    got = M.mixture_lse_gemm(
        xd, mud, sigd, "tf32x3", config=config, classes_per_program=per_program
    )
    err = (got.double().cpu() - want).abs().max().item()
    assert err <= 2 * torch_err + _floor(want), (err, torch_err)


@pytest.mark.parametrize(
    "device, precision",
    [("cpu", "bf16")]
    + [pytest.param("cuda", p, marks=pytest.mark.gpu) for p in ("tf32x3", "tf32", "bf16")],
)
@pytest.mark.parametrize("index", range(len(M.GEMM_CONFIGS)))
@pytest.mark.parametrize("kind", ["c_t", "diag"])
def test_every_gemm_config_matches_f64(index, kind, device, precision):
    # D = 37: every config's last D step is masked; T = 75: classes straddle its N tiles. On CUDA
    # every precision (the compiled MMA paths differ: wgmma on sm_90); the interpreter runs bf16.
    x, mu, sigma = make_bank(5, 4, 75, (37,), sigma_kind=kind)
    want = lse_f64(x, mu, sigma)
    ref = "ieee" if precision == "tf32x3" else precision
    torch_err = (torch_gemm_form_lse(x, mu, sigma, ref).double() - want).abs().max().item()
    xd, mud, sigd = (a.to(device) for a in (x, mu, sigma))
    got = M.mixture_lse_gemm(
        xd, mud, sigd, precision, config=M.GEMM_CONFIGS[index], classes_per_program=4
    )
    err = (got.double().cpu() - want).abs().max().item()
    assert err <= 2 * torch_err + _floor(want), (err, torch_err)


_SPLIT_SHAPES = {"T75": (11, 75), "T3": (40, 3), "T100": (9, 100)}
# On the CPU the epilogue (the interpreter's time) does not depend on the precision, nor the
# product (torch's) on T: bf16 runs every T, tf32 and tf32x3 run T = 75. On CUDA every pair.
_SPLIT_CASES = [
    pytest.param("cpu", p, *shape, id=f"{name}-cpu-{p}")
    for p in ("bf16", "tf32", "tf32x3")
    for name, shape in _SPLIT_SHAPES.items()
    if p == "bf16" or name == "T75"
] + [
    pytest.param("cuda", p, *shape, id=f"{name}-cuda-{p}", marks=pytest.mark.gpu)
    for p in ("tf32x3", "tf32", "bf16")
    for name, shape in _SPLIT_SHAPES.items()
]


@pytest.mark.parametrize("device, precision, c, t", _SPLIT_CASES)
@pytest.mark.parametrize("kind", ["c_t", "diag"])
def test_split_gemm_form_matches_f64(c, t, kind, device, precision, monkeypatch):
    # The library product, then _gemm_lse_kernel: 19 images over image blocks of 16 (the last
    # partial), C = 11 over class blocks of 8 (T = 75; T = 3 packs up to 8 classes of 4 masked
    # steps per program), D = 37, and acc chunked 7 images at a time. A non-finite image and a
    # non-finite bank class go through the redo as in the fused form. tf32x3 (two tf32 products
    # over hi / lo parts) is held to the fp32 GEMM form's error: one lost lo product is tf32's.
    monkeypatch.setattr(M, "SPLIT_CHUNK_VALUES", 7 * c * t)
    x, mu, sigma = make_bank(19, c, t, (37,), sigma_kind=kind)
    x[3, 5] = math.inf
    mu[2, 1, 0] = math.nan
    want = lse_f64(x, mu, sigma)
    good = torch.isfinite(want)
    assert torch.isnan(want[:, 2]).all() and torch.isneginf(want[3, 3:]).all()
    ref = "ieee" if precision == "tf32x3" else precision
    torch_err = (torch_gemm_form_lse(x, mu, sigma, ref).double() - want)[good].abs().max().item()
    xd, mud, sigd = (a.to(device) for a in (x, mu, sigma))
    got = M.mixture_lse_gemm(xd, mud, sigd, precision, config=M.SPLIT_CONFIG).double().cpu()
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    err = (got - want)[good].abs().max().item()
    assert err <= 2 * torch_err + _floor(want[good]), (err, torch_err)


def test_split_gemm_form_limits():
    x, mu, sigma = make_bank(2, 2, 5, (6,))
    ops = M.gemm_operands(mu, sigma, "tf32x3")
    with pytest.raises(ValueError, match="the split GEMM form runs bf16, tf32, tf32x3, got"):
        M.mixture_lse_split(x, x.square().sum(-1), ops, 2, 5, "ieee")
    with pytest.raises(ValueError, match=r"needs operands.split \(gemm_operands"):
        M.mixture_lse_split(M.tf32_parts(x, "x"), x.square().sum(-1), ops, 2, 5, "tf32x3")
    with pytest.raises(ValueError, match="side must be 'x' or 'bank', got 3"):
        M.tf32_parts(x, 3)
    with pytest.raises(ValueError, match="split=True: only tf32x3 has a split operand"):
        M.gemm_operands(mu, sigma, "bf16", split=True)
    x, mu, sigma = make_bank(2, 1, M.SPLIT_MAX_BLOCK_T + 1, (4,))
    with pytest.raises(ValueError, match=r"T <= 1024, got B=2, C=1, T=1025"):
        M.mixture_lse_gemm(x, mu, sigma, "bf16", config=M.SPLIT_CONFIG)


def test_gemm_classes_per_program_model():
    # The docstring's ImageNet case: 128 programs of 32 classes (25 full tiles each), one wave.
    assert M.gemm_classes_per_program(1000, 100, 128, 4, 132) == 32
    # A small problem is one wave whatever the count: one class per program, its fewest tiles.
    assert M.gemm_classes_per_program(5, 75, 128, 1, 132) == 1
    # 300 rows at 2 classes per program fill 3 tiles of 128 exactly as well as 1: fewer programs
    # do not help, the count stays 1.
    assert M.gemm_classes_per_program(2, 300, 128, 1, 132) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("precision", ["tf32x3", "tf32", "bf16"])
def test_isotropic_operand_kernel_matches_torch_bitwise(precision, dtype, device):
    # One pass writes the operand (torch's cast to bf16 / tf32 rounding, bit for bit, across the
    # whole float range, inf included) and the float64 row norms; a view in the operand's dtype
    # is its own operand. D = 1100 spans two BLOCK_D steps with a tail.
    g = torch.Generator().manual_seed(5)
    mu = (torch.randn(40, 1100, generator=g) * torch.logspace(-20, 20, 1100)).to(dtype)
    mu[0, :2] = torch.tensor([math.inf, -math.inf])
    padded = torch.randn(40, 1200, generator=g).to(dtype)[:, :1100]  # rows 1200 apart
    strided = torch.randn(40, 2200, generator=g).to(dtype)[:, ::2]  # D not unit-stride
    for bank_in in (mu, padded, strided):
        bank, mm, _ = M._isotropic_operand(bank_in.to(device), precision)
        want = _round_operand(bank_in.float(), precision)
        if precision == "bf16":
            want = bank_in.to(torch.bfloat16)  # straight from mu: one rounding
        assert bank.dtype == M.GEMM_OPERAND_DTYPES[precision]
        assert torch.equal(bank.cpu(), want.to(bank.dtype))
    # Row norms: every value of the row (both D steps, the tail) in, rounded once to fp32.
    normal = (torch.randn(40, 1100, generator=g) * 3).to(dtype)
    _, mm, _ = M._isotropic_operand(normal.to(device), precision)
    norms = normal.double().square().sum(-1)
    torch.testing.assert_close(mm.cpu(), norms.float(), rtol=2**-23, atol=0)
    mu_dev = mu.to(device)
    own, _, _ = M._isotropic_operand(mu_dev, precision)
    is_own = precision != "tf32" and dtype == M.GEMM_OPERAND_DTYPES[precision]
    assert (own.data_ptr() == mu_dev.data_ptr()) == is_own  # a view exactly where no copy is due


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tf32_parts_split_each_value_exactly(dtype, device):
    # The split tf32x3 form's operands: hi rounded to nearest tf32 (13 low bits clear), lo = v -
    # hi exactly (hi + lo == v in float64), laid out [hi | lo] (images) or [lo | hi] (bank);
    # the operand kernel's pass writes the torch function's values bit for bit, with the same
    # operand and row norms as without parts. D = 1100: two BLOCK_D steps with a tail.
    g = torch.Generator().manual_seed(7)
    a = (torch.randn(30, 1100, generator=g) * torch.logspace(-20, 20, 1100)).to(dtype)
    d = a.shape[1]
    for side in ("x", "bank"):
        got = M.tf32_parts(a.to(device), side).cpu()
        assert got.shape == (30, 2 * d) and got.dtype == torch.float32
        hi, lo = (got[:, :d], got[:, d:]) if side == "x" else (got[:, d:], got[:, :d])
        assert torch.equal(hi, _round_operand(a.float(), "tf32"))
        assert torch.equal(hi.double() + lo.double(), a.double())
        assert (lo.abs() <= hi.abs() * 2**-11).all()  # lo is at most half a tf32 ulp of hi
        bank, mm, kernel_parts = M._isotropic_operand(a.to(device), "tf32x3", side)
        plain, plain_mm, none = M._isotropic_operand(a.to(device), "tf32x3")
        assert none is None
        assert torch.equal(kernel_parts.cpu(), got)
        assert torch.equal(bank.cpu(), plain.cpu()) and torch.equal(mm.cpu(), plain_mm.cpu())


@pytest.mark.parametrize("kind", ["c_t", "diag"])
def test_gemm_operands_split_for_tf32x3(kind):
    # gemm_operands(..., split=True) adds the bank's [lo | hi] parts (the isotropic bank in the
    # operand kernel's pass, the diagonal one from its [mu/sigma^2, 1/sigma^2] rows) and leaves
    # the fused kernel's operands as they were.
    _, mu, sigma = make_bank(2, 3, 5, (7,), sigma_kind=kind)
    plain = M.gemm_operands(mu, sigma, "tf32x3")
    split = M.gemm_operands(mu, sigma, "tf32x3", split=True)
    assert plain.split is None
    for a, b in zip(plain[:4], split[:4]):
        assert torch.equal(a, b)
    assert torch.equal(split.split, M.tf32_parts(plain.bank, "bank"))


def test_split_tf32x3_sums_the_small_products_apart():
    # Near a mean at sigma = 1e-3 the GEMM form's error is the fp32 rounding of x.mu (docs/
    # NUMERICS.md: 95 nats for the fused tf32x3 kernel and torch's fp32 GEMM form). The split
    # form adds the small products x_hi.lo + x_lo.hi, summed in their own GEMM, once to the big
    # one; added into the big sum term by term ([x_hi | x_hi | x_lo] against [hi | lo | hi] in
    # one product) it measured 220 nats on this case.
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 8, 1024, generator=g)
    cls, steps = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 3, 5, 7])
    x = mu[cls, steps] + 1e-3 * torch.randn(4, 1024, generator=g)
    sigma = torch.full((4, 8), 1e-3)
    rows = torch.arange(4)
    want = R.mixture_log_likelihood(x.double(), mu.double(), sigma.double())[rows, cls]
    lt = math.log(8)
    fp32 = torch_gemm_form_lse(x, mu, sigma, "ieee")[rows, cls] - lt
    fp32 = (fp32.double() - want).abs().max()
    split = M.mixture_lse_gemm(x, mu, sigma, "tf32x3", config=M.SPLIT_CONFIG)[rows, cls] - lt
    err = (split.double() - want).abs().max()
    assert err <= 1.5 * fp32, (err.item(), fp32.item())


@pytest.mark.parametrize("kind", ["c_t", "diag"])
def test_gemm_operands_in_the_dot_dtype_made_once(kind):
    _, mu, sigma = make_bank(2, 3, 5, (7,), sigma_kind=kind)
    mu_before = mu.clone()
    tf32 = M.gemm_operands(mu, sigma, "tf32")
    bf16 = M.gemm_operands(mu, sigma, "bf16")
    exact = M.gemm_operands(mu, sigma, "tf32x3")
    assert torch.equal(mu, mu_before)  # rounding in place never reaches the caller's bank
    for ops in (tf32, bf16, exact):
        assert ops.bank.is_contiguous() and ops.bank.shape == (15, 7 if kind == "c_t" else 14)
    # tf32: the fp32 operands rounded to nearest tf32 (not truncated), 13 low bits clear.
    a, r = exact.bank, tf32.bank
    assert r.dtype == torch.float32 and bf16.bank.dtype == torch.bfloat16
    assert not (r.view(torch.int32) & 0x1FFF).any()
    assert torch.equal(r, _round_operand(a, "tf32"))
    assert torch.equal(bf16.bank, a.bfloat16())
    if kind == "c_t":
        assert exact.bank.data_ptr() == mu.data_ptr()  # an fp32 contiguous bank: no copy
        bank16 = mu.bfloat16()
        assert M.gemm_operands(bank16, sigma, "bf16").bank.data_ptr() == bank16.data_ptr()
    else:  # [mu/sigma^2, 1/sigma^2] per row
        ivar = sigma.reshape(15, 7).double().square().reciprocal()
        want = torch.cat([mu.reshape(15, 7).double() * ivar, ivar], 1).float()
        assert torch.equal(a, want)
    x = torch.randn(2, 7)
    with pytest.raises(ValueError, match="operands: bank is torch.float32, precision 'bf16'"):
        M.mixture_lse_gemm(x, mu, sigma, "bf16", exact)
    with pytest.raises(ValueError, match="precision must be one of"):
        M.gemm_operands(mu, sigma, "ieee")


def test_prepared_bank_keeps_gemm_operands_per_precision():
    # Each precision reads its own operand copy of the bank (bf16; fp32 rounded to tf32; fp32),
    # made once: a snapshot used in several precisions gives what raw tensors give in each.
    x, mu, sigma = make_bank(3, 4, 6, (40,))
    bank = G.prepare_bank(mu, sigma)
    for p in ("tf32x3", "tf32", "bf16", "tf32"):
        got = bank.log_likelihood(x, precision=p, backend="triton")
        want = G.mixture_log_likelihood(x, mu, sigma, precision=p, backend="triton")
        assert torch.equal(got, want), p
    assert sorted(bank._triton_operands) == ["bf16", "tf32", "tf32x3"]


def test_prepared_bank_keeps_the_split_tf32x3_parts_where_they_are_timed(monkeypatch):
    # A tf32x3 snapshot keeps the split form's [lo | hi] parts only where the tuner times that
    # form (CUDA, tuning on): none here. Made to keep them, it holds twice the fp32 bank more,
    # hands them through the op's tensor list, and the split form then reads them: the bank's
    # parts are not remade per call (only the images'), and the result is the raw tensors'.
    from genrep_fast.prepared_bank import PreparedBank

    x, mu, sigma = make_bank(3, 4, 6, (40,))
    cpu = G.prepare_bank(mu, sigma)
    cpu.log_likelihood(x, precision="tf32x3", backend="triton")
    assert cpu._triton_operands["tf32x3"].split is None
    monkeypatch.setattr(PreparedBank, "_split_for", lambda self, precision: precision == "tf32x3")
    monkeypatch.setattr(M, "GEMM_CONFIGS", [])  # the tuner's only candidate: the split form
    bank = G.prepare_bank(mu, sigma)
    made = []
    real = M._isotropic_operand
    monkeypatch.setattr(
        M, "_isotropic_operand", lambda a, p, parts=None: made.append(parts) or real(a, p, parts)
    )
    real_parts = M.tf32_parts
    monkeypatch.setattr(
        M, "tf32_parts", lambda a, parts: made.append(f"torch {parts}") or real_parts(a, parts)
    )
    got = bank.log_likelihood(x, precision="tf32x3", backend="triton")
    assert made == ["bank", "x"]  # the bank's parts once, at preparation; the images' per call
    bank.log_likelihood(x, precision="tf32x3", backend="triton")
    assert made == ["bank", "x", "x"]
    ops = bank._triton_operands["tf32x3"]
    assert torch.equal(ops.split, real_parts(ops.bank, "bank"))
    assert bank.nbytes == cpu.nbytes + ops.split.numel() * 4
    want = G.mixture_log_likelihood(x, mu, sigma, precision="tf32x3", backend="triton")
    assert torch.equal(got, want)


def test_eager_path_skips_the_custom_op_and_matches_it(monkeypatch):
    # Eager calls run the custom ops' bodies through plain autograd.Functions (less host time);
    # they must give the custom op's values and gradients bit for bit, and not dispatch it.
    from genrep_fast import posterior as P

    x, mu, sigma = make_bank(3, 4, 6, (8,), sigma_kind="c_t")
    leaves = [t.clone().requires_grad_() for t in (x, mu, sigma)]
    want = P._mixture_ll_op(*leaves, None, "ieee", "triton", [])
    want_grads = torch.autograd.grad(want.square().sum(), leaves)
    z = torch.randn(3, 4, requires_grad=True)
    want_kl = P._posterior_kl_op(z, want.detach(), None)[0]
    (want_gz,) = torch.autograd.grad(want_kl.sum(), [z])

    def refuse(*args, **kwargs):
        raise AssertionError("an eager call dispatched the custom op")

    monkeypatch.setattr(P, "_mixture_ll_op", refuse)
    monkeypatch.setattr(P, "_posterior_kl_op", refuse)
    got = G.mixture_log_likelihood(*leaves, backend="triton")
    got_grads = torch.autograd.grad(got.square().sum(), leaves)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
    got_kl = G.posterior_kl_loss(z, got.detach(), reduction="none", backend="triton")
    (got_gz,) = torch.autograd.grad(got_kl.sum(), [z])
    assert torch.equal(got_kl, want_kl) and torch.equal(got_gz, want_gz)
