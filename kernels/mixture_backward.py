"""Triton backward of the thinned Gaussian-mixture log-likelihood (docs/METHOD.md section 1).

Given the incoming gradient ``g: [B, K]`` of ``lse[b, k] = logsumexp_t s[b, k, t]`` with
``s = log N(x_b; mu[k, t], sigma[k, t]^2)``, the mixture weights are
``w[b, k, t] = g[b, k] * exp(s[b, k, t] - lse[b, k])`` and (difference form, exact):

    dL/dx_b       = sum_{k,t} w * (mu - x_b) / sigma^2
    dL/dmu_kt     = sum_b     w * (x_b - mu) / sigma^2          (per-image bank: no sum over b)
    dL/dsigma_kt  = sum_b     w * (|x_b - mu|^2 / sigma^3 - D / sigma)        (isotropic)
    dL/dsigma_ktd = sum_b     w * ((x_bd - mu_d)^2 / sigma_d^3 - 1 / sigma_d)  (diagonal)

The scores ``s`` and their LSE over T are recomputed tile by tile (flash-attention's trick,
but the LSE too, not read from the forward's rounded output):
``[B, K, T]`` is never stored. Two kernels:

* ``_mixture_bwd_rows_kernel``: one program per (image, group of classes) walks its classes and
  all T, accumulating ``dL/dx_b`` into a per-group partial row ``[B, G, D]`` (summed over G
  afterwards in a fixed order). For the per-image bank (and its candidate classes) the program
  owns its ``mu[b, k]`` rows, so it also writes ``dL/dmu`` and ``dL/dsigma`` there.
* ``_mixture_bwd_bank_kernel``: the shared bank (with or without candidate classes). One program
  per (class, tile of T) loops over the images that use that class (a CSR list built on the host,
  in a fixed order) in blocks of ``BLOCK_B`` and accumulates ``dL/dmu``, ``dL/dsigma`` of its own
  tile. No float atomics: every output element has one writer, so the result is deterministic.

Accumulation is fp32 (fp64 for fp64 inputs); gradients come back in the input dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genrep_fast.kernels import tuning
from genrep_fast.kernels.mixture import (
    MAXNREG,
    class_rows,
    diff_blocks,
    diff_key,
    diff_layout,
    mu_tile,
    row_lse,
    row_scores,
    sigma_tile,
)
from genrep_fast.layout import is_per_image, sum_to_sigma_shape

# Launch configs (kernels/tuning.py: the first is the default, the interpreter's and the pinned
# one; on CUDA the fastest per shape is picked). Row kernel tile [BLOCK_T, BLOCK_D], as the
# forward difference kernel (4096 fp32 values per operand at the first config), D loop not
# pipelined (D_STAGES = 1: row_scores in kernels/mixture.py).
ROWS_CONFIGS = (
    {
        "BLOCK_T": 32,
        "BLOCK_D": 128,
        "D_STAGES": 1,
        "num_warps": 4,
        "num_stages": 3,
        "maxnreg": MAXNREG,
    },
    {
        "BLOCK_T": 16,
        "BLOCK_D": 256,
        "D_STAGES": 1,
        "num_warps": 4,
        "num_stages": 3,
        "maxnreg": MAXNREG,
    },
    {"BLOCK_T": 16, "BLOCK_D": 256, "D_STAGES": 1, "num_warps": 8, "num_stages": 2},
)
# Diagonal sigma keeps a sigma tile beside the mu tile and writes dL/dsigma too: at 32 x 128 the
# fp32 kernel sat at 255 registers and spilled on sm_80 (the compile gate, bench/results/
# triton-compile-report.md); these tiles hold half as many values.
ROWS_CONFIGS_DIAG = (
    {
        "BLOCK_T": 32,
        "BLOCK_D": 64,
        "D_STAGES": 1,
        "num_warps": 4,
        "num_stages": 3,
        "maxnreg": MAXNREG,
    },
    {
        "BLOCK_T": 16,
        "BLOCK_D": 128,
        "D_STAGES": 1,
        "num_warps": 4,
        "num_stages": 3,
        "maxnreg": MAXNREG,
    },
)
# Groups of classes per image: enough programs to fill a GPU (~4 per SM on 132 SMs) when B is
# small, at most MAX_GROUPS partial rows of D per image (the partial buffer is [B, G, D]).
ROWS_TARGET_PROGRAMS = 512
ROWS_MAX_GROUPS = 64
# Bank kernel tile: [BLOCK_B, BLOCK_T, BLOCK_D] = 8192 values of the 3-D difference tile (64 fp32
# registers per thread at 4 warps, 32 at 8).
BANK_CONFIGS = (
    {
        "BLOCK_B": 16,
        "BLOCK_T": 16,
        "BLOCK_D": 32,
        "num_warps": 4,
        "num_stages": 3,
        "maxnreg": MAXNREG,
    },
    {
        "BLOCK_B": 16,
        "BLOCK_T": 16,
        "BLOCK_D": 32,
        "num_warps": 8,
        "num_stages": 3,
        "maxnreg": MAXNREG,
    },
    {
        "BLOCK_B": 32,
        "BLOCK_T": 16,
        "BLOCK_D": 16,
        "num_warps": 8,
        "num_stages": 2,
        "maxnreg": MAXNREG,
    },
)
# Diagonal sigma: a sigma tile beside the mu tile. At 16 x 16 x 32 on 4 warps the kernel that writes
# dL/dsigma sat at 255 registers and spilled 4-8 B on sm_90 with triton 3.6 / ptxas 12.8 (the
# compile gate, bench/results/triton-3.6/): the 4-warp config holds half the tile.
BANK_CONFIGS_DIAG = ({**BANK_CONFIGS[0], "BLOCK_D": 16},) + BANK_CONFIGS[1:]
# Programs of the bank kernel to aim for (C x splits), and the cap on its partial buffer.
BANK_TARGET_PROGRAMS = 512
BANK_PARTIAL_BYTES = 512 * 2**20


@triton.jit
def _bank_scores(
    x_rows,
    e_mask,
    mu_row,
    sig_row,
    offs_t,
    t_mask,
    D,
    stride_mt,
    stride_st,
    stride_sd,
    log_norm_const,
    DIAG: tl.constexpr,
    ACC_F64: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Scores ``[BLOCK_B, BLOCK_T]`` of a block of images against one tile of steps (3-D
    difference tile), the quadratic term and the isotropic sigma of the tile; both passes of the
    bank kernel call this, so their scores agree bitwise."""
    acc_t = tl.float64 if ACC_F64 else tl.float32
    log_det, siso = _bank_sigma_terms(
        sig_row, offs_t, t_mask, D, stride_st, stride_sd, DIAG, ACC_F64, BLOCK_T, BLOCK_D
    )
    quad = tl.zeros([BLOCK_B, BLOCK_T], acc_t)
    for d0 in range(0, D, BLOCK_D):
        offs_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        d_mask = offs_d < D
        tile_mask = t_mask[:, None] & d_mask[None, :]
        xv = tl.load(
            x_rows[:, None] + offs_d[None, :], mask=e_mask[:, None] & d_mask[None, :], other=0.0
        ).to(acc_t)
        mv = mu_tile(mu_row, offs_t, offs_d, stride_mt, tile_mask, ACC_F64)
        diff = xv[:, None, :] - mv[None, :, :]
        if DIAG:
            sv = sigma_tile(sig_row, offs_t, offs_d, stride_st, stride_sd, tile_mask, ACC_F64)
            z = diff / sv[None, :, :]
            quad += tl.sum(z * z, 2)
        else:
            quad += tl.sum(diff * diff, 2)
    if DIAG:
        s = -0.5 * quad - log_det[None, :] + log_norm_const
    else:
        s = -0.5 * quad / (siso * siso)[None, :] - log_det[None, :] + log_norm_const
    return tl.where(e_mask[:, None] & t_mask[None, :], s, float("-inf")), quad, siso


@triton.jit
def _mixture_bwd_rows_kernel(
    x_ptr,
    mu_ptr,
    sig_ptr,
    idx_ptr,
    g_ptr,
    gx_part_ptr,
    gmu_ptr,
    gsig_ptr,
    K,
    T,
    D,
    G,
    classes_per_group,
    stride_xb,
    stride_mb,
    stride_mc,
    stride_mt,
    stride_sb,
    stride_sc,
    stride_st,
    stride_sd,
    stride_ib,
    stride_gmb,
    stride_gmc,
    stride_gsb,
    stride_gsc,
    log_norm_const,
    HAS_INDEX: tl.constexpr,
    DIAG: tl.constexpr,
    ACC_F64: tl.constexpr,
    NEED_X: tl.constexpr,
    WRITE_MU: tl.constexpr,
    WRITE_SIG: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_STAGES: tl.constexpr,
):
    """``gmu``/``gsig`` buffers (WRITE_*) are ``[B, C, T, D]`` / ``[B, C, T(, D)]`` contiguous in
    their last dims; ``g`` is ``[B, K]`` contiguous; ``gx_part`` is ``[B, G, D]``."""
    acc_t = tl.float64 if ACC_F64 else tl.float32
    # int64: b * stride_mb overflows int32 once a per-image bank passes 2^31 values.
    b = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1).to(tl.int64)
    x_row = x_ptr + b * stride_xb
    part_row = gx_part_ptr + (b * G + grp) * D
    k0 = grp * classes_per_group
    k1 = tl.minimum(k0 + classes_per_group, K)
    for k in range(k0, k1):
        g = tl.load(g_ptr + b * K + k).to(acc_t)
        # A zero gradient (or a duplicate candidate folded into its first occurrence) adds
        # nothing: skip the whole class. Its gmu rows stay at the buffer's zeros.
        if g != 0:
            cls, mu_row, sig_row = class_rows(
                mu_ptr, sig_ptr, idx_ptr, b, k, stride_mb, stride_mc, stride_sb, stride_sc,
                stride_ib, HAS_INDEX,
            )  # fmt: skip
            gmu_row = gmu_ptr + b * stride_gmb + cls * stride_gmc
            gsig_row = gsig_ptr + b * stride_gsb + cls * stride_gsc
            # Pass A: the LSE over T, recomputed with the very arithmetic of pass 1 below and
            # kept as (max, log sum): the fp32 LSE saved by the forward rounds to ulp(|lse|)
            # (0.06 nats at -6e5), which would scale every weight by up to e^0.03.
            m, l = row_lse(
                x_row, mu_row, sig_row, 0, T, D, stride_mt, stride_st, stride_sd, log_norm_const,
                DIAG, ACC_F64, BLOCK_T, BLOCK_D, D_STAGES,
            )  # fmt: skip
            log_l = tl.log(l)
            for t0 in range(0, T, BLOCK_T):
                offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
                t_mask = offs_t < T
                # Pass 1: the scores of this tile again, then the weights.
                s, quad, siso = row_scores(
                    x_row, mu_row, sig_row, offs_t, t_mask, D, stride_mt, stride_st, stride_sd,
                    log_norm_const, DIAG, ACC_F64, BLOCK_T, BLOCK_D, D_STAGES,
                )  # fmt: skip
                # A step of zero density (s = -inf), and so every step of a -inf entry, has
                # weight 0 and adds nothing below, even where its terms are infinite (0 * inf is
                # NaN); a NaN step keeps NaN (docs/METHOD.md, "Non-finite values").
                live = t_mask & (s != float("-inf"))
                w = tl.where(live, tl.exp((s - m) - log_l) * g, 0.0)
                if not DIAG:
                    ivar_t = 1.0 / (siso * siso)
                    a = w * ivar_t
                    if WRITE_SIG:
                        gs = tl.where(live, w * (quad * ivar_t - D) / siso, 0.0)
                        tl.store(gsig_row + offs_t, gs, mask=t_mask)
                # Pass 2: gradients of this tile, D block by D block.
                if NEED_X or WRITE_MU or (DIAG and WRITE_SIG):
                    for d0 in range(0, D, BLOCK_D):
                        offs_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
                        d_mask = offs_d < D
                        tile_mask = t_mask[:, None] & d_mask[None, :]
                        xv = tl.load(x_row + offs_d, mask=d_mask, other=0.0).to(acc_t)
                        mv = mu_tile(mu_row, offs_t, offs_d, stride_mt, tile_mask, ACC_F64)
                        diff = xv[None, :] - mv
                        tile_off = offs_t[:, None] * D + offs_d[None, :]
                        if DIAG:
                            sv = sigma_tile(
                                sig_row, offs_t, offs_d, stride_st, stride_sd, tile_mask, ACC_F64
                            )
                            ivar = 1.0 / (sv * sv)
                            contrib = w[:, None] * diff * ivar  # dL/dmu = w (x - mu) / sigma^2
                            if WRITE_SIG:
                                gs = w[:, None] * (diff * diff * ivar - 1.0) / sv
                                gs = tl.where(live[:, None], gs, 0.0)
                                tl.store(gsig_row + tile_off, gs, mask=tile_mask)
                        else:
                            contrib = a[:, None] * diff
                        contrib = tl.where(live[:, None], contrib, 0.0)
                        if WRITE_MU:
                            tl.store(gmu_row + tile_off, contrib, mask=tile_mask)
                        if NEED_X:
                            # The program owns this partial row: load-add-store, no race.
                            acc = tl.load(part_row + offs_d, mask=d_mask, other=0.0)
                            tl.store(part_row + offs_d, acc - tl.sum(contrib, 0), mask=d_mask)


@triton.jit
def _mixture_bwd_bank_kernel(
    x_ptr,
    mu_ptr,
    sig_ptr,
    ent_ptr,
    ent_b_ptr,
    ent_g_ptr,
    gmu_ptr,
    gsig_ptr,
    C,
    T,
    D,
    stride_xb,
    stride_mc,
    stride_mt,
    stride_sc,
    stride_st,
    stride_sd,
    log_norm_const,
    DIAG: tl.constexpr,
    ACC_F64: tl.constexpr,
    NEED_MU: tl.constexpr,
    NEED_SIG: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (class c, split of c's images) of a shared bank ``mu: [C, T, D]``.

    Entries ``ent_ptr[c] .. ent_ptr[c+1]`` of ``ent_b`` / ``ent_g`` list the images using class c
    with their incoming gradient; split s of ``num_programs(1)`` takes a contiguous share of them.
    ``gmu`` is ``[S, C, T, D]`` and ``gsig`` ``[S, C, T]`` / ``[S, C, T, D]``, contiguous and
    zero-initialised: each program owns its slice (summed over S afterwards, in a fixed order).
    """
    acc_t = tl.float64 if ACC_F64 else tl.float32
    c = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    splits = tl.num_programs(1).to(tl.int64)
    mu_row = mu_ptr + c * stride_mc
    sig_row = sig_ptr + c * stride_sc
    e_lo = tl.load(ent_ptr + c)
    e_hi = tl.load(ent_ptr + c + 1)
    share = (e_hi - e_lo + splits - 1) // splits
    e0 = e_lo + split * share
    e1 = tl.minimum(e0 + share, e_hi)
    # int64: S*C*T*D passes 2^31 at ImageNet scale.
    slice_rows = (split * C + c) * T
    for e in range(e0, e1, BLOCK_B):
        offs_e = e + tl.arange(0, BLOCK_B)
        e_mask = offs_e < e1
        rows_b = tl.load(ent_b_ptr + offs_e, mask=e_mask, other=0).to(tl.int64)
        g = tl.load(ent_g_ptr + offs_e, mask=e_mask, other=0.0).to(acc_t)
        x_rows = x_ptr + rows_b * stride_xb
        # Pass A: the LSE over all T of each image of the block (as in the row kernel).
        m = tl.full([BLOCK_B], float("-inf"), acc_t)
        l = tl.zeros([BLOCK_B], acc_t)
        for t0 in range(0, T, BLOCK_T):
            offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            t_mask = offs_t < T
            s, quad, siso = _bank_scores(
                x_rows, e_mask, mu_row, sig_row, offs_t, t_mask, D, stride_mt, stride_st,
                stride_sd, log_norm_const, DIAG, ACC_F64, BLOCK_B, BLOCK_T, BLOCK_D,
            )  # fmt: skip
            m_new = tl.maximum(m, tl.max(s, 1))
            # Masked images have m = -inf throughout: keep them at 0 instead of NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m = m_new
        m = tl.where(m == float("-inf"), 0.0, m)
        log_l = tl.log(tl.where(l > 0, l, 1.0))
        for t0 in range(0, T, BLOCK_T):
            offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            t_mask = offs_t < T
            s, quad, siso = _bank_scores(
                x_rows, e_mask, mu_row, sig_row, offs_t, t_mask, D, stride_mt, stride_st,
                stride_sd, log_norm_const, DIAG, ACC_F64, BLOCK_B, BLOCK_T, BLOCK_D,
            )  # fmt: skip
            # As in the row kernel: steps of zero density add nothing (not 0 * inf = NaN).
            valid = e_mask[:, None] & t_mask[None, :] & (s != float("-inf"))
            w = tl.where(valid, tl.exp((s - m[:, None]) - log_l[:, None]) * g[:, None], 0.0)
            out_rows = (slice_rows + offs_t) * D
            if not DIAG:
                ivar_t = 1.0 / (siso * siso)
                a = w * ivar_t[None, :]
                if NEED_SIG:
                    # [BLOCK_T]; the D loop below has [BLOCK_T, BLOCK_D] updates under other names:
                    # Triton rejects a name whose shape changes inside a loop.
                    gsig_t = (
                        tl.sum(tl.where(valid, w * (quad * ivar_t[None, :] - D), 0.0), 0) / siso
                    )
                    gs_ptr = gsig_ptr + slice_rows + offs_t
                    tl.store(gs_ptr, tl.load(gs_ptr, mask=t_mask, other=0.0) + gsig_t, mask=t_mask)
            # Pass 2: this block's contribution to the program's own gmu (and diagonal gsig).
            if NEED_MU or (DIAG and NEED_SIG):
                w_sum = tl.sum(w, 0)
                for d0 in range(0, D, BLOCK_D):
                    offs_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
                    d_mask = offs_d < D
                    tile_mask = t_mask[:, None] & d_mask[None, :]
                    xv = tl.load(
                        x_rows[:, None] + offs_d[None, :],
                        mask=e_mask[:, None] & d_mask[None, :],
                        other=0.0,
                    ).to(acc_t)
                    mv = mu_tile(mu_row, offs_t, offs_d, stride_mt, tile_mask, ACC_F64)
                    diff = xv[:, None, :] - mv[None, :, :]
                    diff = tl.where(valid[:, :, None], diff, 0.0)
                    out_off = out_rows[:, None] + offs_d[None, :]
                    if DIAG:
                        sv = sigma_tile(
                            sig_row, offs_t, offs_d, stride_st, stride_sd, tile_mask, ACC_F64
                        )
                        ivar = 1.0 / (sv * sv)
                        wd = tl.sum(w[:, :, None] * diff, 0)  # sum_b w (x_b - mu)
                        if NEED_MU:
                            gm = tl.load(gmu_ptr + out_off, mask=tile_mask, other=0.0)
                            tl.store(gmu_ptr + out_off, gm + wd * ivar, mask=tile_mask)
                        if NEED_SIG:
                            wq = tl.sum(w[:, :, None] * diff * diff, 0)
                            gs = tl.load(gsig_ptr + out_off, mask=tile_mask, other=0.0)
                            gsig_td = (wq * ivar - w_sum[:, None]) / sv
                            tl.store(gsig_ptr + out_off, gs + gsig_td, mask=tile_mask)
                    else:
                        gm = tl.load(gmu_ptr + out_off, mask=tile_mask, other=0.0)
                        gmu_td = tl.sum(a[:, :, None] * diff, 0)
                        tl.store(gmu_ptr + out_off, gm + gmu_td, mask=tile_mask)


@triton.jit
def _bank_sigma_terms(
    sig_row,
    offs_t,
    t_mask,
    D,
    stride_st,
    stride_sd,
    DIAG: tl.constexpr,
    ACC_F64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``(sum_d log sigma [BLOCK_T], isotropic sigma [BLOCK_T])`` of one tile of steps."""
    acc_t = tl.float64 if ACC_F64 else tl.float32
    if DIAG:
        log_det = tl.zeros([BLOCK_T], acc_t)
        for d0 in range(0, D, BLOCK_D):
            offs_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            tile_mask = t_mask[:, None] & (offs_d < D)[None, :]
            sv = sigma_tile(sig_row, offs_t, offs_d, stride_st, stride_sd, tile_mask, ACC_F64)
            log_det += tl.sum(tl.log(sv), 1)
        siso = tl.full([BLOCK_T], 1.0, acc_t)  # unused
    else:
        siso = tl.load(sig_row + offs_t * stride_st, mask=t_mask, other=1.0).to(acc_t)
        log_det = D * tl.log(siso)
    return log_det, siso


def _fold_duplicate_candidates(grad: torch.Tensor, class_index: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` gradient with repeated classes of a row summed into their first occurrence and
    the repeats set to 0 (they share the same scores and LSE, so one program does their work)."""
    same = class_index[:, :, None] == class_index[:, None, :]  # [B, K, K]
    k = class_index.shape[1]
    earlier = torch.ones(k, k, dtype=torch.bool, device=grad.device).tril(-1)
    first = ~(same & earlier).any(-1)  # no earlier equal entry
    summed = (same.to(grad.dtype) * grad[:, None, :]).sum(-1)
    return torch.where(first, summed, torch.zeros_like(summed))


def _bank_entries(grad, class_index, num_classes):
    """CSR list of the (image, gradient) entries of each class of a shared bank, in a fixed
    order (images ascending within a class), so the bank kernel's sums are deterministic."""
    b, k = grad.shape
    dev = grad.device
    if class_index is None:
        ent_ptr = torch.arange(num_classes + 1, device=dev, dtype=torch.int64) * b
        ent_b = torch.arange(b, device=dev, dtype=torch.int64).repeat(num_classes)
        return ent_ptr, ent_b, grad.T.contiguous().reshape(-1)
    cls = class_index.reshape(-1).long()
    order = torch.argsort(cls, stable=True)
    ent_b = torch.arange(b, device=dev, dtype=torch.int64).repeat_interleave(k)[order]
    # ent_ptr[c] = number of entries of classes < c. A search of the sorted classes, not bincount:
    # bincount reads its input's max back to the host to size its output (a sync on CUDA, and no
    # meta-device kernel, which the compile gate launches with).
    classes = torch.arange(num_classes + 1, device=dev, dtype=torch.int64)
    ent_ptr = torch.searchsorted(cls[order], classes)
    return ent_ptr, ent_b, grad.reshape(-1)[order].contiguous()


def mixture_lse_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    class_index: torch.Tensor | None,
    needs: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad * lse)`` w.r.t. ``(x, mu, sigma)`` (arguments already validated),
    ``lse[b, k] = logsumexp_t log N(x_b; mu[k, t], sigma[k, t]^2)`` in the exact difference form.

    ``grad: [B, K]``. The LSE is recomputed here (one extra pass over the bank) rather than taken
    from the forward: the forward's float32 LSE rounds to ulp(|lse|), and a GEMM-mode forward can
    be off by many nats; with its own LSE the weights of each (image, class) sum to exactly 1.
    Returns the gradients in the shapes and dtypes of the inputs, None where ``needs`` is False.
    """
    need_x, need_mu, need_sig = needs
    b = x.shape[0]
    per_image = is_per_image(x, mu)
    lay = diff_layout(x, mu, sigma, class_index)
    x2, mu_l, sig_l = lay.x, lay.mu, lay.sigma
    c, t, d, k = lay.num_classes, lay.num_steps, lay.dim, lay.num_candidates
    diagonal, acc_dtype = lay.diagonal, lay.acc_dtype
    acc_f64 = acc_dtype == torch.float64
    dev = x.device
    g = grad.to(acc_dtype).contiguous()
    gx = gmu = gsig = None

    write_mu = per_image and need_mu
    write_sig = per_image and need_sig
    if need_x or write_mu or write_sig:
        g_rows = g
        if class_index is not None and per_image and (write_mu or write_sig):
            g_rows = _fold_duplicate_candidates(g, class_index)
        groups = max(1, min(k, ROWS_MAX_GROUPS, triton.cdiv(ROWS_TARGET_PROGRAMS, b)))
        per_group = triton.cdiv(k, groups)
        groups = triton.cdiv(k, per_group)
        sig_shape = (b, c, t, d) if diagonal else (b, c, t)

        def run_rows(config):
            # Fresh zeroed buffers per call: the kernel adds into them (and the tuner reruns it).
            part = torch.zeros(b, groups, d, dtype=acc_dtype, device=dev) if need_x else x2
            dummy = torch.empty(1, dtype=acc_dtype, device=dev)
            gmu_buf = torch.zeros(b, c, t, d, dtype=acc_dtype, device=dev) if write_mu else dummy
            gsig_buf = torch.zeros(sig_shape, dtype=acc_dtype, device=dev) if write_sig else dummy
            gms = gmu_buf.stride() if write_mu else (0, 0, 0, 0)
            gss = gsig_buf.stride() if write_sig else (0, 0, 0)
            _mixture_bwd_rows_kernel[(b, groups)](
                x2,
                mu_l,
                sig_l,
                lay.index,
                g_rows,
                part,
                gmu_buf,
                gsig_buf,
                k,
                t,
                d,
                groups,
                per_group,
                *lay.row_strides,
                gms[0],
                gms[1],
                gss[0],
                gss[1],
                lay.log_norm_const,
                HAS_INDEX=class_index is not None,
                DIAG=diagonal,
                ACC_F64=acc_f64,
                NEED_X=need_x,
                WRITE_MU=write_mu,
                WRITE_SIG=write_sig,
                **diff_blocks(config, t, d),
            )
            return part, gmu_buf, gsig_buf

        part, gmu_buf, gsig_buf = tuning.tuned(
            "_mixture_bwd_rows_kernel",
            ROWS_CONFIGS_DIAG if diagonal else ROWS_CONFIGS,
            (*diff_key(lay, b), need_x, write_mu, write_sig),
            dev,
            run_rows,
        )
        if need_x:
            gx = part.sum(1)
        if write_mu:
            gmu = gmu_buf
        if write_sig:
            gsig = gsig_buf

    if not per_image and (need_mu or need_sig):
        ent_ptr, ent_b, ent_g = _bank_entries(g, class_index, c)
        es = torch.finfo(acc_dtype).bits // 8
        sig_shape_of = (lambda n: (n, c, t, d)) if diagonal else (lambda n: (n, c, t))

        def run_bank(config):
            # Splits of each class's images: enough programs to fill a GPU when C is small, each
            # with its own slice of the partial buffer [S, C, T, D], capped at BANK_PARTIAL_BYTES.
            splits = max(
                1,
                min(
                    triton.cdiv(b, config["BLOCK_B"]),
                    triton.cdiv(BANK_TARGET_PROGRAMS, c),
                    BANK_PARTIAL_BYTES // max(1, c * t * d * es * (int(need_mu) + int(need_sig))),
                ),
            )
            gmu_buf = torch.zeros(splits, c, t, d, dtype=acc_dtype, device=dev) if need_mu else g
            gsig_buf = (
                torch.zeros(sig_shape_of(splits), dtype=acc_dtype, device=dev) if need_sig else g
            )
            _mixture_bwd_bank_kernel[(c, splits)](
                x2,
                mu_l,
                sig_l,
                ent_ptr,
                ent_b,
                ent_g,
                gmu_buf,
                gsig_buf,
                c,
                t,
                d,
                x2.stride(0),
                *lay.mu_strides[1:3],
                *lay.sigma_strides[1:],
                lay.log_norm_const,
                DIAG=diagonal,
                ACC_F64=acc_f64,
                NEED_MU=need_mu,
                NEED_SIG=need_sig,
                **tuning.fit_blocks(
                    config,
                    BLOCK_T=triton.next_power_of_2(t),
                    BLOCK_D=triton.next_power_of_2(d),
                ),
            )
            return gmu_buf, gsig_buf

        gmu_buf, gsig_buf = tuning.tuned(
            "_mixture_bwd_bank_kernel",
            BANK_CONFIGS_DIAG if lay.diagonal else BANK_CONFIGS,
            (*diff_key(lay, b), need_mu, need_sig),
            dev,
            run_bank,
        )
        # Fixed-order sum of the per-split partials: deterministic.
        gmu = gmu_buf.sum(0) if need_mu else None
        gsig = gsig_buf.sum(0) if need_sig else None

    gx = None if gx is None else gx.reshape(x.shape).to(x.dtype)
    gmu = None if gmu is None else gmu.reshape(mu.shape).to(mu.dtype)
    if gsig is not None:
        gsig = (gsig.reshape(sigma.shape) if diagonal else sum_to_sigma_shape(gsig, sigma)).to(
            sigma.dtype
        )
    return gx, gmu, gsig
