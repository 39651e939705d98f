"""The Triton mixture kernels (through TRITON_INTERPRET=1 on CPU) against the float64 reference.

Tolerance idiom (flash-attention): a kernel's error against float64 is at most ~2x the error of
torch computing the same form in the same precision, plus a floor of a few fp32 ulps of the result.
"""

from __future__ import annotations

import math

import pytest
import torch
from _mixture_cases import make_bank

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
    ops = M.gemm_operands(mu, sigma)
    errs = {
        p: (M.mixture_lse_gemm(x, mu, sigma, p, ops).double() - want).abs().max().item()
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


@pytest.mark.parametrize("kind", ["c_t", "diag"])
def test_gemm_operands_prepared_in_row_chunks(monkeypatch, kind):
    # The float64 preparation runs over chunks of rows (bounded temporaries at ImageNet scale):
    # 2-row chunks of a 15-row bank give the one-chunk operands bitwise.
    _, mu, sigma = make_bank(2, 3, 5, (7,), sigma_kind=kind)
    whole = M.gemm_operands(mu, sigma)
    monkeypatch.setattr(M, "PREP_CHUNK_VALUES", 14)
    chunked = M.gemm_operands(mu, sigma)
    for name, a, b in zip(whole._fields, whole, chunked):
        assert torch.equal(a, b), name
