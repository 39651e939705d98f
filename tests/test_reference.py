"""The eager reference against independent float64 NumPy/SciPy computations.

The reference is the oracle of every kernel test, so it is checked here against code that shares
nothing with it: scipy.stats.multivariate_normal for the Gaussian log-density,
scipy.special.logsumexp / softmax for the mixture and posterior, and a NumPy transcription of
docs/METHOD.md section 3 (not its expanded a/b form) for gradient alignment.
"""

from __future__ import annotations

import math
import zlib

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from scipy.special import logsumexp, softmax
from scipy.stats import multivariate_normal

import genrep_fast as gf
from genrep_fast import reference as R

# ---------------------------------------------------------------------------------------------
# Independent NumPy/SciPy oracles
# ---------------------------------------------------------------------------------------------


def np_mixture_loglik(x, mu, sigma, class_index=None):
    """x [B,D], mu [C,T,D] or [B,C,T,D], sigma iso broadcastable to [(B,)C,T] or diag like mu."""
    b, d = x.shape
    per_image = mu.ndim == 4
    c, t = mu.shape[-3], mu.shape[-2]
    diag = sigma.shape == mu.shape
    out = np.empty((b, c))
    for i in range(b):
        for y in range(c):
            m = mu[i, y] if per_image else mu[y]
            if diag:
                s = sigma[i, y] if per_image else sigma[y]
            else:
                s_full = np.broadcast_to(sigma, (b, c, t) if per_image else (c, t))
                s = s_full[i, y] if per_image else s_full[y]
            dens = []
            for j in range(t):
                var = s[j] ** 2 if diag else np.full(d, s[j] ** 2)
                dens.append(multivariate_normal(mean=m[j], cov=np.diag(var)).logpdf(x[i]))
            out[i, y] = logsumexp(dens) - math.log(t)
    if class_index is not None:
        out = np.take_along_axis(out, class_index, axis=1)
    return out


def np_align(ps, gs, groups, k, w_p, w_g, mode):
    """docs/METHOD.md section 3 literally: cos, alpha, projections, aligned gradients, weighted sum."""
    n = len(ps)
    if groups is None:
        groups = [[i] for i in range(n)]
    elif groups == "global":
        groups = [list(range(n))]
    out = [w_p * p + w_g * g for p, g in zip(ps, gs)]
    for members in groups:
        if not members:
            continue
        p = np.concatenate([ps[i].ravel() for i in members])
        g = np.concatenate([gs[i].ravel() for i in members])
        d, pp, gg = p @ g, p @ p, g @ g
        cos = d / math.sqrt(pp * gg) if pp > 0 and gg > 0 else 0.0
        # For 1-element tensors |cos| = 1 up to rounding; -1 - 2e-16 would make a fractional
        # power of a negative number (NaN). The cosine is bounded by Cauchy-Schwarz: clamp.
        cos = min(1.0, max(-1.0, cos))
        alpha = ((cos + 1) / 2) ** k
        par_p = (d / gg) * g if gg > 0 else np.zeros_like(g)
        par_g = (d / pp) * p if pp > 0 else np.zeros_like(p)
        al_p = (p - par_p) + alpha * par_p if mode in ("symmetric", "perception") else p
        al_g = (g - par_g) + alpha * par_g if mode in ("symmetric", "generation") else g
        upd = w_p * al_p + w_g * al_g
        off = 0
        for i in members:
            sz = ps[i].size
            out[i] = upd[off : off + sz].reshape(ps[i].shape)
            off += sz
    return out


def t64(a):
    return torch.from_numpy(np.ascontiguousarray(a)).double()


# ---------------------------------------------------------------------------------------------
# thinned_steps
# ---------------------------------------------------------------------------------------------


def test_thinned_steps_paper_setting():
    steps = gf.thinned_steps(200, 50, 2)
    assert len(steps) == 75
    assert steps[0] == 50 and steps[-1] == 198
    assert len(gf.thinned_steps(250)) == 100


@given(n=st.integers(1, 400), m=st.integers(0, 399), k=st.integers(1, 9))
@settings(max_examples=60, deadline=None)
def test_thinned_steps_matches_definition(n, m, k):
    if m >= n:
        with pytest.raises(ValueError, match="burn_in"):
            gf.thinned_steps(n, m, k)
        return
    steps = gf.thinned_steps(n, m, k)
    expected = [i for i in range(n) if i >= m and (i - m) % k == 0]
    assert steps == expected


@pytest.mark.parametrize(
    "args, exc, word",
    [
        ((200, 200, 2), ValueError, "burn_in"),
        ((200, 50, 0), ValueError, "thin"),
        ((0, 0, 1), ValueError, "num_steps"),
        ((200.0, 50, 2), TypeError, "num_steps"),
        ((200, -1, 2), ValueError, "burn_in"),
        ((200, True, 2), TypeError, "burn_in"),
    ],
)
def test_thinned_steps_bad_input(args, exc, word):
    with pytest.raises(exc, match=word):
        gf.thinned_steps(*args)


# ---------------------------------------------------------------------------------------------
# Mixture likelihood
# ---------------------------------------------------------------------------------------------


def _bank(rng, b, c, t, d, per_image, sigma_form, scale=1.0):
    x = rng.standard_normal((b, d))
    mu = rng.standard_normal((b, c, t, d) if per_image else (c, t, d))
    if sigma_form == "T":
        sigma = rng.uniform(0.5, 2.0, (t,)) * scale
    elif sigma_form == "CT":
        sigma = rng.uniform(0.5, 2.0, (c, t)) * scale
    elif sigma_form == "BCT":
        sigma = rng.uniform(0.5, 2.0, (b, c, t)) * scale
    else:
        sigma = rng.uniform(0.5, 2.0, mu.shape) * scale
    return x, mu, sigma


CASES = [
    # (B, C, T, D, per_image, sigma_form)
    (3, 4, 5, 6, False, "T"),
    (3, 4, 5, 6, False, "CT"),
    (2, 3, 4, 5, False, "diag"),
    (2, 3, 4, 5, True, "BCT"),
    (2, 3, 4, 5, True, "CT"),
    (2, 3, 4, 5, True, "diag"),
    (1, 1, 1, 1, False, "CT"),  # B=C=T=D=1
    (2, 1, 7, 3, True, "T"),  # C=1
    (4, 7, 1, 2, False, "diag"),  # T=1
    (2, 2, 3, 1, False, "CT"),  # D=1
]


@pytest.mark.parametrize("b,c,t,d,per_image,sigma_form", CASES)
def test_mixture_matches_scipy(b, c, t, d, per_image, sigma_form):
    rng = np.random.default_rng(b * 1000 + c * 100 + t * 10 + d)
    x, mu, sigma = _bank(rng, b, c, t, d, per_image, sigma_form)
    got = gf.mixture_log_likelihood(t64(x), t64(mu), t64(sigma), backend="reference")
    assert got.dtype == torch.float64 and got.shape == (b, c)
    np.testing.assert_allclose(got.numpy(), np_mixture_loglik(x, mu, sigma), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("per_image", [False, True])
def test_mixture_class_index(per_image):
    rng = np.random.default_rng(7)
    x, mu, sigma = _bank(rng, 3, 6, 4, 5, per_image, "CT")
    ci = np.array([[5, 0, 2], [1, 1, 3], [4, 2, 0]])
    got = gf.mixture_log_likelihood(
        t64(x), t64(mu), t64(sigma), class_index=torch.from_numpy(ci), backend="reference"
    )
    np.testing.assert_allclose(got.numpy(), np_mixture_loglik(x, mu, sigma, ci), rtol=1e-10)


@given(
    b=st.integers(1, 3),
    c=st.integers(1, 4),
    t=st.integers(1, 5),
    latent=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    per_image=st.booleans(),
    diag=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=40, deadline=None)
def test_mixture_hypothesis_shapes(b, c, t, latent, per_image, diag, seed):
    rng = np.random.default_rng(seed)
    d = int(np.prod(latent))
    x, mu, sigma = _bank(rng, b, c, t, d, per_image, "diag" if diag else "CT")
    want = np_mixture_loglik(x, mu, sigma)
    xs = t64(x).reshape(b, *latent)
    mus = t64(mu).reshape(*mu.shape[:-1], *latent)
    sig = t64(sigma).reshape(*mu.shape[:-1], *latent) if diag else t64(sigma)
    got = gf.mixture_log_likelihood(xs, mus, sig, backend="reference")
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-9)


def test_mixture_non_contiguous_inputs():
    rng = np.random.default_rng(3)
    x, mu, sigma = _bank(rng, 3, 4, 5, 6, False, "CT")
    xt = t64(x).t().contiguous().t()  # same values, transposed strides
    mut = t64(mu).permute(2, 0, 1).contiguous().permute(1, 2, 0)
    st_ = t64(sigma).t().contiguous().t()
    assert not xt.is_contiguous() and not mut.is_contiguous()
    got = gf.mixture_log_likelihood(xt, mut, st_, backend="reference")
    np.testing.assert_allclose(got.numpy(), np_mixture_loglik(x, mu, sigma), rtol=1e-10)


def test_mixture_sigma_scales_and_large_negative():
    """sigma spanning 1e-3..1e2 in one bank; log-densities near -1e7 stay finite and exact."""
    rng = np.random.default_rng(11)
    b, c, t, d = 2, 3, 4, 8
    x, mu, _ = _bank(rng, b, c, t, d, False, "CT")
    sigma = np.logspace(-3, 2, c * t).reshape(c, t)
    got = gf.mixture_log_likelihood(t64(x), t64(mu), t64(sigma), backend="reference")
    np.testing.assert_allclose(got.numpy(), np_mixture_loglik(x, mu, sigma), rtol=1e-10)
    # One far-away image: quad ~ 2e7 -> log-density ~ -1e7.
    x_far = x + math.sqrt(2e7 / d) * 1e-3
    sig_small = np.full((c, t), 1e-3)
    got = gf.mixture_log_likelihood(t64(x_far), t64(mu), t64(sig_small), backend="reference")
    want = np_mixture_loglik(x_far, mu, sig_small)
    assert np.all(want < -1e6)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)


def test_mixture_x_equal_to_mean():
    """x on a mean with a small sigma: the winning component's quadratic term is exactly 0."""
    rng = np.random.default_rng(5)
    _, mu, _ = _bank(rng, 1, 3, 4, 16, False, "CT")
    x = mu[1, 2][None].copy()
    sigma = np.full((3, 4), 1e-3)
    got = gf.mixture_log_likelihood(t64(x), t64(mu), t64(sigma), backend="reference")
    # component (1, 2) dominates: log p(x|1) = log N(0) - log T
    want_1 = -16 * math.log(1e-3) - 8 * math.log(2 * math.pi) - math.log(4)
    assert got[0, 1].item() == pytest.approx(want_1, rel=1e-12)
    np.testing.assert_allclose(got.numpy(), np_mixture_loglik(x, mu, sigma), rtol=1e-12)


def test_mixture_low_precision_inputs_compute_in_fp32():
    rng = np.random.default_rng(2)
    x, mu, sigma = _bank(rng, 2, 3, 4, 5, False, "CT")
    got = gf.mixture_log_likelihood(
        t64(x).bfloat16(), t64(mu).bfloat16(), t64(sigma).float(), backend="reference"
    )
    assert got.dtype == torch.float32
    want = np_mixture_loglik(
        t64(x).bfloat16().double().numpy(), t64(mu).bfloat16().double().numpy(), sigma
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-4)


def test_mixture_gradcheck():
    rng = np.random.default_rng(9)
    x, mu, sigma = _bank(rng, 2, 3, 4, 3, False, "CT")
    args = [t64(a).requires_grad_() for a in (x, mu, sigma)]
    assert torch.autograd.gradcheck(
        lambda a, m, s: R.mixture_log_likelihood(a, m, s), args, eps=1e-6, atol=1e-5
    )


# ---------------------------------------------------------------------------------------------
# Bad input to mixture_log_likelihood
# ---------------------------------------------------------------------------------------------


def _good():
    return torch.randn(2, 5), torch.randn(3, 4, 5), torch.rand(3, 4) + 0.5


@pytest.mark.parametrize(
    "mutate, exc, word",
    [
        (lambda x, m, s: (x, torch.randn(3, 4, 6), s), ValueError, "mu"),
        (lambda x, m, s: (x, torch.randn(4, 5), s), ValueError, "mu"),
        (lambda x, m, s: (x, m, torch.rand(4, 3)), ValueError, "sigma"),
        (lambda x, m, s: (x, m, -s), ValueError, "sigma"),
        (lambda x, m, s: (x, m, s.masked_fill(s > 0.9, 0.0)), ValueError, "sigma"),
        (lambda x, m, s: (x, m, s.masked_fill(s > 0.9, float("nan"))), ValueError, "sigma"),
        (lambda x, m, s: (x.double(), m, s), TypeError, "dtype"),
        (lambda x, m, s: (x.long(), m, s), TypeError, "x"),
        (lambda x, m, s: (x[0], m, s), ValueError, "x"),
        (lambda x, m, s: (x.to("meta"), m, s), ValueError, "device"),
    ],
)
def test_mixture_bad_input(mutate, exc, word):
    x, m, s = mutate(*_good())
    with pytest.raises(exc, match=word):
        gf.mixture_log_likelihood(x, m, s)


def test_mixture_bad_class_index_and_options():
    x, m, s = _good()
    with pytest.raises(ValueError, match="class_index"):
        gf.mixture_log_likelihood(x, m, s, class_index=torch.tensor([[0, 3], [1, 2]]))
    with pytest.raises(ValueError, match="class_index"):
        gf.mixture_log_likelihood(x, m, s, class_index=torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="class_index"):
        gf.mixture_log_likelihood(x, m, s, class_index=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="precision"):
        gf.mixture_log_likelihood(x, m, s, precision="fp8")
    with pytest.raises(ValueError, match="backend"):
        gf.mixture_log_likelihood(x, m, s, backend="cuda")


# ---------------------------------------------------------------------------------------------
# Posterior and KL loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prior", [None, "C", "BC"])
def test_class_posterior_matches_scipy(prior):
    rng = np.random.default_rng(1)
    ll = rng.standard_normal((4, 7)) * 1e3 - 5e6  # log-likelihoods are large and negative
    lp = None
    if prior == "C":
        lp = np.log(rng.dirichlet(np.ones(7)))
    elif prior == "BC":
        lp = np.log(rng.dirichlet(np.ones(7), size=4))
    got = gf.class_posterior(t64(ll), None if lp is None else t64(lp))
    want = softmax(ll + (0.0 if lp is None else lp), axis=1)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-300)


def test_class_posterior_uniform_prior_is_explicit_uniform():
    ll = torch.randn(3, 5, dtype=torch.float64)
    explicit = gf.class_posterior(ll, torch.full((5,), -math.log(5), dtype=torch.float64))
    torch.testing.assert_close(gf.class_posterior(ll), explicit, rtol=0, atol=1e-15)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_posterior_kl_matches_numpy(reduction):
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((5, 6)) * 3
    ll = rng.standard_normal((5, 6)) * 50
    p = softmax(ll, axis=1)
    logq = logits - logsumexp(logits, axis=1, keepdims=True)
    kl = (p * (np.log(p) - logq)).sum(1)
    want = {"batchmean": kl.mean(), "sum": kl.sum(), "none": kl}[reduction]
    got = gf.posterior_kl_loss(t64(logits), t64(ll), reduction=reduction)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)


def test_posterior_kl_one_class_dominating_and_ties():
    # Teacher puts all mass on one class (others underflow to exactly 0): no NaN, KL = -log q.
    logits = torch.randn(2, 4, dtype=torch.float64)
    ll = torch.tensor([[0.0, -1e7, -1e7, -1e7], [-1e7, -1e7, 0.0, -1e7]], dtype=torch.float64)
    got = gf.posterior_kl_loss(logits, ll, reduction="none")
    logq = torch.log_softmax(logits, 1)
    torch.testing.assert_close(got, torch.stack([-logq[0, 0], -logq[1, 2]]))
    # All classes tied and a uniform student: KL = 0.
    assert gf.posterior_kl_loss(torch.zeros(3, 5), torch.full((3, 5), -4e6)).item() == 0.0


def test_posterior_kl_gradient_into_logits_only():
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ll = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    gf.posterior_kl_loss(logits, ll).backward()
    assert ll.grad is None
    # d KL / d logits = (q - p) / B
    q = torch.softmax(logits.detach(), 1)
    p = torch.softmax(ll.detach(), 1)
    torch.testing.assert_close(logits.grad, (q - p) / 3)
    ll.grad = None
    logits.grad = None
    gf.posterior_kl_loss(logits, ll, detach_teacher=False).backward()
    assert ll.grad is not None and torch.isfinite(ll.grad).all()


def test_posterior_kl_class_index():
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((2, 6))
    ll = rng.standard_normal((2, 3)) * 4
    ci = np.array([[0, 4, 5], [2, 1, 3]])
    got = gf.posterior_kl_loss(t64(logits), t64(ll), class_index=torch.from_numpy(ci))
    lg = np.take_along_axis(logits, ci, 1)
    p = softmax(ll, 1)
    kl = (p * (np.log(p) - (lg - logsumexp(lg, 1, keepdims=True)))).sum(1).mean()
    assert got.item() == pytest.approx(kl, rel=1e-12)


def test_posterior_bad_input():
    ll = torch.randn(3, 4)
    with pytest.raises(ValueError, match="log_likelihood"):
        gf.class_posterior(torch.randn(3))
    with pytest.raises(ValueError, match="log_prior"):
        gf.class_posterior(ll, torch.randn(5))
    with pytest.raises(ValueError, match="reduction"):
        gf.posterior_kl_loss(ll, ll, reduction="mean")
    with pytest.raises(ValueError, match="same shape"):
        gf.posterior_kl_loss(torch.randn(3, 5), ll)
    with pytest.raises(ValueError, match="class_index"):
        gf.posterior_kl_loss(torch.randn(3, 5), ll, class_index=torch.full((3, 4), 5))
    with pytest.raises(TypeError, match="logits"):
        gf.posterior_kl_loss(torch.ones(3, 4, dtype=torch.long), ll)


# ---------------------------------------------------------------------------------------------
# Gradient alignment (reference vs the literal NumPy transcription)
# ---------------------------------------------------------------------------------------------

SHAPES = [(3, 4), (5,), (2, 2, 2), (1,), (7,)]


def _grads(rng, kind):
    ps = [rng.standard_normal(s) for s in SHAPES]
    if kind == "random":
        gs = [rng.standard_normal(s) for s in SHAPES]
    elif kind == "parallel":
        gs = [2.5 * p for p in ps]
    elif kind == "antiparallel":
        gs = [-0.5 * p for p in ps]
    elif kind == "zero_g":
        gs = [np.zeros(s) for s in SHAPES]
    else:  # orthogonal per tensor: remove the projection on p
        gs = []
        for p in ps:
            g = rng.standard_normal(p.shape)
            g = g - (g.ravel() @ p.ravel()) / (p.ravel() @ p.ravel()) * p
            gs.append(g)
    return ps, gs


@pytest.mark.parametrize("mode", R.ALIGN_MODES)
@pytest.mark.parametrize("k", [0.0, 1.0, 2.0, 3.5])
@pytest.mark.parametrize("kind", ["random", "parallel", "antiparallel", "orthogonal", "zero_g"])
@pytest.mark.parametrize("groups", [None, "global", [[0, 2], [4, 1]], [[3], []]])
def test_align_reference_matches_numpy(mode, k, kind, groups):
    # crc32, not hash(): str hashes change with PYTHONHASHSEED, and the cases must not.
    rng = np.random.default_rng(zlib.crc32(repr((mode, k, kind, groups)).encode()))
    ps, gs = _grads(rng, kind)
    got = R.align_gradients(
        [t64(p) for p in ps], [t64(g) for g in gs], groups=groups, k=k, mode=mode
    )
    want = np_align(ps, gs, groups, k, 0.7, 0.3, mode)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-10, atol=1e-12)


def test_align_alpha_limits():
    """Parallel gradients (cos=1, alpha=1) leave w_p p + w_g g; anti-parallel with k=0 too."""
    p = torch.randn(10, dtype=torch.float64)
    (upd,) = R.align_gradients([p], [3 * p], k=2.0)
    torch.testing.assert_close(upd, 0.7 * p + 0.3 * 3 * p)
    (upd,) = R.align_gradients([p], [-p], k=0.0)
    torch.testing.assert_close(upd, 0.7 * p - 0.3 * p)
    # anti-parallel, k=2: alpha = 0, each aligned gradient loses its projection entirely
    (upd,) = R.align_gradients([p], [-p], k=2.0)
    torch.testing.assert_close(upd, torch.zeros_like(p), atol=1e-12, rtol=0)


def test_align_missing_gradient_and_nonfinite():
    p = torch.randn(4, dtype=torch.float64)
    got = gf.align_gradients([p, None, None], [None, p, None], backend="reference")
    torch.testing.assert_close(got[0], 0.7 * p)
    torch.testing.assert_close(got[1], 0.3 * p)
    assert got[2] is None
    bad = p.clone()
    bad[1] = float("inf")
    upd = gf.align_gradients([bad, p], [p, p], groups=[[0], [1]], backend="reference")
    assert not torch.isfinite(upd[0]).any()  # the whole group is non-finite
    assert torch.isfinite(upd[1]).all()  # the other group is untouched


def test_align_tiny_and_huge_magnitudes():
    rng = np.random.default_rng(0)
    ps, gs = _grads(rng, "random")
    for scale in (1e-30, 1e30):
        got = R.align_gradients(
            [t64(p * scale).float() for p in ps],
            [t64(g * scale).float() for g in gs],
            groups="global",
        )
        want = np_align(
            [t64(p * scale).float().double().numpy() for p in ps],
            [t64(g * scale).float().double().numpy() for g in gs],
            "global",
            2.0,
            0.7,
            0.3,
            "symmetric",
        )
        for a, b in zip(got, want):
            np.testing.assert_allclose(a.double().numpy(), b, rtol=1e-5, atol=scale * 1e-6)


@pytest.mark.parametrize(
    "kwargs, exc, word",
    [
        ({"groups": [[0, 1], [1]]}, ValueError, "overlap"),
        ({"groups": [[0, 5]]}, ValueError, "out of range"),
        ({"groups": [[0, "a"]]}, TypeError, "groups"),
        ({"groups": "all"}, TypeError, "groups"),
        ({"k": -1.0}, ValueError, "k"),
        ({"k": float("nan")}, ValueError, "k"),
        ({"mode": "both"}, ValueError, "mode"),
        ({"w_p": "0.7"}, TypeError, "w_p"),
    ],
)
def test_align_bad_options(kwargs, exc, word):
    ps = [torch.randn(3), torch.randn(2)]
    with pytest.raises(exc, match=word):
        gf.align_gradients(ps, [p.clone() for p in ps], **kwargs)


def test_align_bad_gradient_lists():
    with pytest.raises(ValueError, match="same length"):
        gf.align_gradients([torch.randn(3)], [])
    with pytest.raises(ValueError, match="shape"):
        gf.align_gradients([torch.randn(3)], [torch.randn(4)])
    with pytest.raises(TypeError, match="dtype"):
        gf.align_gradients([torch.randn(3)], [torch.randn(3, dtype=torch.float64)])
    with pytest.raises(TypeError, match="grads_p"):
        gf.align_gradients(torch.randn(3), [torch.randn(3)])
