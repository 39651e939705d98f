"""Triton kernels of the thinned Gaussian-mixture log-likelihood (docs/METHOD.md section 1).

Both kernels return ``lse[b, k] = logsumexp_t log N(x_b; mu[k, t], sigma[k, t]^2)`` (no ``- log T``)
and never write the ``[B, C, T]`` scores: the log-sum-exp over T runs online in registers.

* ``_mixture_diff_kernel``: one program per (image, class) pair, images fastest; the exact
  difference form ``sum_d (x_d - mu_d)^2`` with fp32 accumulation (fp64 for fp64 inputs) in a 2-D
  tile reduced once per T tile (``row_scores``). Serves the per-image bank, candidate classes
  (``class_index`` gathers rows of a shared bank) and the shared bank at ``precision="ieee"``.
  Memory-bound: reads each mu row once. Its tile, warps and stages: ``DIFF_CONFIGS``, picked per
  shape by ``kernels/tuning.py``.
* ``_mixture_gemm_kernel``: the shared bank as a GEMM ``[B, D] x [D, C*T]``; one program per
  (block of images, class) loops over T in ``BLOCK_T`` tiles (masked, the bank is not padded) and
  folds each tile into a running max / sum. ``precision`` picks the dot's arithmetic: ``"tf32x3"``,
  ``"tf32"`` or ``"bf16"``. The GEMM form ``|x|^2 - 2 x.mu + |mu|^2`` cancels when x is near a
  mean and sigma is small (docs/NUMERICS.md), which is why ``"ieee"`` uses the difference form.

Under ``TRITON_INTERPRET=1`` the interpreter computes every ``tl.dot`` in exact fp32 (and cannot do
a bf16 dot), so the launcher sets ``EMULATE`` and the kernel rounds the operands itself (tf32:
10-bit mantissa; tf32x3: hi/lo split; bf16: a cast) so that the tests measure each mode's error.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from genrep_fast.kernels import tuning
from genrep_fast.layout import LOG_2PI, bank_view, compute_dtype, is_diagonal

PRECISION_CODES = {"ieee": 0, "tf32": 1, "tf32x3": 2, "bf16": 3}

# Launch configs of the difference kernel (kernels/tuning.py: the first is the default, the
# interpreter's and the pinned one; on CUDA the fastest per shape is picked). The tile is
# [BLOCK_T, BLOCK_D], capped at the sizes; 4096 fp32 values (32 registers a thread at 4 warps) per
# operand.
# D_STAGES: the D loop software-pipelined with that many stages (cp.async), or not (1); see
# row_scores. Pipelined, the fp32 isotropic kernel holds 108 registers and 34 KiB of shared
# memory; not, 156 registers (sm_90, the compile gate). Every T tile is 16 steps: 6% masked rows
# at T = 75, 11% at T = 100 (32: 22% at both); masked rows load nothing.
DIFF_CONFIGS = (
    {"BLOCK_T": 16, "BLOCK_D": 256, "D_STAGES": 3, "num_warps": 4, "num_stages": 3},
    {"BLOCK_T": 16, "BLOCK_D": 256, "D_STAGES": 1, "num_warps": 4, "num_stages": 3},
    {"BLOCK_T": 16, "BLOCK_D": 512, "D_STAGES": 1, "num_warps": 8, "num_stages": 2},
)
# Diagonal sigma adds a sigma tile and a second accumulator: pipelined at 16 x 256 the fp32 kernel
# sat at 255 registers and spilled 12 B on sm_90 (the compile gate); 16 x 128 halves the tiles.
DIFF_CONFIGS_DIAG = (
    {"BLOCK_T": 16, "BLOCK_D": 128, "D_STAGES": 3, "num_warps": 4, "num_stages": 3},
    {"BLOCK_T": 16, "BLOCK_D": 256, "D_STAGES": 1, "num_warps": 4, "num_stages": 3},
    {"BLOCK_T": 16, "BLOCK_D": 512, "D_STAGES": 1, "num_warps": 8, "num_stages": 2},
)
# The GEMM kernel's tiles are the usual tensor-core shapes (>= 16 on every side for tl.dot).
GEMM_MAX_BLOCK_B = 64
GEMM_BLOCK_T = 32
GEMM_BLOCK_D = 32
# Diagonal sigma: two dots per tile (x.m1 and x^2.m2; tf32x3 makes each three). At BLOCK_D = 32
# ptxas spills (sm_90, BLOCK_B = 32, tf32x3: 255 registers + 32 B; sm_80, BLOCK_B = 64, bf16:
# 8 B); at 16 the most is 126 registers (python -m genrep_fast.compile_gate, ptxas 12.9 / 13.4).
GEMM_BLOCK_D_DIAG = 16


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ------------------------------------------------------------------------------------------------
# Difference form: per-image bank, candidate classes, shared bank at "ieee"
# ------------------------------------------------------------------------------------------------


@triton.jit
def mu_tile(mu_row, offs_t, offs_d, stride_mt, tile_mask, ACC_F64: tl.constexpr):
    """``mu[t, d]`` over one ``[BLOCK_T, BLOCK_D]`` tile of a class's bank rows (``mu_row``: its
    ``[T, D]`` block, unit stride in d), 0 in masked lanes, in the accumulation dtype. Every
    difference-form kernel loads its bank tiles through this (inlined: the code is the same)."""
    acc_t = tl.float64 if ACC_F64 else tl.float32
    return tl.load(
        mu_row + offs_t[:, None] * stride_mt + offs_d[None, :], mask=tile_mask, other=0.0
    ).to(acc_t)


@triton.jit
def sigma_tile(sig_row, offs_t, offs_d, stride_st, stride_sd, tile_mask, ACC_F64: tl.constexpr):
    """Diagonal ``sigma[t, d]`` over one tile, as ``mu_tile``; 1 in masked lanes, so that their
    log and reciprocal stay finite."""
    acc_t = tl.float64 if ACC_F64 else tl.float32
    return tl.load(
        sig_row + offs_t[:, None] * stride_st + offs_d[None, :] * stride_sd,
        mask=tile_mask,
        other=1.0,
    ).to(acc_t)


@triton.jit
def row_scores(
    x_row,
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
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_STAGES: tl.constexpr,
):
    """Scores ``s [BLOCK_T]`` of one image against one tile of steps, the quadratic term and the
    isotropic sigma of the tile. The forward kernel and both passes of the backward row kernel
    call this one function, so their scores agree bitwise (the weights exp(s - lse) then sum to
    exactly 1).

    The squared differences accumulate in a ``[BLOCK_T, BLOCK_D]`` tile, each lane summing its
    ``D / BLOCK_D`` terms in d order, and the tile is reduced over d once after the loop: a
    reduction per D step (shuffles, and a barrier for the cross-warp part) would sit on the
    loop's critical path.

    ``D_STAGES`` > 1 software-pipelines the D loop (``tl.range(num_stages=D_STAGES)``: the next
    tiles' mu and x are copied to shared memory with cp.async while this one is summed; x as a
    ``[BLOCK_D]`` row, read from shared memory straight into the tile's layout). At 1 the loop is
    not pipelined (Triton does not pipeline these loads on its own: no cp.async in the PTX) and
    x is loaded as a tile in the mu tile's layout (every row the same, served by L1), so no
    layout conversion through shared memory either."""
    acc_t = tl.float64 if ACC_F64 else tl.float32
    quad2 = tl.zeros([BLOCK_T, BLOCK_D], acc_t)
    log_det2 = tl.zeros([BLOCK_T, BLOCK_D], acc_t)
    rows0 = offs_t[:, None] * 0  # [BLOCK_T, 1] zeros: x's tile, the same in every row
    for d0 in tl.range(0, D, BLOCK_D, num_stages=D_STAGES):
        offs_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        d_mask = offs_d < D
        tile_mask = t_mask[:, None] & d_mask[None, :]
        if D_STAGES > 1:
            xv = tl.load(x_row + offs_d, mask=d_mask, other=0.0).to(acc_t)[None, :]
        else:
            xv = tl.load(x_row + rows0 + offs_d[None, :], mask=tile_mask, other=0.0).to(acc_t)
        mv = mu_tile(mu_row, offs_t, offs_d, stride_mt, tile_mask, ACC_F64)
        diff = xv - mv
        if DIAG:
            sv = sigma_tile(sig_row, offs_t, offs_d, stride_st, stride_sd, tile_mask, ACC_F64)
            z = diff / sv
            quad2 += z * z
            log_det2 += tl.log(sv)
        else:
            quad2 += diff * diff
    quad = tl.sum(quad2, 1)
    if DIAG:
        siso = tl.full([BLOCK_T], 1.0, acc_t)  # unused
        s = -0.5 * quad - tl.sum(log_det2, 1) + log_norm_const
    else:
        siso = tl.load(sig_row + offs_t * stride_st, mask=t_mask, other=1.0).to(acc_t)
        s = -0.5 * quad / (siso * siso) - D * tl.log(siso) + log_norm_const
    return tl.where(t_mask, s, float("-inf")), quad, siso


@triton.jit
def class_rows(
    mu_ptr,
    sig_ptr,
    idx_ptr,
    b,
    k,
    stride_mb,
    stride_mc,
    stride_sb,
    stride_sc,
    stride_ib,
    HAS_INDEX: tl.constexpr,
):
    """``(cls, mu_row, sig_row)`` of (image b, column k): the class (``idx[b, k]`` with
    ``HAS_INDEX``, else k) and the pointers to its ``[T, D]`` bank block and its sigma block.
    ``b`` and ``k`` must be int64: b * stride_mb overflows int32 once a per-image bank passes 2^31
    values."""
    if HAS_INDEX:
        cls = tl.load(idx_ptr + b * stride_ib + k).to(tl.int64)
    else:
        cls = k
    return cls, mu_ptr + b * stride_mb + cls * stride_mc, sig_ptr + b * stride_sb + cls * stride_sc


@triton.jit
def row_lse(
    x_row,
    mu_row,
    sig_row,
    T,
    D,
    stride_mt,
    stride_st,
    stride_sd,
    log_norm_const,
    DIAG: tl.constexpr,
    ACC_F64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_STAGES: tl.constexpr,
):
    """``(m [1], l [1])`` with ``logsumexp_t s = m + log(l)`` over all T steps of one row: the
    online log-sum-exp of ``row_scores`` tile by tile. The forward kernel and the backward row
    kernel both call this, so the backward's weights use the forward's very arithmetic."""
    acc_t = tl.float64 if ACC_F64 else tl.float32
    m = tl.full([1], float("-inf"), acc_t)
    l = tl.zeros([1], acc_t)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_mask = offs_t < T
        s, _, _ = row_scores(
            x_row, mu_row, sig_row, offs_t, t_mask, D, stride_mt, stride_st, stride_sd,
            log_norm_const, DIAG, ACC_F64, BLOCK_T, BLOCK_D, D_STAGES,
        )  # fmt: skip
        # Online log-sum-exp over T. A tile whose steps all have zero density (score -inf: an
        # infinite input, or a score past the float range) leaves m_new = -inf: shift by 0 then
        # (exp(-inf - -inf) is NaN), so such a row ends at m = -inf, l = 0, m + log(l) = -inf.
        m_new = tl.maximum(m, tl.max(s, 0))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_shift) + tl.sum(tl.exp(s - m_shift), 0)
        m = m_new
    return m, l


@triton.jit
def _mixture_diff_kernel(
    x_ptr,
    mu_ptr,
    sig_ptr,
    idx_ptr,
    out_ptr,
    K,
    T,
    D,
    stride_xb,
    stride_mb,
    stride_mc,
    stride_mt,
    stride_sb,
    stride_sc,
    stride_st,
    stride_sd,
    stride_ib,
    log_norm_const,
    HAS_INDEX: tl.constexpr,
    DIAG: tl.constexpr,
    ACC_F64: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_STAGES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 from here on (see class_rows)
    # Batch-fastest order: the programs in flight together share a column k, so a shared bank's
    # [T, D] block of class k is read from DRAM once and from L2 by the other images (b-major
    # order streams every class's block past each image instead).
    batch = tl.num_programs(0).to(tl.int64) // K
    b = pid % batch
    k = pid // batch
    _, mu_row, sig_row = class_rows(
        mu_ptr, sig_ptr, idx_ptr, b, k, stride_mb, stride_mc, stride_sb, stride_sc, stride_ib,
        HAS_INDEX,
    )  # fmt: skip
    m, l = row_lse(
        x_ptr + b * stride_xb, mu_row, sig_row, T, D, stride_mt, stride_st, stride_sd,
        log_norm_const, DIAG, ACC_F64, BLOCK_T, BLOCK_D, D_STAGES,
    )  # fmt: skip
    tl.store(out_ptr + b * K + k + tl.arange(0, 1), m + tl.log(l))


def _expand_strides(t: torch.Tensor, ndim: int) -> list[int]:
    """Strides of ``t`` left-padded with zeros to ``ndim`` dims (a missing leading dim broadcasts)."""
    return [0] * (ndim - t.dim()) + list(t.stride())


class DiffLayout(NamedTuple):
    """The operands of the difference-form kernels (forward and backward), flattened to
    ``D = prod(latent)`` and made contiguous once.

    ``x: [B, D]``; ``mu: [C, T, D]`` or ``[B, C, T, D]``; ``sigma``: diagonal ``mu``'s shape,
    isotropic as given (``[T]``, ``[C, T]`` or ``[B, C, T]``); ``index``: ``class_index [B, K]``
    or ``x`` as a dummy pointer. ``mu_strides`` / ``sigma_strides``: 4 strides (image, class,
    step, latent), 0 where the tensor broadcasts.
    """

    x: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    index: torch.Tensor
    num_classes: int
    num_steps: int
    dim: int
    num_candidates: int
    diagonal: bool
    acc_dtype: torch.dtype
    mu_strides: list[int]
    sigma_strides: list[int]

    @property
    def row_strides(self) -> tuple[int, ...]:
        """``stride_xb, stride_mb, stride_mc, stride_mt, stride_sb, stride_sc, stride_st,
        stride_sd, stride_ib``: the stride arguments of the row kernels, in their order."""
        return (self.x.stride(0), *self.mu_strides[:3], *self.sigma_strides, self.index.stride(0))

    @property
    def log_norm_const(self) -> float:
        """``-D/2 log(2 pi)``."""
        return -0.5 * self.dim * LOG_2PI


def diff_layout(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    class_index: torch.Tensor | None,
) -> DiffLayout:
    """``DiffLayout`` of validated arguments (shapes as ``mixture_lse_diff``)."""
    view = bank_view(x, mu, sigma)
    x2 = view.x.contiguous()
    mu_l = view.mu.contiguous()
    sig_l = view.sigma.contiguous()
    if view.diagonal:
        ss = _expand_strides(sig_l, 4)
    else:
        ss = _expand_strides(sig_l, 3) + [0]
    c, t, d = view.num_classes, view.num_steps, view.dim
    k = c if class_index is None else class_index.shape[1]
    idx = class_index.contiguous() if class_index is not None else x2  # dummy pointer
    return DiffLayout(
        x2, mu_l, sig_l, idx, c, t, d, k, view.diagonal, compute_dtype(x.dtype),
        _expand_strides(mu_l, 4), ss,
    )  # fmt: skip


def mixture_lse_diff(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    class_index: torch.Tensor | None,
) -> torch.Tensor:
    """Difference-form LSE ``[B, K]``: float32 (float64 for float64 inputs).

    ``x: [B, *latent]``; ``mu: [C, T, *latent]`` (shared) or ``[B, C, T, *latent]``; ``sigma``
    isotropic (any of ``[T]``, ``[C, T]``, ``[B, C, T]``) or diagonal (the shape of mu).
    """
    lay = diff_layout(x, mu, sigma, class_index)
    b, k = x.shape[0], lay.num_candidates

    def run(config):
        out = torch.empty(b, k, dtype=lay.acc_dtype, device=x.device)
        _mixture_diff_kernel[(b * k,)](
            lay.x,
            lay.mu,
            lay.sigma,
            lay.index,
            out,
            k,
            lay.num_steps,
            lay.dim,
            *lay.row_strides,
            lay.log_norm_const,
            HAS_INDEX=class_index is not None,
            DIAG=lay.diagonal,
            ACC_F64=lay.acc_dtype == torch.float64,
            **diff_blocks(config, lay.num_steps, lay.dim),
        )
        return out

    configs = DIFF_CONFIGS_DIAG if lay.diagonal else DIFF_CONFIGS
    return tuning.tuned("_mixture_diff_kernel", configs, diff_key(lay, b), x.device, run)


def diff_blocks(config, steps: int, dim: int) -> dict:
    """A difference-form config's launch keywords, its tile capped at ``[T, D]`` (powers of 2)."""
    return tuning.fit_blocks(
        config, BLOCK_T=triton.next_power_of_2(steps), BLOCK_D=triton.next_power_of_2(dim)
    )


def diff_key(lay: DiffLayout, batch: int) -> tuple:
    """What the best difference-form config depends on: the sizes, the dtypes, the kernel's
    flags and the number of (image, column) rows (as a power of 2: batches of 60 and 64 share)."""
    return (
        lay.num_steps,
        lay.dim,
        triton.next_power_of_2(batch * lay.num_candidates),
        lay.mu.dim(),
        lay.index is not lay.x,
        lay.diagonal,
        lay.x.dtype,
        lay.mu.dtype,
        lay.sigma.dtype,
    )


# ------------------------------------------------------------------------------------------------
# GEMM form: shared bank at "tf32x3" / "tf32" / "bf16"
# ------------------------------------------------------------------------------------------------


@triton.jit
def _round_tf32(a):
    # Round-to-nearest onto tf32's 10-bit mantissa: add half an ulp of tf32, clear 13 low bits.
    bits = a.to(tl.uint32, bitcast=True)
    bits = (bits + 0x1000) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_bf16(a):
    # Round-to-nearest onto bf16's 7-bit mantissa, kept in fp32. The interpreter's own fp32->bf16
    # cast truncates (measured: 7x the error of torch's bf16 rounding at D=37), so emulate it here.
    bits = a.to(tl.uint32, bitcast=True)
    bits = (bits + 0x8000) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """fp32 ``a @ b`` in the arithmetic of PRECISION (0 ieee, 1 tf32, 2 tf32x3, 3 bf16)."""
    if PRECISION == 3:
        if EMULATE:
            # bf16 x bf16 products are exact in fp32: rounding the operands is the whole mode.
            return tl.dot(_round_bf16(a), _round_bf16(b), input_precision="ieee")
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    if PRECISION == 1:
        # Round both operands to nearest tf32 first, on hardware too: the tensor cores read the
        # top 19 bits of an fp32 operand, i.e. truncate (the PTX of a plain tf32 tl.dot has no
        # cvt.rna before its mma, on sm_80 and sm_90; tf32x3's has). Rounded operands pass exactly.
        a_tf32 = _round_tf32(a)
        b_tf32 = _round_tf32(b)
        if EMULATE:
            return tl.dot(a_tf32, b_tf32, input_precision="ieee")
        return tl.dot(a_tf32, b_tf32, input_precision="tf32")
    if EMULATE:
        if PRECISION == 2:
            a_hi = _round_tf32(a)
            b_hi = _round_tf32(b)
            a_lo = _round_tf32(a - a_hi)
            b_lo = _round_tf32(b - b_hi)
            acc = tl.dot(a_hi, b_lo, input_precision="ieee")
            acc = tl.dot(a_lo, b_hi, acc, input_precision="ieee")
            return tl.dot(a_hi, b_hi, acc, input_precision="ieee")
        return tl.dot(a, b, input_precision="ieee")
    if PRECISION == 2:
        return tl.dot(a, b, input_precision="tf32x3")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _mixture_gemm_kernel(
    x_ptr,
    m1_ptr,
    m2_ptr,
    xx_ptr,
    mm_ptr,
    scale_ptr,
    log_norm_ptr,
    out_ptr,
    B,
    C,
    T,
    D,
    DIAG: tl.constexpr,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Scores of one (image block, class) tile by tile over T:

    ``s = -0.5 * scale_t * (xx_b + mm_t - 2 x_b.m1_t + [x_b^2].m2_t) + log_norm_t``

    Isotropic: ``m1 = mu``, ``mm = |mu|^2``, ``scale = 1/sigma^2``, ``xx = |x|^2`` (no m2).
    Diagonal: ``m1 = mu/sigma^2``, ``m2 = 1/sigma^2``, ``mm = sum mu^2/sigma^2``, ``scale = 1``,
    ``xx = 0``. All bank rows ``[C*T, D]`` contiguous.
    """
    pid_b = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    offs_b = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    b_mask = offs_b < B
    if DIAG:
        xx = tl.zeros([BLOCK_B], tl.float32)
    else:
        xx = tl.load(xx_ptr + offs_b, mask=b_mask, other=0.0)
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_B], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_mask = offs_t < T
        rows = c * T + offs_t  # int64: C*T*D passes 2^31 at ImageNet scale
        cross = tl.zeros([BLOCK_B, BLOCK_T], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            d_mask = offs_d < D
            xa = tl.load(
                x_ptr + offs_b[:, None] * D + offs_d[None, :],
                mask=b_mask[:, None] & d_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            bank_off = rows[None, :] * D + offs_d[:, None]  # [BLOCK_D, BLOCK_T]: mu^T tile
            bank_mask = d_mask[:, None] & t_mask[None, :]
            m1 = tl.load(m1_ptr + bank_off, mask=bank_mask, other=0.0).to(tl.float32)
            cross += -2.0 * _dot(xa, m1, PRECISION, EMULATE)
            if DIAG:
                m2 = tl.load(m2_ptr + bank_off, mask=bank_mask, other=0.0).to(tl.float32)
                cross += _dot(xa * xa, m2, PRECISION, EMULATE)
        mm = tl.load(mm_ptr + rows, mask=t_mask, other=0.0)
        scale = tl.load(scale_ptr + rows, mask=t_mask, other=0.0)
        log_norm = tl.load(log_norm_ptr + rows, mask=t_mask, other=0.0)
        # Rounding can make |x - mu|^2 slightly negative when x sits on a mean: clamp at 0.
        quad = tl.maximum(cross + xx[:, None] + mm[None, :], 0.0)
        s = -0.5 * quad * scale[None, :] + log_norm[None, :]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # as in row_lse
        l = l * tl.exp(m - m_shift) + tl.sum(tl.exp(s - m_shift[:, None]), 1)
        m = m_new
    tl.store(out_ptr + offs_b * C + c, m + tl.log(l), mask=b_mask)


class GemmOperands(NamedTuple):
    """Per-bank operands of the GEMM kernel (see ``_mixture_gemm_kernel``), all fp32 on mu's device.

    ``m1, m2: [C*T, D]`` contiguous (isotropic: ``m2`` is ``m1``, unused), ``mm, scale,
    log_norm: [C*T]``. ``|mu|^2`` and ``sum mu^2/sigma^2`` are summed in float64 (exact
    difference-free terms). They depend on the bank only: ``genrep_fast.PreparedBank`` computes
    them once per snapshot; a raw ``(mu, sigma)`` gets them recomputed on every call.
    """

    m1: torch.Tensor
    m2: torch.Tensor
    mm: torch.Tensor
    scale: torch.Tensor
    log_norm: torch.Tensor


# Values per chunk of the float64 preparation: its temporaries stay near 256 MiB whatever the bank
# size (an ImageNet-scale fp32 bank of 1.6 GB would otherwise need 6.4 GB of them at once).
PREP_CHUNK_VALUES = 2**25


def gemm_operands(mu: torch.Tensor, sigma: torch.Tensor) -> GemmOperands:
    """``GemmOperands`` of a shared bank ``mu: [C, T, *latent]``, sigma isotropic or diagonal.

    An fp32 ``mu`` that is already contiguous becomes ``m1`` itself (a view, no copy). The float64
    sums run over chunks of rows (``PREP_CHUNK_VALUES``).
    """
    c, t = mu.shape[0], mu.shape[1]
    d = mu[0, 0].numel()
    rows = c * t
    mu2 = mu.reshape(rows, d)
    const = -0.5 * d * LOG_2PI
    step = max(1, PREP_CHUNK_VALUES // max(d, 1))
    f32 = {"dtype": torch.float32, "device": mu.device}
    mm = torch.empty(rows, **f32)
    if is_diagonal(mu, sigma):
        sig2 = sigma.reshape(rows, d)
        m1, m2, log_norm = torch.empty(rows, d, **f32), torch.empty(rows, d, **f32), mm.clone()
        for r0 in range(0, rows, step):
            sig = sig2[r0 : r0 + step].double()
            ivar = sig.square().reciprocal()
            mud = mu2[r0 : r0 + step].double()
            m1[r0 : r0 + step] = mud * ivar
            m2[r0 : r0 + step] = ivar
            mm[r0 : r0 + step] = (mud.square() * ivar).sum(-1)
            log_norm[r0 : r0 + step] = const - torch.log(sig).sum(-1)
        return GemmOperands(m1, m2, mm, torch.ones(rows, **f32), log_norm)
    sig = sigma.expand(c, t).reshape(rows).double()
    m1 = mu2.float().contiguous()
    for r0 in range(0, rows, step):
        mm[r0 : r0 + step] = mu2[r0 : r0 + step].double().square().sum(-1)
    return GemmOperands(
        m1, m1, mm, sig.square().reciprocal().float(), (const - d * torch.log(sig)).float()
    )


def mixture_lse_gemm(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    precision: str,
    operands: GemmOperands | None = None,
) -> torch.Tensor:
    """GEMM-form LSE ``[B, C]`` float32 of a shared bank; ``x: [B, *latent]``.

    ``operands``: ``gemm_operands(mu, sigma)`` computed earlier (a prepared bank); None computes
    them here, from the tensors as they are now. Pairs with a non-finite image or bank row are
    then redone in the difference form (``redo_nonfinite_pairs``).
    """
    if operands is None:
        operands = gemm_operands(mu, sigma)
    b = x.shape[0]
    c, t = mu.shape[0], mu.shape[1]
    x2 = x.reshape(b, -1).float().contiguous()
    xx = x2.double().square().sum(-1).float()
    out = torch.empty(b, c, dtype=torch.float32, device=x.device)
    block_b = max(16, min(GEMM_MAX_BLOCK_B, triton.next_power_of_2(b)))
    grid = (triton.cdiv(b, block_b), c)
    diagonal = is_diagonal(mu, sigma)
    _mixture_gemm_kernel[grid](
        x2,
        operands.m1,
        operands.m2,
        xx,
        operands.mm,
        operands.scale,
        operands.log_norm,
        out,
        b,
        c,
        t,
        x2.shape[1],
        DIAG=diagonal,
        PRECISION=PRECISION_CODES[precision],
        EMULATE=_interpreted(),
        BLOCK_B=block_b,
        BLOCK_T=GEMM_BLOCK_T,
        BLOCK_D=GEMM_BLOCK_D_DIAG if diagonal else GEMM_BLOCK_D,
    )
    redo_nonfinite_pairs(out, x, mu, sigma, xx, operands.mm)
    return out


def mixture_lse(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    class_index: torch.Tensor | None,
    *,
    precision: str = "ieee",
    operands: GemmOperands | None = None,
) -> torch.Tensor:
    """``logsumexp_t log N(x; mu, sigma^2)`` ``[B, C]`` / ``[B, K]`` (arguments already validated).

    The shared bank goes through the GEMM kernel for ``precision`` in tf32x3 / tf32 / bf16 (float
    inputs below float64, no ``class_index``), with ``operands`` when a prepared bank has them;
    everything else through the difference kernel.
    """
    if uses_gemm_form(x, mu, class_index, precision):
        with tuning.device_guard(x.device):
            return mixture_lse_gemm(x, mu, sigma, precision, operands)
    return mixture_lse_diff(x, mu, sigma, class_index)


def uses_gemm_form(
    x: torch.Tensor, mu: torch.Tensor, class_index: torch.Tensor | None, precision: str
) -> bool:
    """True where ``mixture_lse`` takes the GEMM-form kernel: a shared bank without candidate
    classes, inputs below float64, ``precision`` other than ``"ieee"``."""
    per_image = mu.dim() == x.dim() + 2
    return not (
        per_image or class_index is not None or precision == "ieee" or x.dtype == torch.float64
    )


# ------------------------------------------------------------------------------------------------
# Non-finite inputs of the GEMM form (docs/METHOD.md, "Non-finite values")
# ------------------------------------------------------------------------------------------------


@triton.jit
def _mixture_diff_redo_kernel(
    x_ptr,
    mu_ptr,
    sig_ptr,
    bad_b_ptr,
    bad_c_ptr,
    out_ptr,
    K,
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
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_STAGES: tl.constexpr,
):
    """``out[b, c]`` again in the difference form where image b or class c is flagged; every
    other program only reads its two flags."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // K
    c = pid % K
    if (tl.load(bad_b_ptr + b) != 0) | (tl.load(bad_c_ptr + c) != 0):
        m, l = row_lse(
            x_ptr + b * stride_xb, mu_ptr + c * stride_mc, sig_ptr + c * stride_sc, T, D,
            stride_mt, stride_st, stride_sd, log_norm_const, DIAG, False, BLOCK_T, BLOCK_D,
            D_STAGES,
        )  # fmt: skip
        tl.store(out_ptr + pid + tl.arange(0, 1), m + tl.log(l))


def redo_nonfinite_pairs(
    out: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    xx: torch.Tensor,
    mm: torch.Tensor,
) -> None:
    """Overwrite, in the GEMM kernel's result ``out [B, C]``, the pairs whose image or bank rows
    hold inf or NaN (or whose squared norm passes the float range) with the difference form's
    value: ``|x|^2 - 2 x.mu + |mu|^2`` is NaN there (inf - inf) where the difference form gives -inf
    (zero density) or NaN. No host sync: the flags stay on the device and one launch of B*C
    programs redoes the flagged pairs only (shared bank, float32, as ``mixture_lse_gemm``).
    ``xx``: the images' squared norms ``[B]`` and ``mm``: the bank rows' ``[C*T]`` (the GEMM
    kernel's own), non-finite exactly where a row holds inf or NaN or passes the float range."""
    b, c = out.shape
    bad_b = (~torch.isfinite(xx)).to(torch.int8)
    bad_c = (~torch.isfinite(mm.reshape(c, -1)).all(-1)).to(torch.int8)
    lay = diff_layout(x, mu, sigma, None)

    def run(config):
        _mixture_diff_redo_kernel[(b * c,)](
            lay.x,
            lay.mu,
            lay.sigma,
            bad_b,
            bad_c,
            out,
            c,
            lay.num_steps,
            lay.dim,
            lay.x.stride(0),
            lay.mu_strides[1],
            lay.mu_strides[2],
            *lay.sigma_strides[1:],
            lay.log_norm_const,
            DIAG=lay.diagonal,
            **diff_blocks(config, lay.num_steps, lay.dim),
        )

    # One config, untimed: the kernel writes into ``out`` (timing would rerun it) and does work
    # only where a pair is flagged, which timing could not anticipate.
    configs = (DIFF_CONFIGS_DIAG if lay.diagonal else DIFF_CONFIGS)[:1]
    tuning.tuned("_mixture_diff_redo_kernel", configs, (), x.device, run)
