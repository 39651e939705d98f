"""The mixture log-likelihood in chunked torch code: ``backend="torch"`` of
``genrep_fast.mixture_log_likelihood`` and, under ``backend="auto"``, its CPU path for a shared bank
without candidate classes (any device torch runs on; no compiled code).

Same math as ``genrep_fast.reference.mixture_log_likelihood`` (docs/METHOD.md section 1) without ever
materialising ``[B, C, T, D]``: the classes are processed in chunks whose temporaries stay under
``CHUNK_BYTES``, so the extra memory is O(B*C + chunk).

* Shared bank ``mu: [C, T, D]``: the GEMM form ``|x|^2 - 2 x.mu + |mu|^2`` (diagonal sigma:
  ``[x^2, x] . [1/sigma^2, -2 mu/sigma^2] + sum mu^2/sigma^2``) computed in ``gemm_dtype``
  (float64 by default). float64 keeps the cancellation error of that form at about
  ``1e-16 * (|x|^2 + |mu|^2) / sigma^2`` nats, far below the float32 rounding of the result;
  float32 would lose whole nats when x is near a mean and sigma is small (docs/NUMERICS.md).
  The bank's copy in the GEMM dtype and its row norms are made per call from the tensors given;
  a ``genrep_fast.PreparedBank`` passes them in, made once (``GemmBank``, ``prepared=``).
* Per-image bank ``mu: [B, C, T, D]``: the exact difference form ``(x - mu)^2`` in the compute
  dtype (float32, or float64 for float64 inputs); it is memory-bound anyway.
* Candidate classes ``class_index: [B, K]`` into a shared bank: the GEMM form over the classes
  that occur in ``class_index`` (at most ``min(C, B*K)``), then a gather.

On CPU, ``backend="auto"`` sends the per-image bank and candidate classes to the C++ kernels of
``genrep_fast.mixture_cpp`` instead (several times faster, bench/bench_posterior.py).

``forward`` returns ``log p(x|y)``; ``backward`` recomputes the scores and the mixture weights
chunk by chunk (flash-attention's trick), so ``[B, C, T]`` is never stored either. The LSE is
recomputed from those scores (every chunk holds all T of its classes) instead of read from the
saved float32 result, whose rounding at |ll| ~ 1e5..1e7 would scale every weight. Both run without
autograd; ``genrep_fast.posterior`` wires them into a custom op.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from genrep_fast.layout import LOG_2PI, bank_view, compute_dtype, is_diagonal, sum_to_sigma_shape

# Bytes of temporaries per class chunk (scores, weights, converted bank rows). At 16 MiB the
# realistic CPU case (B=64, C=10, T=75, D=1024; 1.4 MB per class) runs in one chunk and its
# measured extra peak memory is 14 MB (the eager reference: 375 MB), bench/bench_posterior.py.
CHUNK_BYTES = 16 * 2**20


def _classes_per_chunk(per_class_bytes: int, num_classes: int, chunk_bytes: int | None) -> int:
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(1, min(num_classes, budget // max(per_class_bytes, 1)))


def _log_norm_iso(sig: torch.Tensor, d: int) -> torch.Tensor:
    return -d * torch.log(sig) - 0.5 * d * LOG_2PI


# ------------------------------------------------------------------------------------------------
# Shared bank: GEMM form
# ------------------------------------------------------------------------------------------------


def _shared_chunk_scores(x2, xx, x_sq, mu_c, sig_c, diagonal, mm_c=None):
    """Scores ``log N(x_b; mu_ct, sigma_ct^2)`` ``[B, cc, T]`` and the quadratic term.

    ``x2: [B, D]``, ``xx = |x|^2: [B]``, ``x_sq = x^2`` (diagonal only), ``mu_c: [cc, T, D]``,
    ``sig_c: [cc, T]`` or ``[cc, T, D]``, all in the GEMM dtype; ``mm_c``: optional precomputed
    ``|mu|^2`` ``[cc*T]`` (isotropic only).
    """
    cc, t, d = mu_c.shape
    b = x2.shape[0]
    mu_flat = mu_c.reshape(cc * t, d)
    if diagonal:
        ivar = sig_c.reshape(cc * t, d).square().reciprocal()
        quad = x_sq @ ivar.T - 2.0 * (x2 @ (mu_flat * ivar).T)
        mm = (mu_flat.square() * ivar).sum(-1)
        quad += mm
        log_norm = -torch.log(sig_c).sum(-1).reshape(1, cc * t) - 0.5 * d * LOG_2PI
        # Rounding can push |x - mu|^2 slightly below 0 when x is on a mean.
        s = -0.5 * quad.clamp_min_(0.0) + log_norm
    else:
        mm = mu_flat.square().sum(-1) if mm_c is None else mm_c
        quad = (x2 @ mu_flat.T).mul_(-2.0)
        quad += xx[:, None]
        quad += mm
        quad.clamp_min_(0.0)
        sig_flat = sig_c.reshape(1, cc * t)
        s = -0.5 * quad / sig_flat.square() + _log_norm_iso(sig_flat, d)
    s, quad = _difference_form_where_not_finite(s, quad, x2, xx, mu_flat, mm)
    return s.reshape(b, cc, t), quad.reshape(b, cc, t)


def _difference_form_where_not_finite(s, quad, x2, xx, mu_flat, mm):
    """Non-finite policy (docs/METHOD.md) for the GEMM form, whose ``|x|^2 - 2 x.mu + |mu|^2``
    means nothing once an image or a bank row holds inf or NaN (inf - inf). Those pairs get the
    difference form's value: NaN where a NaN takes part or where x and mu hold the same infinity
    at one position (x_d - mu_d = inf - inf), else zero density (score -inf, quadratic term inf).
    ``s, quad: [B, R]`` over bank rows ``mu_flat: [R, D]``; ``xx``, ``mm``: the squared norms,
    non-finite exactly where a row is. One host sync; a second pass only with such rows."""
    bad_x, bad_mu = ~torch.isfinite(xx), ~torch.isfinite(mm)
    if not bool(bad_x.any() | bad_mu.any()):
        return s, quad
    # A NaN in a row makes its squared norm NaN (a NaN diagonal sigma too: mm sums mu^2 / sigma^2).
    nan = torch.isnan(xx)[:, None] | torch.isnan(mm)[None, :]
    for same_infinity in (torch.isposinf, torch.isneginf):
        # Count, per pair, the positions where both hold this infinity: one small GEMM.
        hits = same_infinity(x2).to(x2.dtype) @ same_infinity(mu_flat).to(x2.dtype).T
        nan |= hits > 0
    bad = bad_x[:, None] | bad_mu[None, :]
    nan_or = torch.where(nan, float("nan"), float("inf"))
    return torch.where(bad, -nan_or, s), torch.where(bad, nan_or, quad)


class GemmBank(NamedTuple):
    """A shared bank in the GEMM dtype: what ``_shared_forward`` / ``_shared_backward`` convert on
    every call, computed once by ``gemm_bank`` for a prepared bank (``genrep_fast.PreparedBank``).

    ``mu: [C, T, D]`` and ``sigma: [C, T]`` (isotropic, broadcast filled in) or ``[C, T, D]``
    (diagonal), contiguous in the GEMM dtype; ``mm: [C*T]`` the row norms ``|mu|^2`` (isotropic;
    an empty tensor for a diagonal bank, whose norms depend on sigma per value).
    """

    mu: torch.Tensor
    sigma: torch.Tensor
    mm: torch.Tensor


def gemm_bank(mu: torch.Tensor, sigma: torch.Tensor, gemm_dtype=torch.float64) -> GemmBank:
    """``GemmBank`` of a shared bank ``mu: [C, T, *latent]`` (sigma as ``mixture_log_likelihood``
    takes it). A ``mu`` already contiguous in the GEMM dtype is used as is (a view, no copy)."""
    c, t = mu.shape[0], mu.shape[1]
    mu3 = mu.reshape(c, t, -1).to(gemm_dtype).contiguous()
    if is_diagonal(mu, sigma):
        sig = sigma.reshape(mu3.shape).to(gemm_dtype).contiguous()
        return GemmBank(mu3, sig, mu3.new_empty(0))
    sig = sigma.expand(c, t).to(gemm_dtype).contiguous()
    return GemmBank(mu3, sig, mu3.reshape(c * t, -1).square().sum(-1))


def _shared_forward(x2, mu3, sig, diagonal, gemm_dtype, chunk_bytes, mm=None):
    """``[B, C]`` LSE over T of the shared bank (without the ``- log T``).

    ``mm``: the row norms ``|mu|^2`` ``[C*T]`` in the GEMM dtype (isotropic; a prepared bank's
    ``GemmBank.mm``), else computed per chunk. ``mu3`` / ``sig`` already in the GEMM dtype (a
    ``GemmBank``) are used without a copy.
    """
    b, d = x2.shape
    c, t, _ = mu3.shape
    xg = x2.to(gemm_dtype)
    xx = xg.square().sum(-1)
    x_sq = xg.square() if diagonal else None
    es = torch.finfo(gemm_dtype).bits // 8
    per_class = es * (t * d * (3 if diagonal else 2) + 4 * b * t)
    cc = _classes_per_chunk(per_class, c, chunk_bytes)
    out = torch.empty(b, c, dtype=gemm_dtype, device=x2.device)
    for c0 in range(0, c, cc):
        c1 = min(c, c0 + cc)
        mm_c = None if mm is None or diagonal else mm[c0 * t : c1 * t]
        mu_c, sig_c = mu3[c0:c1].to(gemm_dtype), sig[c0:c1].to(gemm_dtype)
        s, _ = _shared_chunk_scores(xg, xx, x_sq, mu_c, sig_c, diagonal, mm_c)
        out[:, c0:c1] = torch.logsumexp(s, dim=-1)
    return out


def _shared_backward(grad, x2, mu3, sig, diagonal, gemm_dtype, chunk_bytes, needs):
    """Gradients of ``sum(grad * lse)`` w.r.t. ``x2 [B, D]``, ``mu3 [C, T, D]`` and ``sig``.

    Gradients not in ``needs = (x, mu, sigma)`` are None.
    """
    b, d = x2.shape
    c, t, _ = mu3.shape
    xg = x2.to(gemm_dtype)
    xx = xg.square().sum(-1)
    x_sq = xg.square() if diagonal else None
    out_dtype = compute_dtype(x2.dtype)
    # The gradient products see infinite inputs as 0: their pairs have weight 0 (zero density) or
    # NaN (which the weights carry), and 0 * inf would be NaN (docs/METHOD.md).
    xg_grad, x_sq_grad = xg, x_sq
    if not bool(torch.isfinite(xx).all()):
        xg_grad, x_sq_grad = _finite_or_zero(xg), None if x_sq is None else _finite_or_zero(x_sq)
    g = grad.to(gemm_dtype)
    gx = torch.zeros_like(xg) if needs[0] else None
    gmu = torch.empty(mu3.shape, dtype=gemm_dtype, device=x2.device) if needs[1] else None
    gsig = torch.empty(sig.shape, dtype=gemm_dtype, device=x2.device) if needs[2] else None
    es = torch.finfo(gemm_dtype).bits // 8
    per_class = es * (t * d * (5 if diagonal else 3) + 6 * b * t)
    cc = _classes_per_chunk(per_class, c, chunk_bytes)
    for c0 in range(0, c, cc):
        c1 = min(c, c0 + cc)
        n = c1 - c0
        mu_c = mu3[c0:c1].to(gemm_dtype)
        sig_c = sig[c0:c1].to(gemm_dtype)
        s, quad = _shared_chunk_scores(xg, xx, x_sq, mu_c, sig_c, diagonal)
        # Mixture weights times the incoming gradient: dL/ds_bct. The LSE comes from these very
        # scores (all T of a class are in the chunk), not from the saved float32 ll, whose
        # rounding (ulp(|ll|): 0.06 nats at -6e5) would scale every weight.
        w = _mixture_weights(s, t, out_dtype) * g[:, c0:c1, None]
        w_flat = w.reshape(b, n * t)
        if bool(torch.isinf(quad).any()):  # a zero-density pair: weight 0, no contribution
            mu_c = _finite_or_zero(mu_c)
            quad = torch.where(w == 0, 0.0, quad)
        mu_flat = mu_c.reshape(n * t, d)
        w_sum = w_flat.sum(0)  # [n*T]
        if diagonal:
            sig_flat = sig_c.reshape(n * t, d)
            ivar = sig_flat.square().reciprocal()
            if gx is not None:
                # ds/dx = (mu - x) / sigma^2
                gx += w_flat @ (mu_flat * ivar) - xg_grad * (w_flat @ ivar)
            wx = w_flat.T @ xg_grad  # [n*T, D]
            if gmu is not None:
                gmu[c0:c1] = (ivar * (wx - mu_flat * w_sum[:, None])).reshape(n, t, d)
            if gsig is not None:
                # sum_b w (x - mu)^2 = W^T x^2 - 2 mu W^T x + mu^2 sum_b w
                wq = w_flat.T @ x_sq_grad - 2.0 * mu_flat * wx + mu_flat.square() * w_sum[:, None]
                gs = wq * ivar / sig_flat - w_sum[:, None] / sig_flat
                gsig[c0:c1] = gs.reshape(n, t, d)
        else:
            sig_flat = sig_c.reshape(n * t)
            ivar = sig_flat.square().reciprocal()
            a = w_flat * ivar  # [B, n*T]
            if gx is not None:
                gx += a @ mu_flat - xg_grad * a.sum(1, keepdim=True)
            if gmu is not None:
                gmu[c0:c1] = (a.T @ xg_grad - mu_flat * a.sum(0)[:, None]).reshape(n, t, d)
            if gsig is not None:
                # ds/dsigma = |x - mu|^2 / sigma^3 - D / sigma
                wq = (w * quad).sum(0).reshape(n * t)
                gsig[c0:c1] = (wq * ivar / sig_flat - d * w_sum / sig_flat).reshape(n, t)
    return gx, gmu, gsig


def _mixture_weights(s: torch.Tensor, t: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``exp(s - logsumexp_t s)`` of scores ``[..., T]``, with weight 0 throughout for an entry
    whose result is -inf in ``out_dtype`` (every step of zero density, or past the float range):
    such an entry passes no gradient (docs/METHOD.md). A NaN entry keeps NaN weights."""
    lse = torch.logsumexp(s, -1, keepdim=True)
    flat = torch.isneginf((lse - math.log(t)).to(out_dtype))
    return torch.where(flat, 0.0, torch.exp(s - lse))


def _finite_or_zero(v: torch.Tensor) -> torch.Tensor:
    """``v`` with its infinities set to 0 (for the gradient products, where the weight is 0), or
    ``v`` itself when it has none. NaN stays NaN."""
    if not bool(torch.isinf(v).any()):
        return v
    return torch.where(torch.isinf(v), 0.0, v)


# ------------------------------------------------------------------------------------------------
# Per-image bank (and candidate classes of a per-image bank): difference form
# ------------------------------------------------------------------------------------------------


def _gather_classes(t4: torch.Tensor, rows: torch.Tensor, cls: torch.Tensor | None, c0, c1):
    """Classes ``c0:c1`` (or candidate columns ``c0:c1`` of ``cls: [B, K]``) of ``t4: [B, C, ...]``."""
    if cls is None:
        return t4[:, c0:c1]
    return t4[rows, cls[:, c0:c1]]


def _per_image_chunks(x2, mu4, sig4, cls, dt, chunk_bytes, temps):
    """The classes (or candidate columns of ``cls: [B, K]``) of a per-image bank in chunks: yields
    ``(c0, c1, mu_c [B, n, T, D], sig_c [B, n, T(, D)])`` in ``dt``. ``temps`` is the number of
    ``[B, n, T, D]`` temporaries in ``dt`` the caller holds per chunk (it sizes the chunk)."""
    b, d = x2.shape
    t = mu4.shape[2]
    k = mu4.shape[1] if cls is None else cls.shape[1]
    rows = torch.arange(b, device=x2.device)[:, None]
    es = torch.finfo(dt).bits // 8
    cc = _classes_per_chunk(es * b * t * d * temps, k, chunk_bytes)
    for c0 in range(0, k, cc):
        c1 = min(k, c0 + cc)
        mu_c = _gather_classes(mu4, rows, cls, c0, c1).to(dt)
        sig_c = _gather_classes(sig4, rows, cls, c0, c1).to(dt)
        yield c0, c1, mu_c, sig_c


def _per_image_chunk_scores(xc, mu_c, sig_c, diagonal):
    """``xc: [B, D]``, ``mu_c: [B, n, T, D]``, ``sig_c: [B, n, T(, D)]`` -> scores, diff, quad."""
    d = xc.shape[-1]
    diff = xc[:, None, None, :] - mu_c
    if diagonal:
        z = diff / sig_c
        quad = z.square().sum(-1)
        s = -0.5 * quad - torch.log(sig_c).sum(-1) - 0.5 * d * LOG_2PI
    else:
        quad = diff.square().sum(-1)
        s = -0.5 * quad / sig_c.square() + _log_norm_iso(sig_c, d)
    return s, diff, quad


def _per_image_forward(x2, mu4, sig4, cls, dt, chunk_bytes):
    b, d = x2.shape
    t = mu4.shape[2]
    diagonal = sig4.dim() == 4
    k = mu4.shape[1] if cls is None else cls.shape[1]
    xc = x2.to(dt)
    out = torch.empty(b, k, dtype=dt, device=x2.device)
    temps = 4 if diagonal else 2
    for c0, c1, mu_c, sig_c in _per_image_chunks(x2, mu4, sig4, cls, dt, chunk_bytes, temps):
        if diagonal:
            s, _, _ = _per_image_chunk_scores(xc, mu_c, sig_c, diagonal)
        else:
            # cdist without the mm trick is the exact difference form in one pass over mu (a
            # sub/square/sum makes three passes and a [B, cc, T, D] temporary); squaring its
            # sqrt costs ~2 ulps relative.
            n = c1 - c0
            dist = torch.cdist(
                xc[:, None, :],
                mu_c.reshape(b, n * t, d),
                compute_mode="donot_use_mm_for_euclid_dist",
            )
            quad = dist.reshape(b, n, t).square()
            s = -0.5 * quad / sig_c.square() + _log_norm_iso(sig_c, d)
        out[:, c0:c1] = torch.logsumexp(s, dim=-1)
    return out


def _per_image_backward(grad, x2, mu4, sig4, cls, dt, chunk_bytes, needs):
    b, d = x2.shape
    diagonal = sig4.dim() == 4
    rows = torch.arange(b, device=x2.device)[:, None]
    xc = x2.to(dt)
    g = grad.to(dt)
    gx = torch.zeros_like(xc) if needs[0] else None
    gmu = torch.zeros(mu4.shape, dtype=dt, device=x2.device) if needs[1] else None
    gsig = torch.zeros(sig4.shape, dtype=dt, device=x2.device) if needs[2] else None
    temps = 6 if diagonal else 4
    for c0, c1, mu_c, sig_c in _per_image_chunks(x2, mu4, sig4, cls, dt, chunk_bytes, temps):
        s, diff, quad = _per_image_chunk_scores(xc, mu_c, sig_c, diagonal)
        w = _mixture_weights(s, mu_c.shape[2], dt) * g[:, c0:c1, None]  # [B, n, T]
        if diagonal:
            ivar = sig_c.square().reciprocal()
            gm = w[..., None] * diff * ivar  # ds/dmu = (x - mu) / sigma^2
            gs = w[..., None] * (diff.square() * ivar - 1.0) / sig_c
        else:
            ivar = sig_c.square().reciprocal()
            gm = (w * ivar)[..., None] * diff
            gs = w * (quad * ivar - d) / sig_c
        # Steps of weight 0 contribute 0, even where their terms are infinite (0 * inf is NaN;
        # docs/METHOD.md). An infinite term makes its step's quadratic term infinite: only then
        # (one host sync) is the extra pass needed.
        if bool(torch.isinf(quad).any()):
            live = w != 0
            gm = torch.where(live[..., None], gm, 0.0)
            gs = torch.where(live[..., None] if diagonal else live, gs, 0.0)
        if gx is not None:
            gx -= gm.sum((1, 2))
        for acc, val in ((gmu, gm), (gsig, gs)):
            if acc is None:
                continue
            if cls is None:
                acc[:, c0:c1] += val
            else:
                # A class may be listed twice in one row: accumulate, don't overwrite.
                acc.index_put_((rows, cls[:, c0:c1]), val, accumulate=True)
    return gx, gmu, gsig


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def _canonical(x, mu, sigma):
    """``x2: [B, D]``, ``mu`` as ``[C, T, D]`` / ``[B, C, T, D]`` and sigma broadcast to match."""
    view = bank_view(x, mu, sigma)
    return view.x, view.mu, view.sigma_expanded(), view.diagonal


def _with_prepared(mu_c, sig_c, prepared, gemm_dtype):
    """``(mu_c, sig_c, mm)``: a shared bank's ``GemmBank`` in place of the canonical views when one
    was prepared in ``gemm_dtype`` (the chunks' conversions are then no-ops), else the views."""
    if prepared is None or mu_c.dim() != 3 or prepared.mu.dtype != gemm_dtype:
        return mu_c, sig_c, None
    return prepared.mu, prepared.sigma, prepared.mm


def forward(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    class_index: torch.Tensor | None = None,
    *,
    gemm_dtype: torch.dtype = torch.float64,
    chunk_bytes: int | None = None,
    prepared: GemmBank | None = None,
) -> torch.Tensor:
    """``log p(x|y)``: ``[B, C]`` (``[B, K]`` with ``class_index``), float32 (float64 for float64).

    Arguments as ``genrep_fast.mixture_log_likelihood`` (already validated). No autograd.
    ``prepared``: ``gemm_bank(mu, sigma, gemm_dtype)`` of a shared bank, computed earlier (a
    ``genrep_fast.PreparedBank``); None converts the bank on this call.
    """
    out_dtype = compute_dtype(x.dtype)
    x2, mu_c, sig_c, diagonal = _canonical(x, mu, sigma)
    mu_c, sig_c, mm = _with_prepared(mu_c, sig_c, prepared, gemm_dtype)
    t = mu_c.shape[-2]
    with torch.no_grad():
        if mu_c.dim() == 4:
            cls = None if class_index is None else class_index.long()
            lse = _per_image_forward(x2, mu_c, sig_c, cls, out_dtype, chunk_bytes)
        elif class_index is None:
            lse = _shared_forward(x2, mu_c, sig_c, diagonal, gemm_dtype, chunk_bytes, mm)
        else:
            uniq, inv = torch.unique(class_index.long(), return_inverse=True)
            lse_u = _shared_forward(x2, mu_c[uniq], sig_c[uniq], diagonal, gemm_dtype, chunk_bytes)
            lse = torch.gather(lse_u, 1, inv)
        return (lse - math.log(t)).to(out_dtype)


def backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    class_index: torch.Tensor | None = None,
    needs: tuple[bool, bool, bool] = (True, True, True),
    *,
    gemm_dtype: torch.dtype = torch.float64,
    chunk_bytes: int | None = None,
    prepared: GemmBank | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad * forward(...))`` w.r.t. ``(x, mu, sigma)``.

    Recomputes the scores and their LSE chunk by chunk (never ``[B, C, T]`` at once). Returns the
    gradients in the dtypes and shapes of the inputs, None where ``needs`` is False. ``prepared``
    as in ``forward``.
    """
    x2, mu_c, sig_c, diagonal = _canonical(x, mu, sigma)
    mu_c, sig_c, _ = _with_prepared(mu_c, sig_c, prepared, gemm_dtype)
    with torch.no_grad():
        if mu_c.dim() == 4:
            cls = None if class_index is None else class_index.long()
            dt = compute_dtype(x.dtype)
            gx, gmu, gsig = _per_image_backward(grad, x2, mu_c, sig_c, cls, dt, chunk_bytes, needs)
        elif class_index is None:
            gx, gmu, gsig = _shared_backward(
                grad, x2, mu_c, sig_c, diagonal, gemm_dtype, chunk_bytes, needs
            )
        else:
            cls = class_index.long()
            uniq, inv = torch.unique(cls, return_inverse=True)
            b, u = x2.shape[0], uniq.numel()
            # Pairs (b, u) outside the candidates get a zero gradient, hence zero weights.
            g_u = torch.zeros(b, u, dtype=grad.dtype, device=grad.device).scatter_add_(1, inv, grad)
            gx, gmu_u, gsig_u = _shared_backward(
                g_u, x2, mu_c[uniq], sig_c[uniq], diagonal, gemm_dtype, chunk_bytes, needs
            )
            gmu = gsig = None
            if gmu_u is not None:
                gmu = torch.zeros(mu_c.shape, dtype=gmu_u.dtype, device=gmu_u.device)
                gmu.index_add_(0, uniq, gmu_u)
            if gsig_u is not None:
                gsig = torch.zeros(sig_c.shape, dtype=gsig_u.dtype, device=gsig_u.device)
                gsig.index_add_(0, uniq, gsig_u)
        gx = None if gx is None else gx.reshape(x.shape).to(x.dtype)
        gmu = None if gmu is None else gmu.reshape(mu.shape).to(mu.dtype)
        gsig = (
            None
            if gsig is None
            else (gsig.reshape(sigma.shape) if diagonal else sum_to_sigma_shape(gsig, sigma)).to(
                sigma.dtype
            )
        )
    return gx, gmu, gsig
