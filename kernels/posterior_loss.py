"""Triton kernels of the class posterior and the distillation loss (docs/METHOD.md section 1).

Over rows of ``[B, C]`` (one program per image, the classes in ``BLOCK_C`` tiles):

* ``p(y|x) = softmax_y(s)``, ``s = log p(x|y) + log p(y)``;
* ``KL(p || q)`` per image with ``q = softmax(logits)``, and its gradient into the logits,
  ``g_b * (q - p)`` (the teacher p is detached).

Each softmax is kept as ``(max, log sum)`` rather than one LSE: log-likelihoods run to -1e7, where
a float32 LSE rounds to ulp(1e7) = 1 nat; ``(s - max) - log sum`` keeps ``log p`` exact for the
classes that carry the mass. The forward returns these four row statistics ``[B, 4]`` so that the
backward is one elementwise pass that recomputes p and q instead of storing them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genrep_fast.kernels import tuning
from genrep_fast.layout import compute_dtype

# One tile holds up to 2048 classes (ImageNet-1k in one tile: 8 KiB of fp32 per operand);
# larger C loops over tiles with an online max / sum.
MAX_BLOCK_C = 2048
# One config each (kernels/tuning.py): a row of at most a few thousand classes is one tile, read
# once or twice; nothing to tune beside the launch overhead. Launched through the tuner for its
# device guard.
POSTERIOR_CONFIGS = ({"num_warps": 4},)


@triton.jit
def _scores(ll_row, prior_row, offs, mask, HAS_PRIOR: tl.constexpr, ACC_F64: tl.constexpr):
    acc_t = tl.float64 if ACC_F64 else tl.float32
    s = tl.load(ll_row + offs, mask=mask, other=0.0).to(acc_t)
    if HAS_PRIOR:
        s += tl.load(prior_row + offs, mask=mask, other=0.0).to(acc_t)
    return tl.where(mask, s, float("-inf"))


@triton.jit
def _posterior_kl_fwd_kernel(
    ll_ptr,
    prior_ptr,
    z_ptr,
    p_ptr,
    loss_ptr,
    stats_ptr,
    C,
    stride_llb,
    stride_prb,
    stride_zb,
    stride_pb,
    HAS_PRIOR: tl.constexpr,
    HAS_LOGITS: tl.constexpr,
    STORE_P: tl.constexpr,
    ACC_F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Row b: ``stats[b] = (max s, log sum exp(s - max), max z, log sum exp(z - max))``; with
    STORE_P ``p[b] = softmax(s)``; with HAS_LOGITS ``loss[b] = KL(softmax(s) || softmax(z))``."""
    acc_t = tl.float64 if ACC_F64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    ll_row = ll_ptr + b * stride_llb
    prior_row = prior_ptr + b * stride_prb
    z_row = z_ptr + b * stride_zb
    m_p = tl.full([1], float("-inf"), acc_t)
    l_p = tl.zeros([1], acc_t)
    m_q = tl.full([1], float("-inf"), acc_t)
    l_q = tl.zeros([1], acc_t)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        mask = offs < C
        s = _scores(ll_row, prior_row, offs, mask, HAS_PRIOR, ACC_F64)
        # A tile of -inf scores leaves m_new = -inf: shift by 0 instead (exp(-inf - -inf) is NaN),
        # so -inf classes in a first tile stay valid; a row all -inf ends with l = 0, NaN below.
        m_new = tl.maximum(m_p, tl.max(s, 0))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_p = l_p * tl.exp(m_p - m_shift) + tl.sum(tl.exp(s - m_shift), 0)
        m_p = m_new
        if HAS_LOGITS:
            z = tl.load(z_row + offs, mask=mask, other=float("-inf")).to(acc_t)
            m_new = tl.maximum(m_q, tl.max(z, 0))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_q = l_q * tl.exp(m_q - m_shift) + tl.sum(tl.exp(z - m_shift), 0)
            m_q = m_new
    log_lp = tl.log(l_p)
    # Without logits l_q stays 0: log(1) = 0 instead of log(0) (stats[:, 2:] are then unused).
    # `== 0`, not `> 0`: NaN logits (or +inf, inf - inf) leave l_q NaN, which must stay NaN.
    log_lq = tl.log(tl.where(l_q == 0, 1.0, l_q))
    kl = tl.zeros([1], acc_t)
    if STORE_P or HAS_LOGITS:
        for c0 in range(0, C, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            mask = offs < C
            log_p = (_scores(ll_row, prior_row, offs, mask, HAS_PRIOR, ACC_F64) - m_p) - log_lp
            p = tl.exp(log_p)
            if STORE_P:
                tl.store(p_ptr + b * stride_pb + offs, p, mask=mask)
            if HAS_LOGITS:
                z = tl.load(z_row + offs, mask=mask, other=0.0).to(acc_t)
                log_q = (z - m_q) - log_lq
                # 0 * log 0 = 0: classes the teacher rules out (and masked lanes) add nothing;
                # p != 0 keeps a NaN teacher NaN.
                kl += tl.sum(tl.where(mask & (p != 0), p * (log_p - log_q), 0.0), 0)
    one = tl.arange(0, 1)
    if HAS_LOGITS:
        tl.store(loss_ptr + b + one, kl)
    tl.store(stats_ptr + b * 4 + one, m_p)
    tl.store(stats_ptr + b * 4 + 1 + one, log_lp)
    tl.store(stats_ptr + b * 4 + 2 + one, m_q)
    tl.store(stats_ptr + b * 4 + 3 + one, log_lq)


@triton.jit
def _posterior_kl_bwd_kernel(
    ll_ptr,
    prior_ptr,
    z_ptr,
    stats_ptr,
    grad_ptr,
    gz_ptr,
    C,
    stride_llb,
    stride_prb,
    stride_zb,
    stride_grad,
    stride_gzb,
    HAS_PRIOR: tl.constexpr,
    ACC_F64: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Row b: ``d loss[b] / d logits[b] = grad[b] * (softmax(z) - softmax(s))``."""
    acc_t = tl.float64 if ACC_F64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    ll_row = ll_ptr + b * stride_llb
    prior_row = prior_ptr + b * stride_prb
    z_row = z_ptr + b * stride_zb
    m_p = tl.load(stats_ptr + b * 4)
    log_lp = tl.load(stats_ptr + b * 4 + 1)
    m_q = tl.load(stats_ptr + b * 4 + 2)
    log_lq = tl.load(stats_ptr + b * 4 + 3)
    g = tl.load(grad_ptr + b * stride_grad).to(acc_t)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        mask = offs < C
        p = tl.exp((_scores(ll_row, prior_row, offs, mask, HAS_PRIOR, ACC_F64) - m_p) - log_lp)
        z = tl.load(z_row + offs, mask=mask, other=0.0).to(acc_t)
        q = tl.exp((z - m_q) - log_lq)
        tl.store(gz_ptr + b * stride_gzb + offs, g * (q - p), mask=mask)


def _prior_rows(log_prior: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(tensor, row stride)``: a ``[C]`` prior is read with row stride 0 (broadcast)."""
    if log_prior is None:
        return like, 0
    prior = log_prior.contiguous()
    return prior, (0 if prior.dim() == 1 else prior.stride(0))


def posterior_forward(
    log_likelihood: torch.Tensor,
    log_prior: torch.Tensor | None,
    logits: torch.Tensor | None,
    *,
    store_posterior: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """``(p [B, C] or None, kl [B] or None, stats [B, 4])`` (arguments already validated).

    ``log_likelihood: [B, C]``, ``log_prior: [C]`` / ``[B, C]`` or None, ``logits: [B, C]`` or None
    (no KL). Results in float32 (float64 for a float64 log-likelihood).
    """
    ll = log_likelihood.contiguous()
    b, c = ll.shape
    dt = compute_dtype(ll.dtype)
    prior, stride_pr = _prior_rows(log_prior, ll)
    z = logits.contiguous() if logits is not None else ll
    p = torch.empty(b, c, dtype=dt, device=ll.device) if store_posterior else None
    kl = torch.empty(b, dtype=dt, device=ll.device) if logits is not None else None
    stats = torch.empty(b, 4, dtype=dt, device=ll.device)

    def run(config):
        _posterior_kl_fwd_kernel[(b,)](
            ll,
            prior,
            z,
            p if p is not None else stats,
            kl if kl is not None else stats,
            stats,
            c,
            ll.stride(0),
            stride_pr,
            z.stride(0),
            p.stride(0) if p is not None else 0,
            HAS_PRIOR=log_prior is not None,
            HAS_LOGITS=logits is not None,
            STORE_P=store_posterior,
            ACC_F64=dt == torch.float64,
            BLOCK_C=min(MAX_BLOCK_C, triton.next_power_of_2(c)),
            **config,
        )

    tuning.tuned("_posterior_kl_fwd_kernel", POSTERIOR_CONFIGS, (), ll.device, run)
    return p, kl, stats


def posterior_kl_backward(
    grad: torch.Tensor,
    log_likelihood: torch.Tensor,
    log_prior: torch.Tensor | None,
    logits: torch.Tensor,
    stats: torch.Tensor,
) -> torch.Tensor:
    """``d(sum_b grad[b] * kl[b]) / d logits`` ``[B, C]`` in the dtype of ``logits``."""
    ll = log_likelihood.contiguous()
    b, c = ll.shape
    dt = compute_dtype(ll.dtype)
    prior, stride_pr = _prior_rows(log_prior, ll)
    z = logits.contiguous()
    gz = torch.empty(b, c, dtype=logits.dtype, device=ll.device)

    def run(config):
        # A reduction's backward hands an expanded [B] view (stride 0): read it through its stride.
        _posterior_kl_bwd_kernel[(b,)](
            ll,
            prior,
            z,
            stats.contiguous(),
            grad,
            gz,
            c,
            ll.stride(0),
            stride_pr,
            z.stride(0),
            grad.stride(0),
            gz.stride(0),
            HAS_PRIOR=log_prior is not None,
            ACC_F64=dt == torch.float64,
            BLOCK_C=min(MAX_BLOCK_C, triton.next_power_of_2(c)),
            **config,
        )

    tuning.tuned("_posterior_kl_bwd_kernel", POSTERIOR_CONFIGS, (), ll.device, run)
    return gz
