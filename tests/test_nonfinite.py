"""The non-finite policy (docs/METHOD.md, "Non-finite values"), on every backend and layout:
the reference, the torch backend with and without the C++ kernels, and the Triton kernels
(interpreted here; difference form and GEMM form).

* NaN in any input gives NaN where it takes part, and NaN gradients; never a finite loss.
* +-inf in x or mu: the difference form in IEEE arithmetic (a step with an infinite difference has
  zero density, inf - inf is NaN), the same answer on every path; a score past the float range is
  -inf, never NaN.
* -inf log-likelihoods are valid (p = 0); a row with every class at -inf (or with NaN, or +inf)
  gives a NaN posterior and a NaN loss for that image.
* Zero-density steps and -inf entries pass no gradient (0, never 0 * inf = NaN).
"""

from __future__ import annotations

import math

import pytest
import torch

import genrep_fast as G
from genrep_fast import _ops
from genrep_fast import reference as R

INF, NAN = math.inf, math.nan
B, C, T, D = 3, 3, 4, 5
CI = torch.tensor([[0, 2], [1, 1], [2, 0]])

# (backend, precision): every path of the likelihood on CPU.
LL_BACKENDS = [
    pytest.param("reference", "ieee", id="reference"),
    pytest.param(
        "cpp",
        "ieee",
        id="cpp",
        marks=pytest.mark.skipif(not _ops.HAS_MIXTURE_CPU_OPS, reason="no C++ mixture kernels"),
    ),
    pytest.param("torch", "ieee", id="torch"),
    pytest.param("triton", "ieee", id="triton-diff"),
    pytest.param("triton", "tf32", id="triton-gemm"),
]
LAYOUTS = ["shared", "candidates", "per_image", "diagonal"]


def bank(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    per_image = layout == "per_image"
    mu = torch.randn(*((B,) if per_image else ()), C, T, D, generator=g)
    sigma = 0.5 + torch.rand(mu.shape if layout == "diagonal" else (C, T), generator=g)
    ci = CI if layout == "candidates" else None
    return x, mu, sigma, ci


def mu_at(layout, c, t, d):
    """Index of mu[c, t, d] (per-image bank: image 0's)."""
    return (0, c, t, d) if layout == "per_image" else (c, t, d)


def column(layout, c):
    """The result entries that read class c: ``(rows, cols)`` masks over ``[B, K]``."""
    rows = torch.zeros(B, dtype=torch.bool)
    if layout == "per_image":
        rows[0] = True
    else:
        rows[:] = True
    cls = CI if layout == "candidates" else torch.arange(C).expand(B, C)
    return rows[:, None] & (cls == c)


def run_ll(backend, precision, x, mu, sigma, ci, **kw):
    return G.mixture_log_likelihood(
        x, mu, sigma, class_index=ci, backend=backend, precision=precision, **kw
    )


def poison(case, layout, x, mu, sigma):
    """Put the case's non-finite values in (in place); returns the expected pattern:
    ``(nan [B, K], neg_inf [B, K])`` masks; every other entry is finite."""
    k = CI.shape[1] if layout == "candidates" else C
    nan = torch.zeros(B, k, dtype=torch.bool)
    neg = torch.zeros(B, k, dtype=torch.bool)
    if case == "x nan":
        x[0, 1] = NAN
        nan[0] = True
    elif case == "mu nan":
        mu[mu_at(layout, 1, 2, 3)] = NAN
        nan |= column(layout, 1)
    elif case == "sigma nan":
        if sigma.dim() == 2:  # [C, T]: every image's class 1
            sigma[1, 2] = NAN
            nan |= column("shared" if layout == "per_image" else layout, 1)
        else:
            sigma[mu_at(layout, 1, 2, 3)] = NAN
            nan |= column(layout, 1)
    elif case == "x +inf":
        x[0, 1] = INF
        neg[0] = True
    elif case == "x -inf":
        x[2, 0] = -INF
        neg[2] = True
    elif case == "mu inf one step":
        mu[mu_at(layout, 1, 0, 3)] = INF  # step 0 of class 1 drops out; the class stays finite
    elif case == "mu inf every step":
        for t in range(T):
            mu[mu_at(layout, 1, t, 3)] = -INF
        neg |= column(layout, 1)
    elif case == "same infinity":
        x[0, 3] = INF
        mu[mu_at(layout, 1, 2, 3)] = INF  # x_d - mu_d = inf - inf at one step of class 1
        neg[0] = True
        nan[0] = column(layout, 1)[0]
        neg &= ~nan
    elif case == "overflow":
        x[1] *= 1e20  # |x - mu|^2 ~ 1e40: past float32, and the result too
        neg[1] = True
    return nan, neg


LL_CASES = [
    "x nan",
    "mu nan",
    "sigma nan",
    "x +inf",
    "x -inf",
    "mu inf one step",
    "mu inf every step",
    "same infinity",
    "overflow",
]


@pytest.mark.parametrize("case", LL_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("backend", "precision"), LL_BACKENDS)
def test_mixture_log_likelihood_values(backend, precision, layout, case):
    x, mu, sigma, ci = bank(layout)
    nan, neg = poison(case, layout, x, mu, sigma)
    got = run_ll(backend, precision, x, mu, sigma, ci, validate=False)
    assert torch.equal(got.isnan(), nan), got
    assert torch.equal(got.isneginf(), neg), got
    assert not got.isposinf().any()
    # The finite entries: the float64 reference of the same input.
    want = R.mixture_log_likelihood(x.double(), mu.double(), sigma.double(), class_index=ci)
    fin = ~(nan | neg)
    tol = 5e-2 if precision == "tf32" else 1e-4
    torch.testing.assert_close(got[fin].double(), want[fin], rtol=1e-5, atol=tol)


# A difference-form config that splits T = 4 steps into 2 spans of one 2-step tile (T_TILES):
# each span's log-sum-exp can be finite, -inf or NaN on its own before the launcher reduces them.
SPLIT_CONFIG = dict(BLOCK_T=2, BLOCK_D=4, D_STAGES=1, num_warps=1, num_stages=1, T_TILES=1)


@pytest.mark.parametrize("case", LL_CASES)
@pytest.mark.parametrize("layout", ["shared", "candidates", "per_image"])
def test_difference_form_split_over_steps_keeps_the_policy(monkeypatch, layout, case):
    from genrep_fast.kernels import mixture as M

    monkeypatch.setattr(M, "DIFF_CONFIGS", (SPLIT_CONFIG,))
    assert M.diff_spans(M.diff_blocks(SPLIT_CONFIG, T, D), T) == 2
    x, mu, sigma, ci = bank(layout)
    nan, neg = poison(case, layout, x, mu, sigma)
    got = run_ll("triton", "ieee", x, mu, sigma, ci, validate=False)
    assert torch.equal(got.isnan(), nan), got
    assert torch.equal(got.isneginf(), neg), got
    assert not got.isposinf().any()
    want = R.mixture_log_likelihood(x.double(), mu.double(), sigma.double(), class_index=ci)
    fin = ~(nan | neg)
    torch.testing.assert_close(got[fin].double(), want[fin], rtol=1e-5, atol=1e-4)


def finite_sum(ll):
    """The loss of a caller that drops -inf entries: they must pass no gradient."""
    return torch.where(torch.isfinite(ll), ll, 0.0).sum()


GRAD_CASES = ["x +inf", "x -inf", "mu inf one step", "mu inf every step", "overflow"]


@pytest.mark.parametrize("case", GRAD_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("backend", "precision"), LL_BACKENDS)
def test_gradients_at_zero_density_are_finite(backend, precision, layout, case):
    x, mu, sigma, ci = bank(layout)
    poison(case, layout, x, mu, sigma)
    leaves = [x.requires_grad_(), mu.requires_grad_(), sigma.requires_grad_()]
    ll = run_ll(backend, precision, *leaves, ci)
    got = torch.autograd.grad(finite_sum(ll), leaves)
    # Oracle: float64 reference where each non-finite value is replaced by a finite one so far
    # away that its steps' weight is exactly 0 in float64, and rows that are -inf are dropped.
    xo = torch.where(torch.isfinite(x), x.detach(), 0.0).double()
    muo = torch.where(torch.isfinite(mu), mu.detach(), 1e4).double()
    live = torch.isfinite(ll.detach())
    xo.requires_grad_()
    muo.requires_grad_()
    so = sigma.detach().double().requires_grad_()
    llo = R.mixture_log_likelihood(xo, muo, so, class_index=ci)
    want = torch.autograd.grad(torch.where(live, llo, 0.0).sum(), [xo, muo, so])
    for name, a, w in zip(("x", "mu", "sigma"), got, want):
        assert torch.isfinite(a).all(), (name, a)
        torch.testing.assert_close(a.double(), w, rtol=1e-4, atol=1e-3, msg=name)


@pytest.mark.parametrize("case", ["x nan", "mu nan"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("backend", "precision"), LL_BACKENDS)
def test_nan_gives_nan_gradients(backend, precision, layout, case):
    x, mu, sigma, ci = bank(layout)
    poison(case, layout, x, mu, sigma)
    x.requires_grad_()
    mu.requires_grad_()
    ll = run_ll(backend, precision, x, mu, sigma, ci)
    gx, gmu = torch.autograd.grad(ll.sum(), [x, mu])
    if case == "x nan":
        assert gx[0].isnan().all()
        assert gmu.isnan().any()
    else:
        assert gmu.isnan().any()
        assert gx.isnan().any()


@pytest.mark.parametrize(("backend", "precision"), [("triton", "ieee"), ("triton", "tf32")])
def test_triton_first_tile_of_zero_density(backend, precision):
    """T > BLOCK_T (32): a class whose first tile of steps all has zero density stays finite."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, generator=g)
    mu = torch.randn(2, 40, 4, generator=g)
    mu[1, :32, 0] = INF
    sigma = torch.full((2, 40), 0.8)
    got = G.mixture_log_likelihood(x, mu, sigma, backend=backend, precision=precision)
    want = R.mixture_log_likelihood(x.double(), mu.double(), sigma.double())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=5e-2)


def test_gemm_form_redoes_flagged_pairs_in_every_class_block():
    """More classes than one redo program holds (REDO_BLOCK_C): flagged classes in the first and
    a later block, and a flagged image, all get the difference form's answer (-inf), not the GEMM
    form's inf - inf = NaN; unflagged pairs keep the GEMM form's value."""
    from genrep_fast.kernels import mixture as M

    c = M.REDO_BLOCK_C + 44
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, generator=g)
    mu = torch.randn(c, 2, 8, generator=g)
    sigma = torch.full((c, 2), 1.5)
    for cls in (5, M.REDO_BLOCK_C + 14, c - 1):  # first block, second block, the last class
        mu[cls, 1, 3] = INF
    x[1, 0] = -INF
    got = G.mixture_log_likelihood(x, mu, sigma, backend="triton", precision="tf32x3")
    want = R.mixture_log_likelihood(x.double(), mu.double(), sigma.double())
    assert not got.isnan().any()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# Posterior and distillation loss
# ------------------------------------------------------------------------------------------------

POST_BACKENDS = ["reference", "torch", "triton"]


def rows(seed=0, c=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, c, generator=g) * 3, torch.randn(3, c, generator=g)


@pytest.mark.parametrize("backend", POST_BACKENDS)
def test_posterior_minus_inf_classes_and_bad_rows(backend):
    ll, _ = rows()
    ll[0, 1] = -INF  # valid: a class of zero likelihood
    ll[1] = -INF  # every class: no class has any likelihood
    ll[2, 3] = INF  # not a log-density
    p = G.class_posterior(ll, backend=backend)
    assert p[0, 1] == 0 and torch.isfinite(p[0]).all()
    torch.testing.assert_close(p[0].double(), torch.softmax(ll[0].double(), -1))
    assert p[1].isnan().all() and p[2].isnan().all()
    prior = torch.tensor([0.0, -INF, 0.0, 0.0])  # a class the prior rules out
    p = G.class_posterior(rows()[0], prior, backend=backend)
    assert (p[:, 1] == 0).all() and torch.isfinite(p).all()
    nan_prior = torch.tensor([0.0, NAN, 0.0, 0.0])
    assert G.class_posterior(rows()[0], nan_prior, backend=backend).isnan().all()


@pytest.mark.parametrize("backend", POST_BACKENDS)
@pytest.mark.parametrize("bad", ["nan", "all -inf", "+inf", "logit nan", "logit +inf"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_kl_loss_never_finite_over_nan(backend, bad, reduction):
    ll, logits = rows()
    if bad == "nan":
        ll[0, 2] = NAN
    elif bad == "all -inf":
        ll[0] = -INF
    elif bad == "+inf":
        ll[0, 2] = INF
    elif bad == "logit nan":
        logits[0, 2] = NAN
    else:
        logits[0, 2] = INF
    z = logits.clone().requires_grad_()
    loss = G.posterior_kl_loss(z, ll, reduction=reduction, backend=backend)
    loss.sum().backward()
    if reduction == "none":
        assert loss[0].isnan() and torch.isfinite(loss[1:]).all()
    else:
        assert loss.isnan()
    assert z.grad[0].isnan().all()
    assert torch.isfinite(z.grad[1:]).all()
    want_z = logits[1:].double().requires_grad_()
    R.posterior_kl_loss(want_z, ll[1:].double(), reduction="sum").backward()
    scale = 1 / 3 if reduction == "batchmean" else 1.0
    torch.testing.assert_close(z.grad[1:].double(), want_z.grad * scale, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", POST_BACKENDS)
def test_kl_loss_with_minus_inf_classes_is_finite(backend):
    ll, logits = rows()
    ll[0, 1] = -INF
    ll[2, :3] = -INF  # one class left: p is one-hot
    z = logits.clone().requires_grad_()
    loss = G.posterior_kl_loss(z, ll, reduction="none", backend=backend)
    loss.sum().backward()
    z64 = logits.double().requires_grad_()
    want = R.posterior_kl_loss(z64, ll.double(), reduction="none")
    want.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-5, atol=1e-6)
    # A logit of -inf where the teacher has mass: q = 0 there, KL = +inf (not NaN).
    z = logits.clone()
    z[0, 0] = -INF
    assert G.posterior_kl_loss(z, ll, reduction="none", backend=backend)[0] == INF


@pytest.mark.parametrize("backend", POST_BACKENDS)
def test_kl_loss_candidates_and_teacher_gradient(backend):
    ll, logits = rows(c=2)
    ll[1, 0] = NAN
    z = torch.randn(3, 5).requires_grad_()
    ci = torch.tensor([[0, 4], [1, 2], [3, 3]])
    loss = G.posterior_kl_loss(z, ll, class_index=ci, reduction="none", backend=backend)
    assert loss[1].isnan() and torch.isfinite(loss[[0, 2]]).all()
    llg = ll.clone().requires_grad_()
    loss = G.posterior_kl_loss(logits, llg, detach_teacher=False, backend=backend)
    loss.backward()
    assert loss.isnan() and llg.grad[1].isnan().all()


def test_triton_kl_first_tile_of_minus_inf():
    """C > MAX_BLOCK_C (2048): a first tile of -inf classes leaves a valid, finite loss."""
    g = torch.Generator().manual_seed(2)
    ll = torch.randn(1, 2100, generator=g)
    ll[0, :2048] = -INF
    logits = torch.randn(1, 2100, generator=g)
    got = G.posterior_kl_loss(logits, ll, backend="triton")
    want = R.posterior_kl_loss(logits.double(), ll.double())
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    p = G.class_posterior(ll, backend="triton")
    torch.testing.assert_close(p.double(), R.class_posterior(ll.double()), rtol=1e-5, atol=1e-7)


def test_end_to_end_nan_in_x_reaches_the_loss():
    x, mu, sigma, _ = bank("shared")
    x[1, 0] = NAN
    logits = torch.randn(B, C, requires_grad=True)
    ll = G.mixture_log_likelihood(x, mu, sigma)
    loss = G.posterior_kl_loss(logits, ll)
    loss.backward()
    assert loss.isnan() and logits.grad[1].isnan().all()
