"""The chunked torch code of mixture_log_likelihood (``backend="torch"``, genrep_fast.mixture_torch)
against the float64 reference: the shared bank's GEMM form, the per-image bank's difference form
(isotropic: ``cdist``; diagonal: sub/square/sum) and candidate classes of both."""

from __future__ import annotations

import math

import pytest
import torch

import genrep_fast as G
from genrep_fast import _ops, mixture_torch
from genrep_fast import reference as R
from genrep_fast.posterior import _mixture_ll_op

F64 = torch.float64


def make_bank(b, c, t, latent, *, per_image=False, sigma_kind="c_t", dtype=F64, seed=0):
    """x ``[B, *latent]``, mu shared/per-image, sigma of the named kind, all random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *latent, generator=g, dtype=F64)
    lead = (b, c, t) if per_image else (c, t)
    mu = torch.randn(*lead, *latent, generator=g, dtype=F64)
    shapes = {"t": (t,), "c_t": (c, t), "b_c_t": (b, c, t), "diag": tuple(mu.shape)}
    sigma = 0.5 + torch.rand(shapes[sigma_kind], generator=g, dtype=F64)
    return x.to(dtype), mu.to(dtype), sigma.to(dtype)


def ll_and_grads(fn, x, mu, sigma, grad):
    xs, ms, ss = (t.detach().clone().requires_grad_() for t in (x, mu, sigma))
    out = fn(xs, ms, ss)
    out.backward(grad)
    return out.detach(), xs.grad, ms.grad, ss.grad


CASES = [
    # (B, C, T, latent)
    (1, 1, 1, (1,)),
    (3, 7, 75, (5,)),
    (2, 1, 4, (3, 3)),
    (4, 7, 1, (2, 3, 3)),
    (5, 3, 6, (17,)),
]
LAYOUTS = [
    (False, "t"),
    (False, "c_t"),
    (False, "diag"),
    (True, "t"),
    (True, "c_t"),
    (True, "b_c_t"),
    (True, "diag"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}C{}T{}L{}".format(*c))
@pytest.mark.parametrize(
    "layout", LAYOUTS, ids=lambda p: ("img" if p[0] else "shared") + "-" + p[1]
)
@pytest.mark.parametrize("candidates", [False, True], ids=["all", "cand"])
def test_forward_backward_match_reference_f64(case, layout, candidates):
    b, c, t, latent = case
    per_image, kind = layout
    x, mu, sigma = make_bank(b, c, t, latent, per_image=per_image, sigma_kind=kind)
    ci = None
    if candidates:
        # Repeated classes in a row are allowed and must accumulate in the backward.
        ci = torch.randint(0, c, (b, 3), generator=torch.Generator().manual_seed(1))
    k = c if ci is None else ci.shape[1]
    grad = torch.randn(b, k, dtype=F64, generator=torch.Generator().manual_seed(2))

    def ref(a, m, s):
        return R.mixture_log_likelihood(a, m, s, class_index=ci)

    def fast(a, m, s):
        return G.mixture_log_likelihood(a, m, s, class_index=ci, backend="torch")

    want = ll_and_grads(ref, x, mu, sigma, grad)
    got = ll_and_grads(fast, x, mu, sigma, grad)
    assert got[0].dtype == F64 and got[0].shape == (b, k)
    for name, g_, w_ in zip(("ll", "x", "mu", "sigma"), got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("kind", ["c_t", "diag"])
@pytest.mark.parametrize("candidates", [False, True], ids=["all", "cand"])
@pytest.mark.parametrize("per_image", [False, True], ids=["shared", "img"])
def test_chunking_does_not_change_the_result(per_image, candidates, kind, monkeypatch):
    """chunk_bytes=1 runs one class (or candidate) per chunk, forward and backward; the result and
    the gradients match the single-chunk run and the float64 reference."""
    x, mu, sigma = make_bank(3, 7, 5, (4,), per_image=per_image, sigma_kind=kind)
    ci = torch.tensor([[6, 0, 3], [2, 2, 5], [1, 4, 0]]) if candidates else None
    grad = torch.randn(3, 3 if candidates else 7, dtype=F64)
    chunk_sizes = []
    real = mixture_torch._classes_per_chunk
    monkeypatch.setattr(
        mixture_torch,
        "_classes_per_chunk",
        lambda *a: chunk_sizes.append(real(*a)) or chunk_sizes[-1],
    )
    runs = {}
    for name, budget in (("one", 1), ("whole", 2**40)):
        chunk_sizes.clear()
        out = mixture_torch.forward(x, mu, sigma, ci, chunk_bytes=budget)
        grads = mixture_torch.backward(grad, x, mu, sigma, ci, chunk_bytes=budget)
        runs[name] = (out, *grads)
        # Forward and backward each sized their chunks: one class per chunk, or all in one.
        assert len(chunk_sizes) == 2
        assert set(chunk_sizes) == {1} if budget == 1 else min(chunk_sizes) > 1
    want = ll_and_grads(
        lambda a, m, s: R.mixture_log_likelihood(a, m, s, class_index=ci), x, mu, sigma, grad
    )
    for name, one, whole, ref in zip(("ll", "x", "mu", "sigma"), runs["one"], runs["whole"], want):
        torch.testing.assert_close(one, whole, rtol=1e-13, atol=1e-13, msg=name)
        torch.testing.assert_close(one, ref, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("layout", [(False, "t"), (False, "diag"), (True, "b_c_t"), (True, "diag")])
@pytest.mark.parametrize("candidates", [False, True])
def test_gradcheck_f64(layout, candidates):
    per_image, kind = layout
    x, mu, sigma = make_bank(2, 3, 4, (3,), per_image=per_image, sigma_kind=kind)
    ci = torch.tensor([[2, 0], [1, 1]]) if candidates else None
    inputs = tuple(t.requires_grad_() for t in (x, mu, sigma))
    assert torch.autograd.gradcheck(
        lambda a, m, s: G.mixture_log_likelihood(a, m, s, class_index=ci, backend="torch"), inputs
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_computed_in_fp32_or_better(dtype):
    x, mu, sigma = make_bank(4, 5, 6, (33,), dtype=dtype)
    got = G.mixture_log_likelihood(x, mu, sigma, backend="torch")
    assert got.dtype == torch.float32
    # Same (rounded) inputs in float64: the only error left is the float32 rounding of the output.
    want = R.mixture_log_likelihood(x.double(), mu.double(), sigma.double())
    torch.testing.assert_close(got.double(), want, rtol=2e-7, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Hard regimes
# ------------------------------------------------------------------------------------------------


def _err_vs_f64(out, x, mu, sigma, ci=None):
    want = R.mixture_log_likelihood(x.double(), mu.double(), sigma.double(), class_index=ci)
    return (out.double() - want).abs().max().item(), want


@pytest.mark.parametrize("sigma_min", [1e-3, 1e-2])
def test_x_near_a_mean_small_sigma(sigma_min):
    # x within ~sigma of mu[c, t]: the GEMM form cancels |x|^2 - 2 x.mu + |mu|^2 ~ 2 * 512 down to
    # ~512 * sigma^2. Measured: an fp32 GEMM form is off by 90 nats (sigma=1e-3) / 0.9 nats (1e-2)
    # on these entries; the fp64 GEMM form by ~1e-4 (the fp32 rounding of ~3e3).
    g = torch.Generator().manual_seed(3)
    _, mu, _ = make_bank(4, 5, 7, (512,), dtype=torch.float32)
    rows, cls, steps = torch.arange(4), torch.tensor([0, 1, 2, 4]), torch.tensor([3, 0, 6, 2])
    x = mu[cls, steps] + sigma_min * torch.randn(4, 512, generator=g)
    sigma = torch.full((5, 7), sigma_min, dtype=torch.float32)
    got = G.mixture_log_likelihood(x, mu, sigma, backend="torch")[rows, cls].double()
    want = R.mixture_log_likelihood(x.double(), mu.double(), sigma.double())[rows, cls]
    ref32 = R.mixture_log_likelihood(x, mu, sigma)[rows, cls].double()
    err, err_ref32 = (got - want).abs().max().item(), (ref32 - want).abs().max().item()
    assert err <= 2 * err_ref32 + 1e-4, (err, err_ref32)
    # Exactly on the mean: log p = -D log sigma - D/2 log 2 pi - log T (other steps negligible).
    x = mu[cls, steps].double()
    got = G.mixture_log_likelihood(x, mu.double(), sigma.double(), backend="torch")[rows, cls]
    exact = -512 * math.log(sigma[0, 0].item()) - 256 * R.LOG_2PI - math.log(7)
    # Worst-case rounding of an fp64 dot product of length D: D * eps * (|x|^2 + |mu|^2) / 2 sigma^2
    # (measured: 2.5e-5 nats at sigma = 1e-3, about a fifth of this bound).
    bound = 512 * 2.2e-16 * 2 * x.square().sum(-1).max().item() / (2 * sigma_min**2)
    torch.testing.assert_close(got, torch.full_like(got, exact), rtol=0.0, atol=bound)


def test_sigma_spanning_five_decades_in_one_bank():
    x, mu, _ = make_bank(3, 4, 9, (16,))
    x[0] = mu[1, 4] + 1e-4  # near a mean with a tiny sigma
    sigma = torch.logspace(-3, 2, 36, dtype=F64).reshape(4, 9)
    for kind in ("iso", "diag"):
        s = sigma if kind == "iso" else sigma[..., None].expand(4, 9, 16).contiguous()
        got = G.mixture_log_likelihood(x, mu, s, backend="torch")
        err, want = _err_vs_f64(got, x, mu, s)
        assert err <= 1e-9 * want.abs().max().item() + 1e-9, (kind, err)


def test_log_densities_around_minus_1e7():
    x, mu, sigma = make_bank(3, 4, 5, (64,))
    x = x * 300.0  # |x - mu|^2 ~ 6e6, / sigma^2 -> log-densities ~ -1e7
    got = G.mixture_log_likelihood(x, mu, sigma, backend="torch")
    err, want = _err_vs_f64(got, x, mu, sigma)
    assert want.max() < -1e6
    assert err <= 1e-12 * want.abs().max().item(), err
    # float32 inputs: the result is correct to fp32 rounding (relative), no overflow to -inf.
    got32 = G.mixture_log_likelihood(x.float(), mu.float(), sigma.float(), backend="torch")
    assert torch.isfinite(got32).all()
    torch.testing.assert_close(
        got32.double(),
        R.mixture_log_likelihood(x.float().double(), mu.float().double(), sigma.float().double()),
        rtol=1e-6,
        atol=0.0,
    )


def test_one_class_dominating_and_ties():
    x, mu, sigma = make_bank(2, 6, 5, (32,))
    sigma = torch.full((6, 5), 0.05, dtype=F64)
    x[0] = mu[3, 2]
    ll = G.mixture_log_likelihood(x, mu, sigma, backend="torch")
    post = G.class_posterior(ll)
    assert torch.isfinite(ll).all() and torch.isfinite(post).all()
    assert post[0, 3].item() == pytest.approx(1.0, abs=1e-12)
    # All classes identical: every class ties and the posterior is uniform.
    tied_mu = mu[:1].expand(6, -1, -1).contiguous()
    ll = G.mixture_log_likelihood(x, tied_mu, sigma, backend="torch")
    assert (ll == ll[:, :1]).all()
    torch.testing.assert_close(G.class_posterior(ll), torch.full((2, 6), 1 / 6, dtype=F64))
    # Gradients stay finite in both regimes.
    xs = x.clone().requires_grad_()
    G.mixture_log_likelihood(xs, tied_mu, sigma, backend="torch").sum().backward()
    assert torch.isfinite(xs.grad).all()


def test_backend_torch_runs_the_torch_code(monkeypatch):
    """backend="torch" runs mixture_torch for every layout (the C++ kernels are backend="cpp")."""
    calls = []
    real = mixture_torch.forward
    monkeypatch.setattr(mixture_torch, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, mu, sigma = make_bank(2, 3, 4, (5,), per_image=True)
    G.mixture_log_likelihood(x, mu, sigma, backend="torch")
    G.mixture_log_likelihood(
        x, mu[0], sigma[0], class_index=torch.tensor([[0], [2]]), backend="torch"
    )
    assert len(calls) == 2


# ------------------------------------------------------------------------------------------------
# Custom op: opcheck, torch.compile
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "impl",
    [
        "torch",
        pytest.param(
            "cpp",
            marks=pytest.mark.skipif(not _ops.HAS_MIXTURE_CPU_OPS, reason="no C++ mixture kernels"),
        ),
    ],
)
@pytest.mark.parametrize("layout", [(False, "c_t"), (False, "diag"), (True, "t")])
@pytest.mark.parametrize("candidates", [False, True])
def test_opcheck(layout, candidates, impl):
    per_image, kind = layout
    x, mu, sigma = make_bank(3, 4, 5, (2, 3), per_image=per_image, sigma_kind=kind)
    ci = torch.tensor([[0, 3], [2, 2], [1, 0]]) if candidates else None
    x.requires_grad_()
    mu.requires_grad_()
    sigma.requires_grad_()
    torch.library.opcheck(_mixture_ll_op, (x, mu, sigma, ci, "ieee", impl, []))


def test_torch_compile_fullgraph():
    x, mu, sigma = make_bank(3, 4, 5, (6,))
    logits = torch.randn(3, 4, dtype=F64, requires_grad=True)

    def loss_fn(x, mu, sigma, logits):
        ll = G.mixture_log_likelihood(x, mu, sigma)
        return G.posterior_kl_loss(logits, ll) + ll.logsumexp(-1).mean()

    x.requires_grad_()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(x, mu, sigma, logits)
    got.backward()
    gx, gz = x.grad.clone(), logits.grad.clone()
    x.grad = None
    logits.grad = None
    want = loss_fn(x, mu, sigma, logits)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gz, logits.grad)


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_naming_the_argument():
    x, mu, sigma = make_bank(2, 3, 4, (5,))
    bad_sigma = sigma.clone()
    bad_sigma[1, 2] = 0.0
    with pytest.raises(ValueError, match="sigma"):
        G.mixture_log_likelihood(x, mu, bad_sigma, backend="torch")
    # validate=False skips the value check (the caller vouches for the inputs).
    G.mixture_log_likelihood(x, mu, sigma, backend="torch", validate=False)
    with pytest.raises(ValueError, match="sigma"):
        G.mixture_log_likelihood(x, mu, sigma[:, :3], backend="torch")
    with pytest.raises(ValueError, match="mu"):
        G.mixture_log_likelihood(x, mu[..., :4], sigma, backend="torch")
    with pytest.raises(TypeError, match="mu"):
        G.mixture_log_likelihood(x, mu.float(), sigma, backend="torch")
    # class_index, precision and backend errors: tests/test_reference.py (same validation).


def test_backward_at_large_log_densities_float32_inputs():
    # Log-densities ~ -6e5 on the wrong classes: the float32 ll rounds at 0.06 nats there. The
    # backward recomputes its LSE from the float64 scores, so the weights still sum to 1 and the
    # gradients match float64 to fp32 rounding (with the saved ll: 5e-3 relative error, measured).
    _, mu, _ = make_bank(3, 4, 6, (64,), dtype=torch.float32)
    cls, steps = torch.tensor([0, 2, 3]), torch.tensor([5, 1, 0])
    x = mu[cls, steps] + 1e-3 * torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    sigma = torch.full((4, 6), 1e-2)
    grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))

    def fast(a, m, s):
        return G.mixture_log_likelihood(a, m, s, backend="torch")

    def ref(a, m, s):
        return R.mixture_log_likelihood(a, m, s)

    got = ll_and_grads(fast, x, mu, sigma, grad)
    want = ll_and_grads(ref, x.double(), mu.double(), sigma.double(), grad.double())
    for name, g_, w_ in zip(("ll", "x", "mu", "sigma"), got, want):
        scale = w_.abs().max().item()
        assert (g_.double() - w_).abs().max().item() <= 4e-7 * scale, name
