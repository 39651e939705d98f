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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_low_precision_within_twice_torch_error(dtype, layout):
    b, c, t, d = 3, 5, 75, 300
    per_image, kind, k = layout
    x, mu, sigma, cls = make_bank(b, c, t, d, per_image=per_image, sigma_kind=kind, k=k, seed=1)
    x, mu, sigma = (a.to(dtype) for a in (x, mu, sigma))
    grad = torch.randn(b, c if k is None else k, dtype=F64)
    exact = reference_grads(x, mu, sigma, cls, grad)
    torch_lp = reference_grads(x, mu, sigma, cls, grad, dtype=dtype)
    got = ext_grads(x, mu, sigma, cls, grad.float())
    assert got[0].dtype == torch.float32
    for name, e, tl, g_ in zip(("ll", "grad_x", "grad_mu", "grad_sigma"), exact, torch_lp, got):
        assert g_.dtype == tl.dtype, name
        # bf16 gradients are rounded to bf16 like the reference's: allow their ulp at the scale.
        ulp = 2.0 ** -(7 if g_.dtype == torch.bfloat16 else 23) * e.abs().max().item()
        assert max_err(g_, e) <= 2 * max_err(tl, e) + 2 * ulp, name


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
