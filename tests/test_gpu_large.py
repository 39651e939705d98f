"""Large-shape checks of the Triton mixture kernels: offsets past 2^31 values, every output row
against a float64 reference computed chunk by chunk on the same device.

The check functions take the device and the shape. Tests marked ``gpu`` run them at sizes where
the bank holds more than 2^31 values (int32 offsets would wrap); the unmarked tests run the very
same functions on the CPU at tiny shapes through the Triton interpreter, and show that each check
fails on the defects it names (a dropped ``- log T``, a row read from the wrong offset, a tf32
dot that truncates instead of rounding).

Tolerances follow the suite's idiom: at most 2x the error of torch computing the same form in the
same precision against float64, plus 4 fp32 ulps of the largest result. Each check also asserts
that its tolerance stays below ``log(T) / 2``, so a dropped ``- log T`` can never pass.
"""

from __future__ import annotations

import math

import pytest
import torch

import genrep_fast as G
from genrep_fast.reference import LOG_2PI

F64 = torch.float64
TWO_31 = 2**31


def _floor(want: torch.Tensor) -> float:
    return 4 * torch.finfo(torch.float32).eps * max(1.0, want.abs().max().item())


def _round_tf32(a: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to nearest onto tf32's 10-bit mantissa (what the kernel's tf32 mode does)."""
    bits = a.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _truncate_tf32(a: torch.Tensor) -> torch.Tensor:
    """fp32 truncated onto tf32's mantissa (what a tf32 dot without a rounding conversion does)."""
    bits = a.float().contiguous().view(torch.int32)
    return (bits & ~0x1FFF).view(torch.float32)


def _operands(a: torch.Tensor, precision: str) -> torch.Tensor:
    if precision == "bf16":
        return a.bfloat16().float()
    if precision == "tf32":
        return _round_tf32(a)
    return a.float()


# ------------------------------------------------------------------------------------------------
# Chunked references: [B, C] log p(x|c) of a shared bank, isotropic sigma [C, T]
# ------------------------------------------------------------------------------------------------


def shared_ll_chunked(x, mu, sigma, *, form: str, precision: str = "ieee", chunk: int = 64):
    """``log p(x|c)`` ``[B, C]`` float64 of a shared bank ``mu: [C, T, D]``, ``sigma: [C, T]``,
    classes ``chunk`` at a time on mu's device.

    ``form="f64"``: the reference (float64 GEMM form; its cancellation error, ~1e-16 * D * |x|^2
    / sigma^2 nats, is far below every tolerance here). ``form="diff32"``: torch's fp32 difference
    form. ``form="gemm32"``: torch's fp32 GEMM form with operands rounded like ``precision``
    (tf32 rounded to nearest, bf16), fp32 accumulation, as the Triton GEMM kernel computes it.
    ``form="gemm32_trunc"``: the same with tf32 operands truncated.
    """
    c, t, d = mu.shape
    b = x.shape[0]
    x2 = x.reshape(b, d)
    out = torch.empty(b, c, dtype=F64, device=mu.device)
    for c0 in range(0, c, chunk):
        c1 = min(c, c0 + chunk)
        m = mu[c0:c1].reshape(-1, d)
        sig = sigma[c0:c1].reshape(-1).to(F64)
        if form == "f64":
            xd, md = x2.to(F64), m.to(F64)
            quad = (xd.square().sum(-1)[:, None] - 2 * xd @ md.T + md.square().sum(-1)).clamp_min(0)
        elif form == "diff32":
            quad = torch.stack([(xi.float() - m.float()).square().sum(-1) for xi in x2]).to(F64)
        else:
            rnd = _truncate_tf32 if form == "gemm32_trunc" else (lambda a: _operands(a, precision))
            cross = rnd(x2) @ rnd(m).T
            xx = x2.to(F64).square().sum(-1).float()
            mm = m.to(F64).square().sum(-1).float()
            quad = (xx[:, None] - 2 * cross + mm).clamp_min(0).to(F64)
        s = -0.5 * quad / sig.square() - d * torch.log(sig) - 0.5 * d * LOG_2PI
        out[:, c0:c1] = torch.logsumexp(s.reshape(b, c1 - c0, t), -1) - math.log(t)
    return out


def check_shared_bank(x, mu, sigma, precision: str, *, ll=None) -> dict:
    """Every row of ``mixture_log_likelihood(x, mu, sigma, precision=...)`` (Triton) against the
    float64 reference, within 2x torch's same-form, same-precision error. Returns the errors."""
    if ll is None:
        ll = G.mixture_log_likelihood(x, mu, sigma, precision=precision, backend="triton")
    want = shared_ll_chunked(x, mu, sigma, form="f64")
    form = "diff32" if precision == "ieee" else "gemm32"
    torch_err = (shared_ll_chunked(x, mu, sigma, form=form, precision=precision) - want).abs()
    tol = 2 * torch_err.max().item() + _floor(want)
    assert tol < 0.5 * math.log(mu.shape[1]), f"{precision}: tolerance {tol} admits a dropped log T"
    err = (ll.to(F64) - want).abs()
    assert torch.isfinite(ll).all(), f"{precision}: non-finite values"
    worst = err.max().item()
    assert worst <= tol, (
        f"{precision}: max |error| {worst:.3g} nats > tolerance {tol:.3g} at (b, c) = "
        f"{divmod(int(err.argmax()), err.shape[1])}"
    )
    return {"max_err": worst, "tol": tol}


# ------------------------------------------------------------------------------------------------
# Per-image bank [B, C, T, D], isotropic sigma [T]: forward and backward
# ------------------------------------------------------------------------------------------------


def _per_image_scores(xb, mub, sig, dtype):
    """Scores ``[cc, T]`` of one image against its bank rows ``mub: [cc, T, D]`` in ``dtype``."""
    d = xb.shape[-1]
    sd = sig.to(dtype)
    quad = (xb.to(dtype) - mub.to(dtype)).square().sum(-1)
    return -0.5 * quad / sd.square() - d * torch.log(sd) - 0.5 * d * LOG_2PI, quad


def per_image_ll_chunked(x, mu, sigma, dtype, chunk: int = 100):
    """``log p(x_b|c)`` ``[B, C]`` of a per-image bank in ``dtype`` (float64: the reference)."""
    b, c, t, _ = mu.shape
    out = torch.empty(b, c, dtype=F64, device=mu.device)
    for i in range(b):
        for c0 in range(0, c, chunk):
            s, _ = _per_image_scores(x[i], mu[i, c0 : c0 + chunk], sigma, dtype)
            out[i, c0 : c0 + chunk] = (torch.logsumexp(s, -1) - math.log(t)).to(F64)
    return out


def check_per_image_forward(x, mu, sigma, *, ll=None) -> dict:
    if ll is None:
        ll = G.mixture_log_likelihood(x, mu, sigma, backend="triton")
    want = per_image_ll_chunked(x, mu, sigma, F64)
    torch_err = (per_image_ll_chunked(x, mu, sigma, torch.float32) - want).abs()
    tol = 2 * torch_err.max().item() + _floor(want)
    assert tol < 0.5 * math.log(mu.shape[2]), f"tolerance {tol} admits a dropped log T"
    err = (ll.to(F64) - want).abs()
    worst = err.max().item()
    assert worst <= tol, (
        f"per-image: max |error| {worst:.3g} nats > {tol:.3g} at (b, c) = "
        f"{divmod(int(err.argmax()), err.shape[1])}"
    )
    return {"max_err": worst, "tol": tol}


def check_per_image_backward(x, mu, sigma, grad, *, rtol: float = 1e-2, grads=None) -> dict:
    """``dL/dx`` of every image and ``dL/dmu`` of the last image (the rows furthest into the bank)
    of ``L = sum(grad * ll)`` against float64, within ``rtol`` of the largest gradient value.

    ``rtol = 1e-2``: the scores are fp32 sums of D squares (|s| ~ D, rounded to ~1e-7 |s| each
    step), so the weights exp(s - lse) carry ~1e-3 relative error, and gradients returned in fp16
    round at 2^-11; a row read from a wrong offset is off by O(1) of the largest value."""
    b, c, t, d = mu.shape
    if grads is None:
        xg, mug = x.clone().requires_grad_(), mu.clone().requires_grad_()
        G.mixture_log_likelihood(xg, mug, sigma, backend="triton").backward(grad)
        grads = (xg.grad, mug.grad)
    gx, gmu = grads
    want_x = torch.zeros(b, d, dtype=F64, device=mu.device)
    sig2 = sigma.to(F64).square()
    worst_mu, scale_mu = 0.0, 0.0
    for i in range(b):
        for c0 in range(0, c, 100):
            mub = mu[i, c0 : c0 + 100]
            s, _ = _per_image_scores(x[i], mub, sigma, F64)
            w = torch.softmax(s, -1) * grad[i, c0 : c0 + 100, None].to(F64)  # [cc, T]
            diff = x[i].to(F64) - mub.to(F64)  # [cc, T, D]
            a = (w / sig2)[..., None]
            want_x[i] -= (a * diff).sum((0, 1))
            if i == b - 1:
                want_mu = a * diff
                worst_mu = max(
                    worst_mu, (gmu[i, c0 : c0 + 100].to(F64) - want_mu).abs().max().item()
                )
                scale_mu = max(scale_mu, want_mu.abs().max().item())
    err_x = (gx.to(F64) - want_x).abs().max().item()
    scale_x = want_x.abs().max().item()
    assert err_x <= rtol * scale_x, f"dL/dx: max |error| {err_x:.3g} > {rtol} x {scale_x:.3g}"
    assert worst_mu <= rtol * scale_mu, (
        f"dL/dmu (last image): max |error| {worst_mu:.3g} > {rtol} x {scale_mu:.3g}"
    )
    return {"err_x": err_x / scale_x, "err_mu": worst_mu / scale_mu}


def hard_regime_tf32(x_dev, *, b: int, c: int, t: int, d: int, seed: int = 0):
    """x near a mean (the regime of docs/NUMERICS.md), sigma = 1: ``(x, mu, sigma)``."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(c, t, d, generator=g)
    pick_c, pick_t = torch.arange(b) % c, torch.arange(b) % t
    x = mu[pick_c, pick_t] + 0.1 * torch.randn(b, d, generator=g)
    sigma = torch.ones(c, t)
    return x.to(x_dev), mu.to(x_dev), sigma.to(x_dev)


def check_tf32_rounds(x, mu, sigma, *, ll=None) -> dict:
    """The tf32 mode's error is that of round-to-nearest operands (within 2x), and a truncating
    dot's error is measurably larger than the tolerance (so the check can tell them apart)."""
    if ll is None:
        ll = G.mixture_log_likelihood(x, mu, sigma, precision="tf32", backend="triton")
    want = shared_ll_chunked(x, mu, sigma, form="f64")
    rounded = (shared_ll_chunked(x, mu, sigma, form="gemm32", precision="tf32") - want).abs()
    truncated = (shared_ll_chunked(x, mu, sigma, form="gemm32_trunc") - want).abs()
    tol = 2 * rounded.max().item() + _floor(want)
    assert truncated.max().item() > tol, "truncation and rounding are not distinguishable here"
    worst = (ll.to(F64) - want).abs().max().item()
    assert worst <= tol, (
        f"tf32: max |error| {worst:.3g} > {tol:.3g} (truncation gives {truncated.max().item():.3g})"
    )
    return {"max_err": worst, "tol": tol, "truncated_err": truncated.max().item()}


def _shared_case(device, b, c, t, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g).to(device, dtype)
    mu = torch.empty(c, t, d, dtype=dtype, device=device)
    for c0 in range(0, c, 50):  # filled in chunks: a [C, T, D] fp32 randn at once doubles the peak
        mu[c0 : c0 + 50] = torch.randn(min(50, c - c0), t, d, generator=g).to(device, dtype)
    sigma = (1.5 + torch.rand(c, t, generator=g)).to(device)
    return x, mu, sigma


def _per_image_case(device, b, c, t, d, dtype=torch.float16, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(b, d, generator=g, device=device).to(dtype)
    mu = torch.empty(b, c, t, d, dtype=dtype, device=device)
    for i in range(b):
        mu[i] = torch.randn(c, t, d, generator=g, device=device).to(dtype)
    sigma = torch.ones(t, device=device, dtype=dtype)
    return x, mu, sigma


# ------------------------------------------------------------------------------------------------
# The same checks on the CPU at tiny shapes (Triton interpreter), and the defects they catch
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32", "bf16"])
def test_shared_bank_check_on_cpu(precision):
    x, mu, sigma = _shared_case("cpu", 5, 3, 6, 40)
    check_shared_bank(x, mu, sigma, precision)


def test_shared_bank_check_catches_a_dropped_log_t():
    x, mu, sigma = _shared_case("cpu", 5, 3, 6, 40)
    ll = G.mixture_log_likelihood(x, mu, sigma, backend="triton") + math.log(6)
    with pytest.raises(AssertionError, match="max |error|"):
        check_shared_bank(x, mu, sigma, "ieee", ll=ll)


def test_shared_bank_check_catches_one_wrong_row():
    x, mu, sigma = _shared_case("cpu", 5, 3, 6, 40)
    ll = G.mixture_log_likelihood(x, mu, sigma, backend="triton")
    # The last class read from another class's rows (what a wrapped offset does).
    ll[:, -1] = G.mixture_log_likelihood(x, mu[:1].expand(3, -1, -1), sigma, backend="triton")[
        :, -1
    ]
    with pytest.raises(AssertionError, match=r"\(b, c\) = \(\d, 2\)"):
        check_shared_bank(x, mu, sigma, "ieee", ll=ll)


def test_per_image_checks_on_cpu_and_what_they_catch():
    x, mu, sigma = _per_image_case("cpu", 3, 4, 5, 24, dtype=torch.float32)
    check_per_image_forward(x, mu, sigma)
    grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    check_per_image_backward(x, mu, sigma, grad)
    # A wrong row of the last image (forward) and a wrong dL/dmu row of the last image.
    ll = G.mixture_log_likelihood(x, mu, sigma, backend="triton")
    ll[-1, 1] = ll[0, 1]
    with pytest.raises(AssertionError, match="per-image"):
        check_per_image_forward(x, mu, sigma, ll=ll)
    xg, mug = x.clone().requires_grad_(), mu.clone().requires_grad_()
    G.mixture_log_likelihood(xg, mug, sigma, backend="triton").backward(grad)
    gmu = mug.grad.clone()
    gmu[-1, 2] = gmu[0, 2]
    with pytest.raises(AssertionError, match="dL/dmu"):
        check_per_image_backward(x, mu, sigma, grad, grads=(xg.grad, gmu))


def test_tf32_check_on_cpu_tells_rounding_from_truncation():
    x, mu, sigma = hard_regime_tf32("cpu", b=4, c=2, t=3, d=256)
    out = check_tf32_rounds(x, mu, sigma)  # the interpreter's tf32 mode rounds its operands
    # A truncating dot (emulated in torch) fails the check.
    truncated = shared_ll_chunked(x, mu, sigma, form="gemm32_trunc").float()
    with pytest.raises(AssertionError, match="tf32: max"):
        check_tf32_rounds(x, mu, sigma, ll=truncated)
    assert out["truncated_err"] > out["tol"]


# ------------------------------------------------------------------------------------------------
# On a GPU: past 2^31 values
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32", "bf16"])
def test_gpu_shared_bank_past_2_31_values(precision):
    # C*T*D = 1000 * 100 * 24576 = 2.46e9 values (9.8 GB fp32): row offsets c*T*D + t*D pass 2^31.
    b, c, t, d = 64, 1000, 100, 24576
    assert c * t * d > TWO_31
    x, mu, sigma = _shared_case("cuda", b, c, t, d)
    check_shared_bank(x, mu, sigma, precision)


@pytest.mark.gpu
def test_gpu_per_image_bank_past_2_31_values_forward():
    # B*C*T*D = 16 * 1000 * 75 * 4096 = 4.9e9 values (9.8 GB fp16): images 7.. start past 2^31.
    b, c, t, d = 16, 1000, 75, 4096
    assert b * c * t * d > 2 * TWO_31
    x, mu, sigma = _per_image_case("cuda", b, c, t, d)
    check_per_image_forward(x, mu, sigma)


@pytest.mark.gpu
def test_gpu_per_image_bank_past_2_31_values_backward():
    # 8 * 1000 * 75 * 4096 = 2.46e9 values: the last image's rows (and its dL/dmu) lie past 2^31.
    b, c, t, d = 8, 1000, 75, 4096
    assert (b - 1) * c * t * d > TWO_31
    x, mu, sigma = _per_image_case("cuda", b, c, t, d)
    grad = torch.randn(b, c, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    check_per_image_backward(x, mu, sigma, grad)


@pytest.mark.gpu
def test_gpu_tf32_rounds_to_nearest():
    x, mu, sigma = hard_regime_tf32("cuda", b=64, c=10, t=75, d=4096)
    check_tf32_rounds(x, mu, sigma)
