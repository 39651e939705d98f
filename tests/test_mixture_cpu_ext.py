"""The C++ CPU kernels of the mixture likelihood's difference form (csrc/mixture_cpu.cpp):
``genrep_fast::mixture_ll_diff`` and its backward, against the float64 reference.

Tolerance for float32 / bfloat16 inputs (flash-attention's idiom): the kernel's error against the
float64 reference on the same (rounded) inputs is at most 2x that of the eager reference computed
in float32, plus a few ulps of the result's scale.
"""

from __future__ import annotations

import math

import pytest
import torch

import genrep_fast as G
from genrep_fast import _ops, mixture_cpp, mixture_torch
from genrep_fast import reference as R

pytestmark = pytest.mark.skipif(
    not _ops.HAS_MIXTURE_CPU_OPS, reason="extension built without the mixture CPU kernels"
)

F64 = torch.float64
OP = torch.ops.genrep_fast.mixture_ll_diff
OP_BWD = torch.ops.genrep_fast.mixture_ll_diff_backward


def make_bank(b, c, t, d, *, per_image, sigma_kind, k=None, seed=0, repeat=False):
    """float64 ``x [B, D]``, bank, sigma of the named kind and optional ``class_index [B, K]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=F64)
    lead = (b, c, t) if per_image else (c, t)
    mu = torch.randn(*lead, d, generator=g, dtype=F64)
    shapes = {"t": (t,), "c_t": (c, t), "b_c_t": (b, c, t), "diag": tuple(mu.shape)}
    sigma = 0.5 + torch.rand(shapes[sigma_kind], generator=g, dtype=F64)
    cls = None
    if k is not None:
        cls = torch.randint(0, c, (b, k), generator=g)
        if repeat and k >= 2:
            cls[:, 1] = cls[:, 0]  # the same class twice in every row
            cls[-1] = cls[0]  # and the same candidates in two rows
    return x, mu, sigma, cls


def reference_grads(x, mu, sigma, cls, grad, dtype=F64):
    """Output and gradients of the eager reference computed in ``dtype``'s compute precision."""
    xs, ms, ss = (a.to(dtype).detach().requires_grad_() for a in (x, mu, sigma))
    out = R.mixture_log_likelihood(xs, ms, ss, class_index=cls)
    out.backward(grad.to(out.dtype))
    return out.detach(), xs.grad, ms.grad, ss.grad


def ext_grads(x, mu, sigma, cls, grad, needs=(True, True, True)):
    """Output and gradients of the kernels, through genrep_fast.mixture_cpp."""
    out = mixture_cpp.forward(x, mu, sigma, cls)
    grads = mixture_cpp.backward(grad, x, mu, sigma, cls, needs)
    return (out, *grads)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


CASES = [
    # (B, C, T, D)
    (1, 1, 1, 1),
    (3, 7, 75, 5),
    (2, 1, 4, 9),
    (4, 7, 1, 18),
    (5, 3, 6, 17),
    (2, 2, 3, 4096),
]
LAYOUTS = [
    # (per_image, sigma_kind, K or None)
    (True, "t", None),
    (True, "c_t", None),
    (True, "b_c_t", None),
    (True, "diag", None),
    (True, "c_t", 3),
    (True, "diag", 2),
    (False, "t", 3),
    (False, "c_t", 1),
    (False, "diag", 4),
]


def _layout_id(p):
    return ("img" if p[0] else "shared") + f"-{p[1]}" + ("" if p[2] is None else f"-K{p[2]}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}C{}T{}D{}".format(*c))
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_float64_matches_reference(case, layout):
    b, c, t, d = case
    per_image, kind, k = layout
    x, mu, sigma, cls = make_bank(b, c, t, d, per_image=per_image, sigma_kind=kind, k=k)
    grad = torch.randn(b, c if k is None else k, dtype=F64)
    want = reference_grads(x, mu, sigma, cls, grad)
    got = ext_grads(x, mu, sigma, cls, grad)
    for name, w, g_ in zip(("ll", "grad_x", "grad_mu", "grad_sigma"), want, got):
        assert g_.dtype == w.dtype and g_.shape == w.shape, name
        scale = max(1.0, w.abs().max().item())
        assert max_err(g_, w) <= 1e-11 * scale, name


U32 = 2.0**-24  # unit roundoff of the kernels' float32 accumulation


def gamma(n: int) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n float32 roundings in a
    row (a sum of n terms in any order is off by at most gamma_{n-1} * the sum of their |values|)."""
    return n * U32 / (1 - n * U32)


def fp32_error_bounds(x, mu, sigma, cls, grad):
    """Per-element bounds on the error of ``(ll, grad_x, grad_mu, grad_sigma)`` computed with
    float32 accumulation from these (already rounded) inputs, to first order in u.

    A score ``s = -1/2 sum_d q_d - log-det - D/2 log 2 pi`` (``q_d = (x_d - mu_d)^2 / sigma_d^2``)
    is a sum of D + 2 terms, each off by a few roundings: ``|ds| <= gamma_{D+4} * S`` with S the
    sum of their |values|. ``ll = logsumexp_t s - log T`` is off by at most the worst step's
    ``|ds|`` plus the LSE's own roundings, ``gamma_{T+4} * (|lse| + log T)``. A weight
    ``w = exp(s - lse)`` is off by ``w * (2 max_t |ds| + a few u)``; every gradient is a sum of
    ``g * w * v`` over steps, classes and (shared bank) images, v the step's derivative, so it is
    off by at most ``(2 max |ds| + gamma_n) * sum |g| w |v|`` with n all roundings of one term and
    of the sum. The bound is worst-case (errors of one sign at every rounding): measured over 4
    upstream-gradient seeds and every layout, float32 errors stay below 1/100 of it, bfloat16
    results below 0.45 of theirs (their own rounding to bfloat16 dominates); a kernel fed x
    rounded to float16 (u = 2^-11) exceeds it on every layout.
    """
    x, mu, sigma, grad = (a.double() for a in (x, mu, sigma, grad))
    b, d = x.shape[0], x[0].numel()
    per_image = mu.dim() == x.dim() + 2
    mu4, s4, diag = R._bank_as_bctd(x, mu, sigma, cls)  # [B|1, K, T, D], sigma [B|1, K, T(, D)]
    k, t = mu4.shape[1], mu4.shape[2]
    x4 = x.reshape(b, 1, 1, d)
    diff = x4 - mu4  # [B, K, T, D]
    sig = s4 if diag else s4[..., None]
    ivar = sig.square().reciprocal()
    q = diff.square() * ivar
    log_det = torch.log(s4).abs().sum(-1) if diag else d * torch.log(s4).abs()
    s = R.gaussian_log_density(x4, mu4, s4, diag)  # [B, K, T]
    ds = gamma(d + 4) * (0.5 * q.sum(-1) + log_det + 0.5 * d * R.LOG_2PI).amax(-1)  # [B, K]
    lse = torch.logsumexp(s, -1)
    ll = ds + gamma(t + 4) * (lse.abs() + math.log(t))
    rel = 2 * ds + gamma(b * k * t + d + 8)  # relative error of g * w * v, summed
    # A weight below float32's normal range (exp(s - lse) < 2^-126) is off by up to 2^-126
    # absolute (subnormal or flushed to 0): the relative bound does not hold there.
    gw = grad.abs()[..., None] * (rel[..., None] * torch.softmax(s, -1) + 2.0**-126)  # [B, K, T]
    gx = (gw[..., None] * diff.abs() * ivar).sum((1, 2)).reshape(x.shape)
    # Scatter the per-step terms to the bank's entries (candidates and shared rows accumulate).
    cls_ = torch.arange(k).expand(b, k) if cls is None else cls
    rows = torch.arange(b)[:, None].expand(b, k) if per_image else torch.zeros_like(cls_)
    c = mu.shape[1] if per_image else mu.shape[0]

    def to_bank(terms):  # [B, K, T, ...] -> [B or 1, C, T, ...]
        out = terms.new_zeros((b if per_image else 1, c, *terms.shape[2:]))
        return out.index_put_((rows, cls_), terms, accumulate=True)

    gmu = to_bank(gw[..., None] * diff.abs() * ivar).reshape(mu.shape)
    if diag:  # ds/dsigma_d = (q_d - 1) / sigma_d
        gsig = to_bank(gw[..., None] * (q + 1) / sig).reshape(sigma.shape)
    else:  # ds/dsigma = (sum_d q_d - D) / sigma
        gsig = to_bank(gw * (q.sum(-1) + d) / s4)
        gsig = R.sum_to_sigma_shape(gsig if per_image else gsig[0], sigma)
    return ll, gx, gmu, gsig


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"]
)
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_low_precision_within_the_float32_error_bound(dtype, layout):
    b, c, t, d = 3, 5, 75, 300
    per_image, kind, k = layout
    x, mu, sigma, cls = make_bank(b, c, t, d, per_image=per_image, sigma_kind=kind, k=k, seed=1)
    x, mu, sigma = (a.to(dtype) for a in (x, mu, sigma))
    grad = torch.randn(b, c if k is None else k, dtype=F64).float()
    exact = reference_grads(x, mu, sigma, cls, grad)
    got = ext_grads(x, mu, sigma, cls, grad)
    bounds = fp32_error_bounds(x, mu, sigma, cls, grad)
    assert got[0].dtype == torch.float32
    for name, e, g_, bound in zip(("ll", "grad_x", "grad_mu", "grad_sigma"), exact, got, bounds):
        assert g_.dtype == (torch.float32 if name == "ll" else dtype), name
        # The result is stored in its dtype: one more rounding of the (bounded) float32 value,
        # relative, or below the normal range absolute (the subnormal spacing: 2^-133 in bf16).
        # (float16: 2^-11 relative, 2^-24 its subnormal spacing.)
        out_u, out_abs = {
            torch.bfloat16: (2.0**-8, 2.0**-133),
            torch.float16: (2.0**-11, 2.0**-24),
        }.get(g_.dtype, (U32, 2.0**-149))
        tol = (1 + out_u) * bound + out_u * e.abs() + out_abs
        err = (g_.double() - e).abs()
        assert (err <= tol).all(), (name, (err - tol).max().item(), (err / tol).nan_to_num().max())


@pytest.mark.parametrize("per_image", [True, False], ids=["img", "shared"])
@pytest.mark.parametrize("kind", ["c_t", "diag"])
def test_repeated_candidates_accumulate(per_image, kind):
    x, mu, sigma, cls = make_bank(
        4, 5, 6, 7, per_image=per_image, sigma_kind=kind, k=3, repeat=True
    )
    grad = torch.randn(4, 3, dtype=F64)
    want = reference_grads(x, mu, sigma, cls, grad)
    got = ext_grads(x, mu, sigma, cls, grad)
    for w, g_ in zip(want, got):
        torch.testing.assert_close(g_, w, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("kind", ["t", "diag"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_x_on_a_mean_small_sigma(kind, dtype):
    """x equal to one mean, sigma 1e-3: one component dominates by ~1e6 nats."""
    b, c, t, d = 2, 3, 5, 64
    x, mu, sigma, _ = make_bank(b, c, t, d, per_image=True, sigma_kind=kind)
    mu[:, :, 2] = x[:, None, :]
    sigma = torch.full_like(sigma, 1e-3)
    if kind == "diag":
        sigma = sigma * (1 + torch.rand_like(sigma))  # 1e-3 .. 2e-3
    x, mu, sigma = (a.to(dtype) for a in (x, mu, sigma))
    grad = torch.randn(b, c, dtype=F64)
    exact = reference_grads(x, mu, sigma, None, grad)
    torch_lp = reference_grads(x, mu, sigma, None, grad, dtype=dtype)
    got = ext_grads(x, mu, sigma, None, grad.to(dtype))
    for name, e, tl, g_ in zip(("ll", "grad_x", "grad_mu", "grad_sigma"), exact, torch_lp, got):
        tol = 2 * max_err(tl, e) + 1e-12 * max(1.0, e.abs().max().item())
        assert max_err(g_, e) <= tol, name


@pytest.mark.parametrize("kind", ["c_t", "diag"])
def test_log_density_minus_1e7(kind):
    """Far from every mean: log-densities around -1e7, weights still normalised (grad_x finite and
    accurate), as the weights come from the recomputed scores, not from the rounded output."""
    b, c, t, d = 2, 3, 10, 256
    x, mu, sigma, _ = make_bank(b, c, t, d, per_image=True, sigma_kind=kind, seed=3)
    mu = mu + 4.0 * torch.randn(mu.shape[:3] + (1,), dtype=F64)  # T spread-out components
    sigma = sigma * 0.01
    exact = reference_grads(x, mu, sigma, None, torch.ones(b, c, dtype=F64))
    assert -3e7 < exact[0].max().item() < -1e6
    xf, mf, sf = (a.float() for a in (x, mu, sigma))
    torch_lp = reference_grads(xf, mf, sf, None, torch.ones(b, c))
    got = ext_grads(xf, mf, sf, None, torch.ones(b, c))
    for name, e, tl, g_ in zip(("ll", "grad_x", "grad_mu", "grad_sigma"), exact, torch_lp, got):
        assert torch.isfinite(g_).all(), name
        assert max_err(g_, e) <= 2 * max_err(tl, e) + 1e-6 * e.abs().max().item(), name


def test_only_requested_gradients():
    x, mu, sigma, cls = make_bank(2, 3, 4, 5, per_image=False, sigma_kind="t", k=2)
    grad = torch.randn(2, 2, dtype=F64)
    full = ext_grads(x, mu, sigma, cls, grad)
    for needs in [(True, False, False), (False, True, False), (False, False, True)]:
        got = mixture_cpp.backward(grad, x, mu, sigma, cls, needs)
        for want, g_, need in zip(full[1:], got, needs):
            assert (g_ is None) == (not need)
            if need:
                assert torch.equal(g_, want)


def test_public_api_autograd_and_strided_bank():
    """G.mixture_log_likelihood(backend="cpp") runs the kernels, also for a non-contiguous mu."""
    b, c, t, d = 3, 4, 5, 6
    x, mu, sigma, _ = make_bank(b, c, t, d, per_image=True, sigma_kind="b_c_t", seed=5)
    mu_strided = mu.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    assert not mu_strided.is_contiguous()
    grad = torch.randn(b, c, dtype=F64)
    want = reference_grads(x, mu, sigma, None, grad)

    def fn(xs, ms, ss):
        return G.mixture_log_likelihood(xs, ms, ss, backend="cpp")

    xs, ms, ss = (a.detach().clone().requires_grad_() for a in (x, mu_strided, sigma))
    out = fn(xs, ms, ss)
    out.backward(grad)
    for w, g_ in zip(want, (out, xs.grad, ms.grad, ss.grad)):
        torch.testing.assert_close(g_, w, rtol=1e-11, atol=1e-11)
    assert torch.autograd.gradcheck(fn, (xs, ms, ss))


def test_torch_code_agrees():
    x, mu, sigma, cls = make_bank(3, 4, 5, 33, per_image=True, sigma_kind="diag", k=2)
    grad = torch.randn(3, 2, dtype=F64)
    got = ext_grads(x, mu, sigma, cls, grad)
    want = (mixture_torch.forward(x, mu, sigma, cls),) + mixture_torch.backward(
        grad, x, mu, sigma, cls
    )
    for w, g_ in zip(want, got):
        torch.testing.assert_close(g_, w, rtol=1e-11, atol=1e-11)


def test_auto_dispatch_layouts(monkeypatch):
    """backend="auto" on CPU: the C++ kernels for candidates and a per-image bank, the torch
    GEMM form for a shared bank without candidates (each call counted)."""
    calls = []
    for mod in (mixture_cpp, mixture_torch):
        real = mod.forward
        monkeypatch.setattr(
            mod, "forward", lambda *a, _r=real, _m=mod, **k: calls.append(_m) or _r(*a, **k)
        )
    x, mu, sigma, cls = make_bank(2, 3, 4, 5, per_image=False, sigma_kind="t", k=2)
    G.mixture_log_likelihood(x, mu, sigma, class_index=cls)
    G.mixture_log_likelihood(x, mu, sigma)  # shared bank: GEMM form
    x, mu, sigma, _ = make_bank(2, 3, 4, 5, per_image=True, sigma_kind="t")
    G.mixture_log_likelihood(x, mu, sigma)
    assert calls == [mixture_cpp, mixture_torch, mixture_cpp]


@pytest.mark.parametrize("d", [5, 300], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@pytest.mark.parametrize("bf16", [False, True], ids=["f16", "bf16"])
def test_16bit_forward_is_the_float32_forward_of_the_same_values(layout, bf16, d):
    """A 16-bit value converts to float exactly, and the kernels accumulate 16-bit inputs in float:
    the forward of fp16 / bf16 inputs is bit for bit the float32 forward of the same values. It
    holds whichever way the rows are converted (fp16 with F16C into a float row, or elementwise),
    so a conversion that rounds, drops subnormals or misses the tail of a row fails here. The bank
    holds a random sample of the fp16 values below 4 in magnitude, both signs, 16 fp16 subnormals
    among them; D = 300 leaves a tail of 4 past the 8-wide conversions, D = 5 is all tail."""
    dtype = torch.bfloat16 if bf16 else torch.float16
    b, c, t = 2, 3, 5
    per_image, kind, k = layout
    x, mu, sigma, cls = make_bank(b, c, t, d, per_image=per_image, sigma_kind=kind, k=k, seed=3)
    patterns = torch.arange(0, 0x4400, dtype=torch.int32).to(torch.int16).view(torch.float16)
    flat = mu.reshape(-1)
    n = min(flat.numel(), patterns.numel())
    flat[:n] = patterns[
        torch.randperm(patterns.numel(), generator=torch.Generator().manual_seed(0))[:n]
    ].double()
    flat[:16] = (
        torch.arange(1, 0x400, 0x40, dtype=torch.int32).to(torch.int16).view(torch.float16)
    )  # subnormals
    flat[n // 2 : n] *= -1
    if kind == "diag":  # some sigma values subnormal in fp16 (their 1 / sigma^2 is finite in float)
        sigma.reshape(-1)[::7] = 2.0**-20
    x16, mu16 = x.to(dtype), mu.to(dtype)
    sig16 = sigma.to(dtype) if kind == "diag" else sigma.float()
    got = mixture_cpp.forward(x16, mu16, sig16, cls)
    want = mixture_cpp.forward(x16.float(), mu16.float(), sig16.float(), cls)
    assert got.dtype == want.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("kind", ["c_t", "diag"])
def test_deterministic_across_calls_and_threads(kind):
    x, mu, sigma, cls = make_bank(6, 5, 20, 300, per_image=False, sigma_kind=kind, k=4, seed=7)
    x, mu, sigma = (a.float() for a in (x, mu, sigma))
    grad = torch.randn(6, 4)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 2):
            torch.set_num_threads(n)
            runs.append(ext_grads(x, mu, sigma, cls, grad))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b_ in zip(runs[0], other):
            assert torch.equal(a, b_)


@pytest.mark.parametrize("kind", ["t", "b_c_t", "diag"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(kind, dtype):
    x, mu, sigma, cls = make_bank(2, 3, 4, 5, per_image=True, sigma_kind=kind, k=2)
    x, mu, sigma = (a.to(dtype) for a in (x, mu, sigma))
    args = mixture_cpp.kernel_args(x, mu, sigma, cls)
    torch.library.opcheck(OP, args)
    torch.library.opcheck(OP, (*args[:3], None))
    grad = torch.randn(2, 2)
    torch.library.opcheck(OP_BWD, (grad, *args, True, True, True))
    torch.library.opcheck(OP_BWD, (grad, *args, False, True, False))


def test_bad_class_index_raises():
    x, mu, sigma, cls = make_bank(2, 3, 4, 5, per_image=True, sigma_kind="t", k=2)
    args = list(mixture_cpp.kernel_args(x, mu, sigma, cls))
    args[3] = torch.tensor([[0, 3], [1, 2]])
    with pytest.raises(ValueError, match="class_index value 3"):
        OP(*args)
    with pytest.raises(ValueError, match="isotropic sigma"):
        OP(args[0], args[1], torch.ones(5, dtype=F64), None)


def test_log_t_offset_and_single_step():
    """T = 1, one value: log p = log N exactly."""
    x = torch.tensor([[0.3]], dtype=F64)
    mu = torch.tensor([[[[1.3]]]], dtype=F64)
    sigma = torch.tensor([2.0], dtype=F64)
    want = -0.5 * (1.0 / 4.0) - math.log(2.0) - 0.5 * math.log(2 * math.pi)
    assert mixture_cpp.forward(x, mu, sigma, None).item() == pytest.approx(want, abs=1e-15)
