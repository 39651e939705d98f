"""Eager PyTorch reference of every GenRep op (docs/METHOD.md).

These functions are the oracle of the tests and the eager baseline of the benchmarks: they are
written for clarity, not speed (``mixture_log_likelihood`` materialises ``[B, C, T, D]``). They do
not validate their arguments; the public API in ``genrep_fast`` does that before dispatching here.

Conventions (shapes, dtypes): ``genrep_fast.layout``, shared with the fast paths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from genrep_fast.layout import (  # noqa: F401  (re-exported: the oracle's conventions)
    LOG_2PI,
    bank_view,
    compute_dtype,
    is_diagonal,
    is_per_image,
    sum_to_sigma_shape,
)

ALIGN_MODES = ("symmetric", "generation", "perception", "none")


def thinned_steps(num_steps: int, burn_in: int = 50, thin: int = 2) -> list[int]:
    """0-based positions kept from an N-step reverse chain: ``burn_in, burn_in + thin, ... < N``."""
    return list(range(burn_in, num_steps, thin))


def gaussian_log_density(
    x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, diagonal: bool
) -> torch.Tensor:
    """log N(x; mu, sigma^2) over the last dim (D values), in the difference form.

    ``x``, ``mu`` broadcast to ``[..., D]``. Isotropic: ``sigma`` broadcasts to ``[...]``;
    diagonal: to ``[..., D]``.
    """
    d = x.shape[-1]
    diff = x - mu
    if diagonal:
        quad = (diff / sigma).square().sum(-1)
        log_det = torch.log(sigma).sum(-1)
    else:
        quad = diff.square().sum(-1) / sigma.square()
        log_det = d * torch.log(sigma)
    return -0.5 * quad - log_det - 0.5 * d * LOG_2PI


def _bank_as_bctd(
    x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, class_index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Bring the bank to ``mu: [B or 1, C', T, D]`` and sigma to ``[B or 1, C', T(, D)]``."""
    b = x.shape[0]
    view = bank_view(x, mu, sigma)
    mu4, s4 = view.mu, view.sigma_expanded()
    if not view.per_image:
        mu4, s4 = mu4[None], s4[None]
    diagonal = view.diagonal
    t = view.num_steps
    if class_index is not None:
        k = class_index.shape[1]
        idx = class_index.reshape(b, k, 1)
        mu4 = torch.gather(
            mu4.expand(b, -1, -1, -1), 1, idx[..., None].expand(b, k, t, mu4.shape[-1])
        )
        if diagonal:
            s4 = torch.gather(
                s4.expand(b, -1, -1, -1), 1, idx[..., None].expand(b, k, t, s4.shape[-1])
            )
        else:
            s4 = torch.gather(s4.expand(b, -1, -1), 1, idx.expand(b, k, t))
    return mu4, s4, diagonal


def mixture_log_likelihood(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    *,
    class_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(x|y) = logsumexp_t log N(x; mu[y,t], sigma[y,t]^2) - log T  ->  ``[B, C]`` or ``[B, K]``.

    Differentiable with respect to ``x``, ``mu`` and ``sigma`` through ordinary autograd.
    """
    dt = compute_dtype(x.dtype)
    b = x.shape[0]
    xf = x.reshape(b, 1, 1, -1).to(dt)
    mu4, s4, diagonal = _bank_as_bctd(x, mu.to(dt), sigma.to(dt), class_index)
    t = mu4.shape[2]
    log_n = gaussian_log_density(xf, mu4, s4, diagonal)  # [B, C', T]
    if log_n.requires_grad:
        log_n = _no_gradient_at_zero_density(xf, mu4, s4, diagonal, log_n)
    return torch.logsumexp(log_n, dim=-1) - math.log(t)


def _no_gradient_at_zero_density(xf, mu4, s4, diagonal, log_n):
    """Non-finite policy (docs/METHOD.md): a step of zero density (score -inf: an infinite
    difference, or a quadratic term past the float range) has weight 0 and passes no gradient, nor
    does an entry whose every step has zero density. Plain autograd would multiply that zero by
    the step's infinite terms (0 * inf = NaN): such steps are recomputed on a zero difference,
    which carries their (zero) gradient, while their score stays -inf."""
    dead = torch.isneginf(log_n.detach())
    # One host sync to skip the second pass when nothing is dead; a compiled graph always runs it.
    if not torch.compiler.is_compiling() and not bool(dead.any()):
        return log_n
    keep = ~dead[..., None]
    zero = xf.new_zeros(())
    safe = gaussian_log_density(
        torch.where(keep, xf, zero), torch.where(keep, mu4, zero), s4, diagonal
    )
    return torch.where(dead, float("-inf"), safe)


def log_class_posterior(
    log_likelihood: torch.Tensor, log_prior: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(y|x) = log_softmax_y(log p(x|y) + log p(y)); uniform prior when ``log_prior`` is None."""
    dt = compute_dtype(log_likelihood.dtype)
    scores = log_likelihood.to(dt)
    if log_prior is not None:
        scores = scores + log_prior.to(dt)
    return torch.log_softmax(scores, dim=-1)


def class_posterior(
    log_likelihood: torch.Tensor, log_prior: torch.Tensor | None = None
) -> torch.Tensor:
    """p(y|x) = softmax_y(log p(x|y) + log p(y))  ->  ``[B, C]``."""
    return log_class_posterior(log_likelihood, log_prior).exp()


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(KL(p || q) [B], p [B, C])`` from ``log p, log q: [B, C]``, summed over the classes.

    0 * log 0 = 0: classes the teacher rules out contribute nothing. ``p == 0``, not ``p > 0``: a
    NaN teacher (a NaN or +inf log-likelihood, a row of -inf) must give a NaN loss, not 0.
    """
    p = log_p.exp()
    return torch.where(p == 0, torch.zeros_like(p), p * (log_p - log_q)).sum(-1), p


def posterior_kl_loss(
    logits: torch.Tensor,
    log_likelihood: torch.Tensor,
    log_prior: torch.Tensor | None = None,
    reduction: str = "batchmean",
    *,
    class_index: torch.Tensor | None = None,
    detach_teacher: bool = True,
) -> torch.Tensor:
    """KL(p || q), p = class posterior (the teacher), q = softmax(logits).

    With ``class_index: [B, K]`` the logits ``[B, C]`` are gathered to the K candidate classes and
    both distributions live on those K. ``reduction``: "batchmean" (sum over classes, mean over the
    batch), "sum", or "none" (``[B]``).
    """
    if class_index is not None:
        logits = torch.gather(logits, 1, class_index)
    log_p = log_class_posterior(log_likelihood, log_prior)
    if detach_teacher:
        log_p = log_p.detach()
    log_q = torch.log_softmax(logits.to(log_p.dtype), dim=-1)
    per_image, _ = kl_divergence(log_p, log_q)
    if reduction == "none":
        return per_image
    if reduction == "sum":
        return per_image.sum()
    return per_image.mean()


# ---------------------------------------------------------------------------------------------
# Gradient alignment (docs/METHOD.md section 3)
# ---------------------------------------------------------------------------------------------


def alignment_coefficients(
    sums: torch.Tensor, k: float, w_p: float, w_g: float, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(a, b)`` with ``update = a * p + b * g`` from ``sums: [G, 3] = (<p,g>, |p|^2, |g|^2)``.

    Pure tensor ops on the device of ``sums`` (no host sync). A group whose sums are not finite
    gets ``a = b = nan`` so its update is non-finite and a grad scaler skips the step.
    """
    d, pp, gg = sums.unbind(-1)
    zero = torch.zeros_like(d)
    # sqrt(|p|^2) * sqrt(|g|^2), not sqrt(|p|^2 |g|^2): the product under- or overflows first.
    norm_prod = pp.sqrt() * gg.sqrt()
    cos = torch.where(norm_prod > 0, d / torch.where(norm_prod > 0, norm_prod, 1.0), zero)
    # |cos| can exceed 1 by a rounding error; alpha's base must stay in [0, 1].
    alpha = ((cos.clamp(-1.0, 1.0) + 1.0) * 0.5) ** k
    proj_on_p = torch.where(pp > 0, d / torch.where(pp > 0, pp, 1.0), zero)  # par_g = proj_on_p * p
    proj_on_g = torch.where(gg > 0, d / torch.where(gg > 0, gg, 1.0), zero)  # par_p = proj_on_g * g
    a_aligned = w_p + w_g * (alpha - 1.0) * proj_on_p
    b_aligned = w_g + w_p * (alpha - 1.0) * proj_on_g
    a_plain = torch.full_like(d, w_p)
    b_plain = torch.full_like(d, w_g)
    a = a_aligned if mode in ("symmetric", "generation") else a_plain
    b = b_aligned if mode in ("symmetric", "perception") else b_plain
    finite = torch.isfinite(sums).all(-1)
    nan = torch.full_like(d, float("nan"))
    return torch.where(finite, a, nan), torch.where(finite, b, nan)


def resolve_groups(groups, n: int) -> list[int]:
    """Group id per tensor (-1: in no group) from None (one per tensor), "global" or index lists."""
    if groups is None:
        return list(range(n))
    if groups == "global":
        return [0] * n
    ids = [-1] * n
    for gi, members in enumerate(groups):
        for i in members:
            ids[i] = gi
    return ids


def num_groups(groups, n: int) -> int:
    if groups is None:
        return n
    if groups == "global":
        return 1 if n else 0
    return len(groups)


def align_gradients(
    grads_p: Sequence[torch.Tensor | None],
    grads_g: Sequence[torch.Tensor | None],
    *,
    groups=None,
    k: float = 2.0,
    w_p: float = 0.7,
    w_g: float = 0.3,
    mode: str = "symmetric",
) -> list[torch.Tensor | None]:
    """The aligned update per tensor, written the way a user would by hand: one group at a time.

    The three sums are accumulated in float64 whatever the gradients' dtype (float32 squares
    underflow below ~1e-19 and overflow above ~1.8e19); the update is returned in each gradient's
    dtype. A missing gradient counts as zeros; a tensor with both missing gets None.
    """
    n = len(grads_p)
    pairs = []
    for p, g in zip(grads_p, grads_g):
        if p is None and g is None:
            pairs.append((None, None))
        else:
            pairs.append(
                (
                    p if p is not None else torch.zeros_like(g),
                    g if g is not None else torch.zeros_like(p),
                )
            )
    ids = resolve_groups(groups, n)
    g_count = num_groups(groups, n)
    out: list[torch.Tensor | None] = [None] * n
    for grp in range(-1, g_count):
        members = [i for i in range(n) if ids[i] == grp and pairs[i][0] is not None]
        if not members:
            continue
        if grp < 0:
            a = torch.tensor(w_p, dtype=torch.float64)
            b = torch.tensor(w_g, dtype=torch.float64)
        else:
            dev = pairs[members[0]][0].device
            sums = torch.zeros(3, dtype=torch.float64, device=dev)
            for i in members:
                p64, g64 = pairs[i][0].double(), pairs[i][1].double()
                sums = sums + torch.stack([(p64 * g64).sum(), (p64 * p64).sum(), (g64 * g64).sum()])
            a, b = alignment_coefficients(sums[None], k, w_p, w_g, mode)
            a, b = a[0], b[0]
        for i in members:
            p, g = pairs[i]
            dev = p.device
            upd = a.to(dev) * p.double() + b.to(dev) * g.double()
            out[i] = upd.to(p.dtype)
    return out
