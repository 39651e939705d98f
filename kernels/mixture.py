"""Triton kernels of the thinned Gaussian-mixture log-likelihood (docs/METHOD.md section 1).

The kernels return ``lse[b, k] = logsumexp_t log N(x_b; mu[k, t], sigma[k, t]^2)`` (no ``- log T``);
the fused ones never write the ``[B, C, T]`` scores: the log-sum-exp over T runs online in
registers.

* ``_mixture_diff_kernel``: one program per (image, class) pair, images fastest (or, with a
  config's ``T_TILES``, per pair and span of steps, the spans' log-sum-exps reduced after); the exact
  difference form ``sum_d (x_d - mu_d)^2`` with fp32 accumulation (fp64 for fp64 inputs) in a 2-D
  tile reduced once per T tile (``row_scores``). Serves the per-image bank, candidate classes
  (``class_index`` gathers rows of a shared bank) and the shared bank at ``precision="ieee"``.
  Memory-bound: reads each mu row once. Its tile, warps and stages: ``DIFF_CONFIGS``, picked per
  shape by ``kernels/tuning.py``.
* ``_mixture_gemm_kernel``: the shared bank as a GEMM ``[B, D] x [D, C*T]``; one program per
  (block of images, range of consecutive classes) walks the range's flattened bank rows in
  ``BLOCK_N``-row tiles (>= 128; a tile straddles classes where T is not a multiple of it),
  accumulates each tile's dot in place and finishes the per-class log-sum-exps in the epilogue,
  carrying the running (max, sum) of the class still open at a tile's end into the next tile.
  ``precision`` picks the dot's arithmetic: ``"tf32x3"``, ``"tf32"`` or ``"bf16"``; the bank's
  operand copy in that arithmetic (bf16, or fp32 rounded to nearest tf32) is made once per bank
  (``gemm_operands``; ``genrep_fast.PreparedBank`` keeps it). The GEMM form
  ``|x|^2 - 2 x.mu + |mu|^2`` cancels when x is near a mean and sigma is small
  (docs/NUMERICS.md), which is why ``"ieee"`` uses the difference form.
* The split GEMM form (``SplitGemmConfig``): torch's matrix product (cuBLAS) with fp32 output
  ``acc [B, C*T]``, then ``_gemm_lse_kernel``, the same epilogue over ``acc``. It writes and
  reads the scores once (204 MB at B=256, C=1000, T=100: 0.07 ms at an H100's copy bandwidth)
  but runs the library's GEMM; the autotuner times it against ``GEMM_CONFIGS`` and keeps the
  faster. bf16 and tf32 are one product; tf32x3 is two tf32 products over the operands split
  into tf32 hi and lo parts (``tf32_parts``: ``[x_hi | x_lo] @ [lo | hi]^T``, the small
  products, then ``x_hi @ hi^T`` added to them), whose bank parts a ``PreparedBank`` keeps
  (twice the fp32 bank).

Under ``TRITON_INTERPRET=1`` the interpreter computes every ``tl.dot`` in exact fp32 (and cannot do
a bf16 dot), so the launcher sets ``EMULATE`` and the kernel dots the prepared operands in fp32
(bf16 and tf32 values and their products are exact in fp32) and splits tf32x3's into hi/lo itself,
so that the tests measure each mode's error.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from genrep_fast.kernels import tuning
from genrep_fast.kernels.tuning import interpreted as _interpreted
from genrep_fast.layout import LOG_2PI, bank_view, compute_dtype, is_diagonal

PRECISION_CODES = {"ieee": 0, "tf32": 1, "tf32x3": 2, "bf16": 3}

# Launch configs of the difference kernel (kernels/tuning.py: the first is the default, the
# interpreter's and the pinned one; on CUDA the fastest per shape is picked). The tile is
# [BLOCK_T, BLOCK_D], capped at the sizes; 4096 fp32 values (32 registers a thread at 4 warps) per
# operand in the first configs, 8192 in the last two.
# D_STAGES: the D loop software-pipelined with that many stages (cp.async), or not (1); see
# row_scores. Pipelined, the fp32 isotropic kernel holds 108 registers and 34 KiB of shared
# memory; not, 156 registers (sm_90, the compile gate). T tiles of 16 (and 8) steps: 6% masked
# rows at T = 75, 11% (4%) at T = 100 (32: 22% at both); masked rows load nothing.
# maxnreg: without it ptxas capped these kernels at 128 (or 168) registers and spilled 4-32 B on
# sm_80 / sm_90 (the compile gate); with the ceiling at 255 the same configs fit in registers
# (e.g. DIFF_CONFIGS[1] on sm_80: 152 registers, no spill).
MAXNREG = 255
DIFF_CONFIGS = (
    {"BLOCK_T": 16, "BLOCK_D": 256, "D_STAGES": 3, "num_warps": 4, "num_stages": 3},
    {
        "BLOCK_T": 16,
        "BLOCK_D": 256,
        "D_STAGES": 1,
        "num_warps": 4,
        "num_stages": 3,
        "maxnreg": MAXNREG,
    },
    {"BLOCK_T": 16, "BLOCK_D": 512, "D_STAGES": 1, "num_warps": 8, "num_stages": 2},
    # The per-image bf16 bank ran at 61% of the H100's copy bandwidth with #2 (ncu, bench/results/
    # gpu-h100-20261127: 101 registers, 2 blocks of 8 warps per SM, warps stalled on their
    # loads, 2.42 waves): ~30 KB of loads in flight per SM, at the edge of what 3 TB/s needs.
    # Pipelined deeper, the next tiles wait in shared memory, not in registers: 4 stages of
    # 16 x 256 at 4 warps (121 registers, 26 KB: 4 blocks and ~96 KB in flight per SM in bf16),
    # 3 stages of 8 x 1024 at 8 warps (117 registers, 37 KB: 2 blocks, ~64 KB); sm_90, ptxas
    # 12.8 (triton 3.6, the GPU machine's). 16 x 512 at 8 warps needs 133 registers there: one
    # block per SM.
    {"BLOCK_T": 16, "BLOCK_D": 256, "D_STAGES": 4, "num_warps": 4, "num_stages": 3},
    {"BLOCK_T": 8, "BLOCK_D": 1024, "D_STAGES": 3, "num_warps": 8, "num_stages": 3},
    # The same ncu profile: 640 programs (B=64 x C=10) in 2.42 waves, the last 0.42 of a wave on
    # a mostly idle machine. T_TILES splits each row's steps into spans of that many tiles, one
    # program each, and the launcher takes the log-sum-exp over the spans (torch.logsumexp on
    # [B, K, spans]): at T = 75, 5 spans of 16 steps (3200 programs, ~6 waves at 4 blocks per
    # SM) and 3 spans of 32 (1920 programs, ~7 waves at 2).
    {"BLOCK_T": 16, "BLOCK_D": 256, "D_STAGES": 4, "num_warps": 4, "num_stages": 3, "T_TILES": 1},
    {"BLOCK_T": 16, "BLOCK_D": 512, "D_STAGES": 1, "num_warps": 8, "num_stages": 2, "T_TILES": 2},
)
# Diagonal sigma adds a sigma tile and a second accumulator: pipelined at 16 x 256 the fp32 kernel
# sat at 255 registers and spilled 12 B on sm_90 (the compile gate); 16 x 128 halves the tiles.
DIFF_CONFIGS_DIAG = (
    {
        "BLOCK_T": 16,
        "BLOCK_D": 128,
        "D_STAGES": 3,
        "num_warps": 4,
        "num_stages": 3,
        "maxnreg": MAXNREG,
    },
    {"BLOCK_T": 16, "BLOCK_D": 256, "D_STAGES": 1, "num_warps": 4, "num_stages": 3},
    {"BLOCK_T": 16, "BLOCK_D": 512, "D_STAGES": 1, "num_warps": 8, "num_stages": 2},
)
# The non-finite redo kernel (rare pairs of the GEMM form): a small unpipelined tile, its speed
# does not matter; DIFF_CONFIGS[0] there spilled 4 B on sm_90 (the compile gate).
REDO_CONFIGS = (
    {
        "BLOCK_T": 16,
        "BLOCK_D": 64,
        "D_STAGES": 1,
        "num_warps": 4,
        "num_stages": 1,
        "maxnreg": MAXNREG,
    },
)
# Classes per redo program: its flags in one vector load. One program per (image, class) read two
# flags in each of B*C programs: 0.16 ms per call at B=256, C=1000 with nothing to redo (H100,
# bench/results/gpu-h100-20261126c); 256 classes cut the launch to B*4 programs.
REDO_BLOCK_C = 256
# The GEMM kernel's launch parameters are GEMM_CONFIGS (below, with the kernel).


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
    t_lo,
    t_hi,
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
    """``(m [1], l [1])`` with ``logsumexp_t s = m + log(l)`` over the steps ``t_lo <= t < t_hi``
    of one row (all T: 0 and T): the online log-sum-exp of ``row_scores`` tile by tile. The
    forward kernel and the backward row kernel both call this, so the backward's weights use the
    forward's very arithmetic."""
    acc_t = tl.float64 if ACC_F64 else tl.float32
    m = tl.full([1], float("-inf"), acc_t)
    l = tl.zeros([1], acc_t)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        t_mask = offs_t < t_hi
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
    T_TILES: tl.constexpr,
):
    """One program per (image b, column k), over all T steps (``T_TILES`` = 0): ``out[b, k]``;
    or, with ``T_TILES`` > 0, one per (b, k, span of ``T_TILES`` tiles of steps), each writing
    its span's log-sum-exp to ``out[b, k, span]`` (the launcher reduces over the spans)."""
    pid = tl.program_id(0).to(tl.int64)  # int64 from here on (see class_rows)
    # Batch-fastest order: the programs in flight together share a column k (and a span of
    # steps), so a shared bank's [T, D] block of class k is read from DRAM once and from L2 by
    # the other images (b-major order streams every class's block past each image instead).
    SPAN: tl.constexpr = BLOCK_T * T_TILES
    spans = 1 if T_TILES == 0 else tl.cdiv(T, SPAN)
    batch = tl.num_programs(0).to(tl.int64) // (K * spans)
    b = pid % batch
    span = (pid // batch) % spans
    k = pid // batch // spans
    _, mu_row, sig_row = class_rows(
        mu_ptr, sig_ptr, idx_ptr, b, k, stride_mb, stride_mc, stride_sb, stride_sc, stride_ib,
        HAS_INDEX,
    )  # fmt: skip
    t_lo = 0 if T_TILES == 0 else span * SPAN
    t_hi = T if T_TILES == 0 else tl.minimum(t_lo + SPAN, T)
    m, l = row_lse(
        x_ptr + b * stride_xb, mu_row, sig_row, t_lo, t_hi, D, stride_mt, stride_st, stride_sd,
        log_norm_const, DIAG, ACC_F64, BLOCK_T, BLOCK_D, D_STAGES,
    )  # fmt: skip
    tl.store(out_ptr + (b * K + k) * spans + span + tl.arange(0, 1), m + tl.log(l))


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
        # T_TILES: 0 (a program per row) unless the config splits the steps.
        blocks = {"T_TILES": 0} | diff_blocks(config, lay.num_steps, lay.dim)
        spans = diff_spans(blocks, lay.num_steps)
        out = torch.empty(b, k, spans, dtype=lay.acc_dtype, device=x.device)
        _mixture_diff_kernel[(b * k * spans,)](
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
            **blocks,
        )
        # The spans' log-sum-exps into the row's (a row at -inf in every span stays -inf, NaN
        # stays NaN).
        return out[:, :, 0] if spans == 1 else torch.logsumexp(out, dim=2)

    configs = DIFF_CONFIGS_DIAG if lay.diagonal else DIFF_CONFIGS
    return tuning.tuned("_mixture_diff_kernel", configs, diff_key(lay, b), x.device, run)


def diff_blocks(config, steps: int, dim: int) -> dict:
    """A difference-form config's launch keywords, its tile capped at ``[T, D]`` (powers of 2)."""
    return tuning.fit_blocks(
        config, BLOCK_T=triton.next_power_of_2(steps), BLOCK_D=triton.next_power_of_2(dim)
    )


def diff_spans(blocks: dict, steps: int) -> int:
    """Programs per (image, column) row of ``_mixture_diff_kernel``: spans of ``T_TILES`` tiles of
    ``BLOCK_T`` steps (1 without ``T_TILES``)."""
    tiles = blocks.get("T_TILES", 0)
    return triton.cdiv(steps, blocks["BLOCK_T"] * tiles) if tiles else 1


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


class GemmConfig(NamedTuple):
    """Launch parameters of ``_mixture_gemm_kernel``: the output tile, ``BLOCK_B`` images x
    ``BLOCK_N`` flattened bank rows ``c * T + t``, the reduction step ``BLOCK_D`` (both capped
    where a precision or architecture needs it: ``gemm_tile``), ``num_warps`` and ``num_stages``.
    ``BLOCK_B`` is a maximum: a batch smaller than it gets ``max(16, next_power_of_2(B))``.
    ``IMAGES_ON_M``: the tile turned, images on the MMA's M side (``_mixture_gemm_kernel``)."""

    BLOCK_B: int
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int
    num_stages: int
    IMAGES_ON_M: bool = False


# The configs an autotuner may choose from (every one compiled for sm_80 and sm_90 by the compile
# gate, registers / shared memory / wgmma in bench/results/triton-compile-report.md). The first is
# the default, the only one under the interpreter. Every N tile spans >= 128 bank rows: at T = 75
# or 100 a tile holds parts of 2-3 classes, whose log-sum-exps the epilogue finishes in turn.
# Measured with the compile gate (ptxas 12.9, sm_80 / sm_90): 128 x 128 tiles spill at 8 warps
# in every precision, 64 x 256 and a 4-warp 32 x 128 tile spill in tf32x3; these fit. The
# turned tiles (IMAGES_ON_M, 64-row N tiles): 256 images x 64 rows (the whole ImageNet batch;
# bf16 252 registers on sm_90) and 128 x 64; 256 x 128 spills 0.5-1.6 KB.
GEMM_CONFIGS: list[GemmConfig] = [
    GemmConfig(BLOCK_B=64, BLOCK_N=128, BLOCK_D=32, num_warps=8, num_stages=3),
    GemmConfig(BLOCK_B=64, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3),
    GemmConfig(BLOCK_B=64, BLOCK_N=128, BLOCK_D=32, num_warps=8, num_stages=4),
    GemmConfig(BLOCK_B=32, BLOCK_N=256, BLOCK_D=32, num_warps=8, num_stages=3),
    GemmConfig(BLOCK_B=256, BLOCK_N=64, BLOCK_D=64, num_warps=8, num_stages=3, IMAGES_ON_M=True),
    GemmConfig(BLOCK_B=128, BLOCK_N=64, BLOCK_D=32, num_warps=8, num_stages=4, IMAGES_ON_M=True),
]
GEMM_MIN_BLOCK = 16  # tl.dot needs >= 16 on every side
GEMM_TUNE_MIN_BATCH = 32  # mixture_lse tunes among all of GEMM_CONFIGS from this batch (pow. of 2)
# Streaming multiprocessors assumed when the launch does not run on a CUDA device (interpreter,
# compile gate): an H100 SXM's 132.
DEFAULT_SM_COUNT = 132
# The dtype each precision's dot reads: bf16 operands for "bf16", fp32 for the tf32 modes ("tf32"
# with its operands already rounded to nearest tf32).
GEMM_OPERAND_DTYPES = {"tf32x3": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}


@triton.jit
def _round_tf32(a):
    # Round-to-nearest onto tf32's 10-bit mantissa: add half an ulp of tf32, clear 13 low bits.
    bits = a.to(tl.uint32, bitcast=True)
    bits = (bits + 0x1000) & 0xFFFFE000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _gemm_dot(a, b, acc, PRECISION: tl.constexpr, EMULATE: tl.constexpr):
    """``acc + a @ b`` in the arithmetic of PRECISION (1 tf32, 2 tf32x3, 3 bf16), accumulated in
    place (the MMA chain never waits on a scaling of its result). The operands come prepared
    (``gemm_operand``): bf16 for bf16, fp32 already rounded to nearest tf32 for tf32 (the tensor
    cores read the top 19 bits of an fp32 operand, i.e. truncate: exact on a rounded operand),
    plain fp32 for tf32x3 (Triton splits it into hi + lo with cvt.rna)."""
    if EMULATE:
        # The interpreter computes every dot in exact fp32 and has no bf16 dot: bf16 and tf32
        # operands are exact in fp32 and their products too, so an fp32 dot of the prepared
        # operands is the mode; tf32x3 is emulated by its three hi/lo products.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        if PRECISION == 1:
            # What the tensor cores do with an fp32 operand: keep its top 19 bits. Exact on the
            # prepared (rounded) operands; an unrounded one is truncated here as on hardware.
            a = (a.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
            b = (b.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
        if PRECISION == 2:
            # Triton's tf32x3 (its F32DotTC pass): the two small products into a zero tile, the
            # big one on top, then one add into the accumulator: the small terms never meet
            # the (large) running sum alone. Measured (docs/NUMERICS.md's script, BLOCK_D = 16):
            # accumulating all three in place, 5.9 instead of 2.3 nats at sigma = 1e-2.
            a_hi = _round_tf32(a)
            b_hi = _round_tf32(b)
            part = tl.dot(_round_tf32(a - a_hi), b_hi, input_precision="ieee")
            part = tl.dot(a_hi, _round_tf32(b - b_hi), part, input_precision="ieee")
            return acc + tl.dot(a_hi, b_hi, part, input_precision="ieee")
        return tl.dot(a, b, acc, input_precision="ieee")
    if PRECISION == 3:
        return tl.dot(a, b, acc)
    if PRECISION == 1:
        return tl.dot(a, b, acc, input_precision="tf32")
    return tl.dot(a, b, acc, input_precision="tf32x3")


@triton.jit
def _per_row(v, IMAGES_ON_M: tl.constexpr):
    """A per-bank-row vector ``[BLOCK_N]`` broadcast against the score tile (bank rows on the
    tile's N side when ``IMAGES_ON_M``, else on its M side)."""
    if IMAGES_ON_M:
        out = v[None, :]
    else:
        out = v[:, None]
    return out


@triton.jit
def _per_image(v, IMAGES_ON_M: tl.constexpr):
    """A per-image vector ``[BLOCK_B]`` broadcast against the score tile."""
    if IMAGES_ON_M:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


@triton.jit
def _over_rows(v, MAX: tl.constexpr, IMAGES_ON_M: tl.constexpr):
    """The score tile's max (``MAX``) or sum over its bank rows: ``[BLOCK_B]``."""
    if IMAGES_ON_M:
        if MAX:
            out = tl.max(v, 1)
        else:
            out = tl.sum(v, 1)
    else:
        if MAX:
            out = tl.max(v, 0)
        else:
            out = tl.sum(v, 0)
    return out


@triton.jit
def _mixture_gemm_kernel(
    x_ptr,
    bank_ptr,
    xx_ptr,
    mm_ptr,
    scale_ptr,
    log_norm_ptr,
    out_ptr,
    B,
    C,
    T,
    K,
    CLASSES_PER_PROGRAM,
    PRECISION: tl.constexpr,
    EMULATE: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IMAGES_ON_M: tl.constexpr,
):
    """``out[b, c] = logsumexp_t s[b, c*T + t]`` for one block of images and a contiguous range
    of ``CLASSES_PER_PROGRAM`` classes, whose bank rows ``[c_begin*T, c_end*T)`` it walks in
    ``BLOCK_N``-row tiles (a tile may straddle classes: T = 75, 100 are not powers of two):

    ``acc[n, b] = bank_n . x_b`` over the K operand columns (one accumulator, in place), then in
    the epilogue ``s = -0.5 * scale_n * max(xx_b - 2 acc + mm_n, 0) + log_norm_n``.

    Operands (``GemmOperands``; x made by ``mixture_lse_gemm``): ``x [B, K]``, ``bank [C*T, K]``
    contiguous in the dot's operand dtype. Isotropic: ``K = D``, ``x``, ``bank = mu``,
    ``xx = |x|^2``, ``mm = |mu|^2``, ``scale = 1/sigma^2``. Diagonal: ``K = 2D``,
    ``x = [x, -x^2/2]``, ``bank = [mu/sigma^2, 1/sigma^2]``, ``xx = 0``,
    ``mm = sum mu^2/sigma^2``, ``scale = 1``: one dot either way.

    The tile is ``[BLOCK_N, BLOCK_B]``: bank rows are the MMA's M side (64 rows per warpgroup on
    sm_90), so the per-row vectors of the epilogue (``mm``, ``scale``, ``log_norm``, the class of
    each row) take a few registers per thread; with rows on the N side they took 32 each at 128
    rows and the kernel spilled (compile gate, sm_90). ``IMAGES_ON_M`` (``GemmConfig``) turns the
    tile: ``[BLOCK_B, BLOCK_N]``, images on the M side. The per-image running state (``m``,
    ``l``, ``xx``) then takes a few registers per thread and the per-row vectors ``BLOCK_N / 4``
    each, so a tile of all 256 images of an ImageNet batch fits (256 x 64, bf16, 8 warps:
    252 registers with triton 3.9, 255 with 3.6, no spill, wgmma), where 256 images on the N
    side spill 64 B to 2.7 KB. Its per-class reductions run across a quad's lanes (shuffles)
    instead of across the warps (shared memory). Tile traffic from L2, modelled at B=256,
    C=1000, T=75, D=4096 bf16 (the report's GEMM table): 4.3 GB against 4.9 GB for 64 x 128
    (the bank once per call, but x again for every 64-row tile).

    The per-class log-sum-exp is one running ``(m, l)`` per image: the tile's classes are folded
    in order, a class is stored (and the state reset) when its last row has been seen, and the
    class still open at a tile's end carries its state into the next tile.
    """
    # Row and image indices are int32 (the launcher checks C*T, B*C and BLOCK*K < 2^31); the
    # int64 offset of a tile's first row or image goes into its base offset. int64 index tensors
    # in the accumulator's layout cost registers: the epilogue spilled with them.
    pid_b = tl.program_id(0)
    c_begin = tl.program_id(1) * CLASSES_PER_PROGRAM
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = offs_b < B
    offs_k = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    x_base = (pid_b * BLOCK_B).to(tl.int64) * K
    if IMAGES_ON_M:
        x_offs = x_base + tl.arange(0, BLOCK_B)[:, None] * K  # [BLOCK_B, 1]
    else:
        x_offs = x_base + tl.arange(0, BLOCK_B)[None, :] * K  # [1, BLOCK_B]
    row_end = tl.minimum(c_begin + CLASSES_PER_PROGRAM, C) * T
    m = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_B], tl.float32)
    tile_base = c_begin.to(tl.int64) * T * K  # offset of the tile's first bank row
    for n0 in range(c_begin * T, row_end, BLOCK_N):
        rows = n0 + offs_n
        n_mask = rows < row_end
        if IMAGES_ON_M:
            bank_offs = tile_base + offs_n[None, :] * K  # [1, BLOCK_N]
            acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        else:
            bank_offs = tile_base + offs_n[:, None] * K  # [BLOCK_N, 1]
            acc = tl.zeros([BLOCK_N, BLOCK_B], tl.float32)
        tile_base += BLOCK_N * K
        for k0 in range(0, K, BLOCK_D):
            k_mask = offs_k < K - k0
            if IMAGES_ON_M:
                xs = tl.load(
                    x_ptr + (x_offs + (k0 + offs_k)[None, :]),  # [BLOCK_B, BLOCK_D]
                    mask=b_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                bank = tl.load(
                    bank_ptr + (bank_offs + (k0 + offs_k)[:, None]),  # [BLOCK_D, BLOCK_N]: bank^T
                    mask=k_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )
                acc = _gemm_dot(xs, bank, acc, PRECISION, EMULATE)
            else:
                bank = tl.load(
                    bank_ptr + (bank_offs + (k0 + offs_k)[None, :]),
                    mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                xt = tl.load(
                    x_ptr + (x_offs + (k0 + offs_k)[:, None]),  # [BLOCK_D, BLOCK_B]: x^T, K-major
                    mask=k_mask[:, None] & b_mask[None, :],
                    other=0.0,
                )
                acc = _gemm_dot(bank, xt, acc, PRECISION, EMULATE)
        xx = tl.load(xx_ptr + offs_b, mask=b_mask, other=0.0)
        mm = tl.load(mm_ptr + rows, mask=n_mask, other=0.0)
        scale = tl.load(scale_ptr + rows, mask=n_mask, other=0.0)
        log_norm = tl.load(log_norm_ptr + rows, mask=n_mask, other=0.0)
        # Rounding can make |x - mu|^2 slightly negative when x sits on a mean: clamp at 0.
        # -2 x.mu + |x|^2 first (~ -|mu|^2), then |mu|^2: each sum rounds at the size of its
        # result, and |mu|^2 + |x|^2 (~2 |mu|^2) first rounds more coarsely near a mean
        # (docs/NUMERICS.md's script, tf32x3 at BLOCK_D = 16: 270 instead of 240 nats).
        quad = tl.maximum(
            (_per_image(xx, IMAGES_ON_M) - 2.0 * acc) + _per_row(mm, IMAGES_ON_M), 0.0
        )
        s = -0.5 * quad * _per_row(scale, IMAGES_ON_M) + _per_row(log_norm, IMAGES_ON_M)
        # The classes of this tile, in order; rows past row_end (masked) belong to none of them.
        cls = rows // T
        tile_end = tl.minimum(n0 + BLOCK_N, row_end)
        for c in range(n0 // T, (tile_end - 1) // T + 1):
            s_c = tl.where(_per_row(cls == c, IMAGES_ON_M), s, float("-inf"))
            m_new = tl.maximum(m, _over_rows(s_c, True, IMAGES_ON_M))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # as in row_lse
            e = tl.exp(s_c - _per_image(m_shift, IMAGES_ON_M))
            l = l * tl.exp(m - m_shift) + _over_rows(e, False, IMAGES_ON_M)
            m = m_new
            # Its last row is in this tile: finish the class.
            done = tl.full([BLOCK_B], (c + 1) * T, tl.int32) <= tile_end
            tl.store(out_ptr + offs_b * C + c, m + tl.log(l), mask=b_mask & done)
            m = tl.where(done, float("-inf"), m)
            l = tl.where(done, 0.0, l)


class GemmOperands(NamedTuple):
    """Per-bank operands of the GEMM kernel (see ``_mixture_gemm_kernel``) for one precision, on
    mu's device.

    ``bank``: the bank rows ``[C*T, K]`` contiguous in the precision's operand dtype
    (``GEMM_OPERAND_DTYPES``; tf32: rounded to nearest tf32): ``mu`` (isotropic, ``K = D``) or
    ``[mu/sigma^2, 1/sigma^2]`` (diagonal, ``K = 2D``). ``mm, scale, log_norm: [C*T]`` fp32.
    ``|mu|^2`` and ``sum mu^2/sigma^2`` are summed in float64 from the bank itself (exact
    difference-free terms). They depend on the bank only: ``genrep_fast.PreparedBank`` computes
    them once per snapshot and precision; a raw ``(mu, sigma)`` gets them recomputed on every
    call. ``split``: tf32x3 only, None unless asked for (``gemm_operands(..., split=True)``): the
    bank rows as ``tf32_parts(bank, "bank")`` ``[C*T, 2K]``, the operand of the split tf32x3 form
    (twice the fp32 bank's memory); without it that form makes them per call.
    """

    bank: torch.Tensor
    mm: torch.Tensor
    scale: torch.Tensor
    log_norm: torch.Tensor
    split: torch.Tensor | None = None


# Values per chunk of the float64 preparation: its temporaries stay near 256 MiB whatever the bank
# size (an ImageNet-scale fp32 bank of 1.6 GB would otherwise need 6.4 GB of them at once).
PREP_CHUNK_VALUES = 2**25


def round_tf32_(a: torch.Tensor) -> torch.Tensor:
    """Round a contiguous fp32 tensor to nearest tf32 in place (ties away from zero, as PTX's
    ``cvt.rna.tf32.f32``: add half a tf32 ulp, clear the 13 low mantissa bits); returns it.
    inf stays inf, the largest floats round to inf, a NaN stays NaN except the negative ones
    whose bits wrap to +0: the GEMM launcher flags non-finite rows from the unrounded inputs
    (``redo_nonfinite_pairs``) and redoes them."""
    bits = a.view(torch.int32)
    bits.add_(0x1000).bitwise_and_(~0x1FFF)
    return a


def gemm_operand(a: torch.Tensor, precision: str) -> torch.Tensor:
    """``a`` as the dot of ``precision`` reads it: contiguous bf16 (round to nearest) for
    ``"bf16"``, fp32 rounded to nearest tf32 for ``"tf32"``, fp32 for ``"tf32x3"``. A tensor
    already in that form is returned as is (no copy) for bf16 / tf32x3; tf32 always copies
    (the rounding must not write into the caller's tensor)."""
    out = a.to(GEMM_OPERAND_DTYPES[precision]).contiguous()
    if precision == "tf32":
        if out is a:
            out = out.clone()
        round_tf32_(out)
    return out


# The isotropic bank's operand and row norms in one pass (``_bank_operand_kernel``): what the
# kernel writes as the operand. 0: nothing (the bank is its own operand), 1: fp32, 2: fp32 rounded
# to nearest tf32, 3: bf16.
_OPERAND_MODES = {"tf32x3": 1, "tf32": 2, "bf16": 3}
PREP_CONFIG = {"BLOCK_D": 1024, "num_warps": 4, "num_stages": 3}


@triton.jit
def _round_bf16(a):
    # fp32 -> bf16 rounded to nearest even, by its bits: torch's cast on every finite value and
    # inf (the interpreter's own cast truncates). NaN rows are flagged from their float64 norm and
    # redone (redo_nonfinite_pairs), whatever their operand bits.
    bits = a.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _bank_operand_kernel(
    mu_ptr,
    bank_ptr,
    mm_ptr,
    parts_ptr,
    D,
    stride_row,
    MODE: tl.constexpr,
    PARTS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Row ``r`` of a bank ``[rows, D]`` (unit stride along D): ``mm[r] = sum mu[r]^2`` summed in
    float64 (fp32 squares are exact in float64) and, for MODE > 0, ``bank[r]`` the operand of the
    GEMM precision. One read of the bank instead of a float64 copy, a square and a sum per chunk
    (5.4-6.2 ms per raw-tensor call at C=1000, T=100, D=4096 on the H100, bench/results/
    gpu-h100-20261126c). PARTS > 0 (the split tf32x3 form, ``tf32_parts``): ``parts[r]`` the row's
    fp32 values split into ``hi`` (rounded to nearest tf32) and ``lo = v - hi`` (exact), laid out
    ``[hi | lo]`` (PARTS = 1, images) or ``[lo | hi]`` (PARTS = 2, a bank)."""
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK_D], dtype=tl.float64)
    for d0 in range(0, D, BLOCK_D):
        offs = d0 + tl.arange(0, BLOCK_D)
        inside = offs < D
        v = tl.load(mu_ptr + row * stride_row + offs, mask=inside, other=0.0)
        v64 = v.to(tl.float64)
        acc += v64 * v64
        if MODE == 1:
            tl.store(bank_ptr + row * D + offs, v.to(tl.float32), mask=inside)
        elif MODE == 2:
            tl.store(bank_ptr + row * D + offs, _round_tf32(v.to(tl.float32)), mask=inside)
        elif MODE == 3:
            tl.store(bank_ptr + row * D + offs, _round_bf16(v.to(tl.float32)), mask=inside)
        if PARTS > 0:
            hi = _round_tf32(v.to(tl.float32))
            part_row = parts_ptr + row * (2 * D) + offs
            tl.store(part_row + (PARTS - 1) * D, hi, mask=inside)
            tl.store(part_row + (2 - PARTS) * D, v.to(tl.float32) - hi, mask=inside)
    tl.store(mm_ptr + row + tl.arange(0, 1), tl.sum(acc, 0).to(tl.float32))


def _isotropic_operand(
    mu2: torch.Tensor, precision: str, parts: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(bank, mm, parts)`` of an isotropic bank ``mu2: [rows, D]`` for ``precision``: one launch
    of ``_bank_operand_kernel``. A contiguous bank already in the operand dtype (fp32 for tf32x3,
    bf16 for bf16) is its own operand (no copy); tf32 always writes a rounded copy. ``parts``
    (tf32x3 only): ``"x"`` or ``"bank"`` also writes ``tf32_parts(mu2, parts)`` in the same
    pass, else None."""
    if mu2.stride(-1) != 1:
        mu2 = mu2.contiguous()
    rows, d = mu2.shape
    dtype = GEMM_OPERAND_DTYPES[precision]
    own = precision != "tf32" and mu2.dtype == dtype and mu2.is_contiguous()
    bank = mu2 if own else torch.empty(rows, d, dtype=dtype, device=mu2.device)
    mm = torch.empty(rows, dtype=torch.float32, device=mu2.device)
    split = torch.empty(rows, 2 * d, dtype=torch.float32, device=mu2.device) if parts else None
    mode = 0 if own else _OPERAND_MODES[precision]

    def run(config):
        _bank_operand_kernel[(rows,)](
            mu2, bank, mm, mm if split is None else split, d, mu2.stride(0), MODE=mode,
            PARTS=_PARTS_CODES[parts],
            **tuning.fit_blocks(config, BLOCK_D=triton.next_power_of_2(d)),
        )  # fmt: skip

    tuning.tuned("_bank_operand_kernel", (PREP_CONFIG,), (), mu2.device, run)
    return bank, mm, split


# The layouts of tf32_parts (the operand kernel's PARTS): 0 none, 1 images [hi | lo], 2 bank
# [lo | hi].
_PARTS_CODES = {None: 0, "x": 1, "bank": 2}


def tf32_parts(a: torch.Tensor, side: str) -> torch.Tensor:
    """The split tf32x3 form's operand of ``a: [rows, K]`` (torch; ``_bank_operand_kernel`` writes
    the same in its pass): each value split into ``hi = round_tf32(a)`` and ``lo = a - hi``
    (exact in fp32), as ``[rows, 2K]``: ``[hi | lo]`` for ``side="x"`` (the images), ``[lo |
    hi]`` for ``side="bank"``. Then ``[x_hi | x_lo] @ [lo | hi]^T`` is the two small products
    in one tf32 GEMM, and ``x_hi @ hi^T`` (views) the big one, added on top of them
    (``_split_product``), as the fused kernel keeps its small products apart. ``hi`` is exact
    in tf32 whether the tensor cores round or truncate their operands; ``lo`` loses at most
    2^-10 of itself, about 2^-21 of the value. Chunks of ``PREP_CHUNK_VALUES`` rows keep the
    temporaries small."""
    if side not in ("x", "bank"):
        raise ValueError(f"side must be 'x' or 'bank', got {side!r}")
    rows, k = a.shape
    out = torch.empty(rows, 2 * k, dtype=torch.float32, device=a.device)
    hi_at, lo_at = (slice(0, k), slice(k, 2 * k)) if side == "x" else (slice(k, 2 * k), slice(0, k))
    step = max(1, PREP_CHUNK_VALUES // max(k, 1))
    for r0 in range(0, rows, step):
        v = a[r0 : r0 + step].float()
        hi = round_tf32_(v.clone())
        chunk = out[r0 : r0 + step]
        chunk[:, hi_at] = hi
        chunk[:, lo_at] = v - hi
    return out


def gemm_operands(
    mu: torch.Tensor, sigma: torch.Tensor, precision: str, *, split: bool = False
) -> GemmOperands:
    """``GemmOperands`` of a shared bank ``mu: [C, T, *latent]``, sigma isotropic or diagonal, for
    ``precision`` (``"tf32x3"``, ``"tf32"`` or ``"bf16"``); ``split`` (tf32x3): with the split
    form's operand (``GemmOperands.split``), in the same pass over an isotropic bank.

    A contiguous isotropic ``mu`` already in the operand dtype (fp32 for tf32x3, bf16 for bf16)
    becomes ``bank`` itself (a view, no copy); otherwise one kernel writes the operand and the
    float64 row norms in one pass (``_bank_operand_kernel``). The diagonal form's float64 terms
    run in torch over chunks of rows (``PREP_CHUNK_VALUES``).
    """
    if precision not in GEMM_OPERAND_DTYPES:
        raise ValueError(
            f"precision must be one of {sorted(GEMM_OPERAND_DTYPES)} for the GEMM form, got "
            f"{precision!r}"
        )
    if split and precision != "tf32x3":
        raise ValueError(f"split=True: only tf32x3 has a split operand, got {precision!r}")
    c, t = mu.shape[0], mu.shape[1]
    d = mu[0, 0].numel()
    rows = c * t
    mu2 = mu.reshape(rows, d)
    const = -0.5 * d * LOG_2PI
    f32 = {"dtype": torch.float32, "device": mu.device}
    if is_diagonal(mu, sigma):
        step = max(1, PREP_CHUNK_VALUES // max(d, 1))
        mm = torch.empty(rows, **f32)
        sig2 = sigma.reshape(rows, d)
        bank = torch.empty(rows, 2 * d, dtype=GEMM_OPERAND_DTYPES[precision], device=mu.device)
        log_norm = mm.clone()
        for r0 in range(0, rows, step):
            sig = sig2[r0 : r0 + step].double()
            ivar = sig.square().reciprocal()
            mud = mu2[r0 : r0 + step].double()
            # Rounded from fp32 (as the fp32 operands are), chunk by chunk.
            bank[r0 : r0 + step, :d] = gemm_operand((mud * ivar).float(), precision)
            bank[r0 : r0 + step, d:] = gemm_operand(ivar.float(), precision)
            mm[r0 : r0 + step] = (mud.square() * ivar).sum(-1)
            log_norm[r0 : r0 + step] = const - torch.log(sig).sum(-1)
        parts = tf32_parts(bank, "bank") if split else None
        return GemmOperands(bank, mm, torch.ones(rows, **f32), log_norm, parts)
    sig = sigma.expand(c, t).reshape(rows).double()
    # bf16 straight from mu: one rounding
    bank, mm, parts = _isotropic_operand(mu2, precision, "bank" if split else None)
    return GemmOperands(
        bank, mm, sig.square().reciprocal().float(), (const - d * torch.log(sig)).float(), parts
    )


def gemm_tile(config: GemmConfig, precision: str, arch: int | None) -> tuple[int, int]:
    """``(largest BLOCK_B, BLOCK_D)`` the kernel runs ``config`` at for ``precision`` on
    ``sm_<arch>`` (None: the interpreter). tf32x3 splits every operand into hi and lo in
    registers and keeps a second accumulator tile for the small products: BLOCK_D at most 32
    (64 spills), and before sm_90 (mma.sync, operands in registers) BLOCK_B at most 32 (64 x 128
    tiles spill 8-16 B at 255 registers on sm_80; compile gate, ptxas 12.9). A turned tile
    (``IMAGES_ON_M``): BLOCK_D at most 32 for the fp32 operands (shared memory), BLOCK_B at most
    128 before sm_90 and for tf32x3 (spills; compile gate, triton 3.9, sm_80 / sm_90)."""
    block_b, block_d = config.BLOCK_B, config.BLOCK_D
    if config.IMAGES_ON_M:
        if precision != "bf16":
            # fp32 operands: 256 x 64 x 64 in 3 stages needs 240 KiB of shared memory (sm_90: 227).
            block_d = min(block_d, 32)
        if arch is not None and arch < 90:
            block_b = min(block_b, 128)  # mma.sync: 256 x 64 spills 112-116 B (sm_80)
    if precision != "tf32x3":
        return block_b, block_d
    if config.IMAGES_ON_M:
        block_b = min(block_b, 128)  # 256 images x 64 rows spill 48-80 B at 255 registers (sm_90)
    block_b = block_b if arch is None or arch >= 90 else min(block_b, 32)
    return block_b, min(block_d, 32)


def _target_arch() -> int | None:
    """The compute capability Triton compiles for now (e.g. 90), None under the interpreter."""
    if _interpreted():
        return None
    target = triton.runtime.driver.active.get_current_target()
    return target.arch if isinstance(target.arch, int) else None


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


@functools.lru_cache(maxsize=256)
def gemm_classes_per_program(
    classes: int, steps: int, block_n: int, batch_blocks: int, sm_count: int
) -> int:
    """How many consecutive classes one program of ``_mixture_gemm_kernel`` owns: the count that
    minimises the modelled time in N tiles, ``waves * tiles per program`` (``waves =
    ceil(programs / sm_count)``; all tiles cost alike), then the tiles launched in all (the
    masked rows of each program's last tile), then the count itself. E.g. C = 1000, T = 100,
    BLOCK_N = 128, 4 batch blocks, 132 SMs: 32 classes (128 programs of 25 full tiles, one wave;
    1 class per program: 4000 programs of 1 tile, 22% of it masked, 31 waves)."""
    best = (0, 0, 0)
    for k in range(1, classes + 1):
        groups = -(-classes // k)
        tiles = -(-(k * steps) // block_n)
        waves = -(-(batch_blocks * groups) // sm_count)
        rest = classes - (groups - 1) * k  # the last group's classes
        launched = batch_blocks * ((groups - 1) * tiles + -(-(rest * steps) // block_n))
        key = (waves * tiles, launched, k)
        if k == 1 or key < best:
            best = key
    return best[2]


def mixture_lse_gemm(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    precision: str,
    operands: GemmOperands | None = None,
    *,
    config: GemmConfig | None = None,
    classes_per_program: int | None = None,
) -> torch.Tensor:
    """GEMM-form LSE ``[B, C]`` float32 of a shared bank; ``x: [B, *latent]``.

    ``operands``: ``gemm_operands(mu, sigma, precision)`` computed earlier (a prepared bank), for
    this very precision; None computes them here, from the tensors as they are now. ``config``:
    one of ``GEMM_CONFIGS`` (default the first) or a ``SplitGemmConfig`` (the library GEMM and
    ``_gemm_lse_kernel``; tf32x3 over ``operands.split``, made here where it is None).
    ``classes_per_program``: classes per program (default ``gemm_classes_per_program``). Pairs
    with a non-finite image or bank row are then redone in the difference form
    (``redo_nonfinite_pairs``).
    """
    cfg = GEMM_CONFIGS[0] if config is None else config
    b = x.shape[0]
    c, t = mu.shape[0], mu.shape[1]
    split = isinstance(cfg, SplitGemmConfig)
    if split and (max(c * t, b * c) >= 2**31 or triton.next_power_of_2(t) > SPLIT_MAX_BLOCK_T):
        raise ValueError(
            f"the split GEMM form needs C*T and B*C below 2^31 and T <= {SPLIT_MAX_BLOCK_T}, "
            f"got B={b}, C={c}, T={t} (use a config of GEMM_CONFIGS)"
        )
    parts = split and precision == "tf32x3"  # the split tf32x3 form reads tf32_parts operands
    if operands is None:
        operands = gemm_operands(mu, sigma, precision, split=parts)
    elif operands.bank.dtype != GEMM_OPERAND_DTYPES[precision]:
        raise ValueError(
            f"operands: bank is {operands.bank.dtype}, precision {precision!r} reads "
            f"{GEMM_OPERAND_DTYPES[precision]} (use gemm_operands(mu, sigma, {precision!r}))"
        )
    diagonal = is_diagonal(mu, sigma)
    if diagonal:  # [x, -x^2/2] against [mu/sigma^2, 1/sigma^2]; |x|^2 is not a term
        x32 = x.reshape(b, -1).float()
        xx = x32.double().square().sum(-1).float()
        xa = gemm_operand(torch.cat([x32, -0.5 * x32.square()], 1), precision)
        xx_term = torch.zeros_like(xx)
        if parts:
            xa = tf32_parts(xa, "x")
    else:
        # The operand and |x|^2 (float64 sum) in one launch, as for the bank: each torch op costs
        # the host ~25 us on the H100 machine, and calls there were host-bound (bench/results/
        # gpu-h100-20261127).
        xa, xx, x_parts = _isotropic_operand(x.reshape(b, -1), precision, "x" if parts else None)
        xa = x_parts if parts else xa
        xx_term = xx
    k = xa.shape[1]
    if split:
        if parts and operands.split is None:  # a prepared bank made without it
            operands = operands._replace(split=tf32_parts(operands.bank, "bank"))
        out, bad_c = mixture_lse_split(xa, xx_term, operands, c, t, precision, cfg)
        redo_nonfinite_pairs(out, x, mu, sigma, xx, operands.mm, bad_c)
        return out
    max_block_b, block_d = gemm_tile(cfg, precision, _target_arch())
    block_b = max(GEMM_MIN_BLOCK, min(max_block_b, triton.next_power_of_2(b)))
    if max(c * t + cfg.BLOCK_N, b * c, max(cfg.BLOCK_N, block_b) * k) >= 2**31:
        raise ValueError(
            f"the GEMM kernel indexes bank rows, outputs and in-tile offsets in int32: need "
            f"C*T, B*C and {max(cfg.BLOCK_N, block_b)}*K (K = D, 2D for a diagonal sigma) "
            f"below 2^31, got B={b}, C={c}, T={t}, K={k} (precision='ieee' has no such limit)"
        )
    batch_blocks = triton.cdiv(b, block_b)
    if classes_per_program is None:
        sms = _sm_count(x.device)
        classes_per_program = gemm_classes_per_program(c, t, cfg.BLOCK_N, batch_blocks, sms)
    out = torch.empty(b, c, dtype=torch.float32, device=x.device)
    _mixture_gemm_kernel[(batch_blocks, triton.cdiv(c, classes_per_program))](
        xa,
        operands.bank,
        xx_term,
        operands.mm,
        operands.scale,
        operands.log_norm,
        out,
        b,
        c,
        t,
        k,
        classes_per_program,
        PRECISION=PRECISION_CODES[precision],
        EMULATE=_interpreted(),
        BLOCK_B=block_b,
        BLOCK_N=cfg.BLOCK_N,
        BLOCK_D=block_d,
        IMAGES_ON_M=cfg.IMAGES_ON_M,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        # A turned tile of 32 images (mma.sync: wgmma needs 64 rows) was capped at 128 registers
        # by ptxas and spilled 4 B in tf32x3 (sm_90, compile gate); the ceiling lifts the cap.
        **({"maxnreg": MAXNREG} if cfg.IMAGES_ON_M else {}),
    )
    redo_nonfinite_pairs(out, x, mu, sigma, xx, operands.mm)
    return out


# ------------------------------------------------------------------------------------------------
# Split GEMM form: the library GEMM, then the log-sum-exp epilogue as its own kernel
# ------------------------------------------------------------------------------------------------


class SplitGemmConfig(NamedTuple):
    """The split GEMM form (``mixture_lse_split``): ``acc = x @ bank^T`` by torch's matrix product
    (cuBLAS on CUDA) with fp32 output, then ``_gemm_lse_kernel`` over ``BLOCK_C`` classes x
    ``IMAGES_PER_PROGRAM`` images per program. A candidate of the GEMM-form autotuner next to
    ``GEMM_CONFIGS``: the fused kernel re-reads the bank once per 64-image block and keeps one
    8-warp block per SM (H100, bf16: 2.7x a plain GEMM, bench/results/gpu-h100-20261126c); the
    split form costs one plain GEMM plus a write and a read of ``acc`` (``B*C*T`` fp32: 102 MB
    at B=256, C=1000, T=100, 0.07 ms at 3 TB/s). tf32x3: two tf32 GEMMs reading 3x the fp32
    bank (its lo / hi parts, then hi again), 4.9 GB at that shape: about 1.7 ms at 2.9 TB/s
    (modelled), against the fused kernel's 3.83 ms measured on a prepared bank (bench/results/
    gpu-h100-20261127); not yet timed on a GPU."""

    BLOCK_C: int
    IMAGES_PER_PROGRAM: int
    num_warps: int


LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
SPLIT_CONFIG = SplitGemmConfig(BLOCK_C=8, IMAGES_PER_PROGRAM=16, num_warps=4)
# Floats of ``acc`` per chunk of images: its memory stays near 256 MiB whatever the batch.
SPLIT_CHUNK_VALUES = 2**26
# The epilogue holds BLOCK_C x next_power_of_2(T) values of four tensors per program, at most
# this many (BLOCK_C shrinks as T grows): T up to it.
SPLIT_MAX_BLOCK_T = 1024
# The precisions the split form runs: bf16 and tf32 as one library product, tf32x3 as two over
# hi / lo parts (``tf32_parts``).
SPLIT_PRECISIONS = ("bf16", "tf32", "tf32x3")


@triton.jit
def _gemm_lse_kernel(
    acc_ptr,
    xx_ptr,
    mm_ptr,
    scale_ptr,
    log_norm_ptr,
    out_ptr,
    bad_c_ptr,
    B,
    C,
    ROW,
    IMAGES_PER_PROGRAM,
    T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """``out[b, c] = logsumexp_t s[b, c*T + t]``, ``s = -0.5 * scale_n * max(xx_b - 2 acc[b, n] +
    mm_n, 0) + log_norm_n``: the fused kernel's epilogue (its sums in the same order; the
    log-sum-exp in base 2) over a product ``acc [B, C*T]`` fp32 computed beforehand. Program (i, j) owns classes ``[i*BLOCK_C,
    (i+1)*BLOCK_C)`` and images ``[j*IMAGES_PER_PROGRAM, ...)``: the per-row vectors are loaded
    once and serve every image. ``bad_c[c]`` = 1 where a row of class c has a non-finite
    ``mm`` (inf or NaN in its mean, or past the float range): the flags of
    ``redo_nonfinite_pairs``, written by every image block alike."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_t = tl.arange(0, BLOCK_T)
    c_mask = offs_c < C
    # T is a constexpr (one compile per bank length): Triton then knows a class's first row and
    # the step mask by 4s where T is a multiple of 4, and loads 4 values per instruction. With T
    # an argument, T = 100 compiled to scalar loads and the epilogue was instruction-bound (ncu,
    # H100, bench/results/gpu-h100-20261127).
    mask = c_mask[:, None] & (offs_t < T)[None, :]
    rows = offs_c[:, None] * T + offs_t[None, :]  # int32: the launcher checks C*T < 2^31
    mm = tl.load(mm_ptr + rows, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=mask, other=0.0)
    log_norm = tl.load(log_norm_ptr + rows, mask=mask, other=0.0)
    row_bad = (mm != mm) | (tl.abs(mm) == float("inf"))
    tl.store(bad_c_ptr + offs_c, tl.max(row_bad.to(tl.int32), 1).to(tl.int8), mask=c_mask)
    # The log-sum-exp in base 2, its per-row factors made once: s2 = s * log2(e) = quad * coef +
    # base, exp2 on the MUFU directly (tl.exp multiplies by log2(e) on every value), and the
    # masked steps' base -inf instead of a select per image (coef = 0 there: s2 = -inf). The
    # epilogue was instruction-bound (ncu, H100: 60% SM throughput, 20% DRAM).
    coef = scale * (-0.5 * LOG2E)
    base = tl.where(mask, log_norm * LOG2E, float("-inf"))
    b0 = tl.program_id(1) * IMAGES_PER_PROGRAM
    # ROW = C*T, an argument of its own: Triton specialises it on divisibility by 16, so the
    # image rows keep the alignment of acc's base through the loop.
    acc_row = acc_ptr + b0.to(tl.int64) * ROW  # the int64 offset of the image's row
    for b in range(b0, tl.minimum(b0 + IMAGES_PER_PROGRAM, B)):
        xx = tl.load(xx_ptr + b)
        acc = tl.load(acc_row + rows, mask=mask, other=0.0)
        acc_row += ROW
        quad = tl.maximum((xx - 2.0 * acc) + mm, 0.0)
        s2 = quad * coef + base
        m = tl.max(s2, 1)
        m_shift = tl.where(m == float("-inf"), 0.0, m)  # as in row_lse
        l = tl.sum(tl.exp2(s2 - m_shift[:, None]), 1)
        tl.store(out_ptr + b * C + offs_c, (m + tl.log2(l)) * LN2, mask=c_mask)


def _split_product(xa: torch.Tensor, bank: torch.Tensor, precision: str) -> torch.Tensor:
    """``xa @ bank^T`` fp32 ``[b, rows]`` in the arithmetic of ``precision`` (the operands come
    prepared, ``gemm_operand``; tf32x3: ``tf32_parts``, ``xa = [x_hi | x_lo]`` and ``bank = [lo |
    hi]``: the two small products ``x_hi.lo + x_lo.hi`` in one product over 2K, then the big one
    ``x_hi.hi`` with them added once at its end, ``addmm``). CUDA: cuBLAS, bf16 with fp32
    accumulation and output (``out_dtype``), tf32 on its tensor cores (exact products of the
    rounded operands; the ``lo`` parts lose at most 2^-10 of themselves whether the tensor cores
    round or truncate them). Off CUDA (the interpreter, tests): an fp32 product of the operands as
    the tensor cores read them (tf32x3's ``lo`` parts truncated to tf32, the worse of the two),
    whose products are exact in fp32: the same mode, another summation order."""
    if precision == "tf32x3":
        k = xa.shape[1] // 2
        if xa.device.type != "cuda":
            xa, bank = (_truncate_tf32(a) for a in (xa, bank))
        with _tf32_matmul(xa.device):
            small = torch.mm(xa, bank.t())
            return torch.addmm(small, xa[:, :k], bank[:, k:].t())
    if xa.device.type == "cuda":
        if precision == "bf16":
            return torch.mm(xa, bank.t(), out_dtype=torch.float32)
        with _tf32_matmul(xa.device):
            return torch.mm(xa, bank.t())
    return torch.mm(xa.float(), bank.float().t())


@contextlib.contextmanager
def _tf32_matmul(device: torch.device):
    """Within: fp32 matrix products on CUDA run on the tf32 tensor cores (cuBLAS)."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _truncate_tf32(a: torch.Tensor) -> torch.Tensor:
    """A copy of fp32 ``a`` with the 13 low mantissa bits cleared: the operand as tensor cores that
    truncate read it (exact for values already in tf32)."""
    out = a.float().clone()
    out.view(torch.int32).bitwise_and_(~0x1FFF)
    return out


def mixture_lse_split(
    xa: torch.Tensor,
    xx: torch.Tensor,
    operands: GemmOperands,
    classes: int,
    steps: int,
    precision: str,
    config: SplitGemmConfig = SPLIT_CONFIG,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split GEMM form (``SplitGemmConfig``) of ``mixture_lse_gemm``: ``(out [B, C]`` float32,
    ``bad_c [C]`` int8 the classes with a non-finite bank row) from the prepared image operand
    ``xa [B, K]`` (tf32x3: ``tf32_parts(x, "x")``, with ``operands.split``) and its ``xx [B]``
    term. Images go in chunks of ``SPLIT_CHUNK_VALUES // (C*T)`` (``acc``'s memory)."""
    if precision not in SPLIT_PRECISIONS:
        raise ValueError(
            f"the split GEMM form runs {', '.join(SPLIT_PRECISIONS)}, got precision {precision!r}"
        )
    if precision == "tf32x3" and operands.split is None:
        raise ValueError(
            "operands: the split tf32x3 form needs operands.split (gemm_operands(..., split=True))"
        )
    product_bank = operands.split if precision == "tf32x3" else operands.bank
    b = xa.shape[0]
    rows = classes * steps
    out = torch.empty(b, classes, dtype=torch.float32, device=xa.device)
    bad_c = torch.empty(classes, dtype=torch.int8, device=xa.device)
    step = max(1, SPLIT_CHUNK_VALUES // max(rows, 1))
    block_t = triton.next_power_of_2(steps)
    block_c = max(1, min(config.BLOCK_C, SPLIT_MAX_BLOCK_T // block_t))
    for b0 in range(0, b, step):
        n = min(step, b - b0)
        acc = _split_product(xa[b0 : b0 + n], product_bank, precision)
        grid = (triton.cdiv(classes, block_c), triton.cdiv(n, config.IMAGES_PER_PROGRAM))
        _gemm_lse_kernel[grid](
            acc,
            xx[b0 : b0 + n],
            operands.mm,
            operands.scale,
            operands.log_norm,
            out[b0 : b0 + n],
            bad_c,
            n,
            classes,
            rows,
            config.IMAGES_PER_PROGRAM,
            T=steps,
            BLOCK_C=block_c,
            BLOCK_T=block_t,
            num_warps=config.num_warps,
        )
    return out, bad_c


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
        # the config per shape (kernels/tuning.py): what the tile choice depends on
        key = (
            precision,
            triton.next_power_of_2(x.shape[0]),
            mu.shape[0],
            mu.shape[1],
            x[0].numel(),
            is_diagonal(mu, sigma),
            x.dtype,
            # prepared operands or made per call: the split tf32x3 form makes its bank parts per
            # call from raw tensors (a pass over the bank), so the fastest form may differ
            operands is not None,
        )
        # Below GEMM_TUNE_MIN_BATCH images only the first config: at a 16-image tile the tf32
        # 128x64 and the tf32x3 256x32 configs spill at 255 registers (24-100 B, sm_80 / sm_90,
        # the compile gate), and such a batch is cheap whatever its tile.
        small = triton.next_power_of_2(x.shape[0]) < GEMM_TUNE_MIN_BATCH
        configs = GEMM_CONFIGS[:1] if small else list(GEMM_CONFIGS)
        if split_applies(mu, precision):
            configs.append(SPLIT_CONFIG)  # the split form competes (never the default)
        return tuning.tuned(
            "_mixture_gemm_kernel",
            configs,
            key,
            x.device,
            lambda cfg: mixture_lse_gemm(x, mu, sigma, precision, operands, config=cfg),
        )
    return mixture_lse_diff(x, mu, sigma, class_index)


def split_applies(mu: torch.Tensor, precision: str) -> bool:
    """True where ``mixture_lse``'s tuner times the split form for a shared bank ``mu``: a
    precision of ``SPLIT_PRECISIONS`` and T up to ``SPLIT_MAX_BLOCK_T`` (the epilogue's limit)."""
    return (
        precision in SPLIT_PRECISIONS and triton.next_power_of_2(mu.shape[1]) <= SPLIT_MAX_BLOCK_T
    )


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
    xx_ptr,
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
    BLOCK_C: tl.constexpr,
):
    """``out[b, c]`` again in the difference form where image b or class c is flagged. Program
    (b, j) owns image b and classes ``[j * BLOCK_C, (j + 1) * BLOCK_C)``: one vector load of their
    flags; only a program with a flag walks its classes (so a GEMM-form call with nothing to redo
    costs B * C / BLOCK_C programs of one load each, not B * C)."""
    b = tl.program_id(0).to(tl.int64)
    c0 = tl.program_id(1).to(tl.int64) * BLOCK_C
    offs = c0 + tl.arange(0, BLOCK_C)
    flags = tl.load(bad_c_ptr + offs, mask=offs < K, other=0).to(tl.int32)
    xx = tl.load(xx_ptr + b)
    image_bad = (xx != xx) | (tl.abs(xx) == float("inf"))
    if image_bad | (tl.max(flags, 0) != 0):
        for i in range(0, tl.minimum(BLOCK_C, K - c0)):
            c = c0 + i
            if image_bad | (tl.load(bad_c_ptr + c) != 0):
                m, l = row_lse(
                    x_ptr + b * stride_xb, mu_ptr + c * stride_mc, sig_ptr + c * stride_sc, 0, T,
                    D, stride_mt, stride_st, stride_sd, log_norm_const, DIAG, False, BLOCK_T,
                    BLOCK_D, D_STAGES,
                )  # fmt: skip
                tl.store(out_ptr + b * K + c + tl.arange(0, 1), m + tl.log(l))


def redo_nonfinite_pairs(
    out: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    xx: torch.Tensor,
    mm: torch.Tensor,
    bad_c: torch.Tensor | None = None,
) -> None:
    """Overwrite, in the GEMM kernel's result ``out [B, C]``, the pairs whose image or bank rows
    hold inf or NaN (or whose squared norm passes the float range) with the difference form's
    value: ``|x|^2 - 2 x.mu + |mu|^2`` is NaN there (inf - inf) where the difference form gives -inf
    (zero density) or NaN. No host sync: the flags stay on the device and one launch of
    B * ceil(C / REDO_BLOCK_C) programs redoes the flagged pairs only (shared bank, float32, as ``mixture_lse_gemm``).
    ``xx``: the images' squared norms ``[B]`` and ``mm``: the bank rows' ``[C*T]`` (the GEMM
    kernel's own), non-finite exactly where a row holds inf or NaN or passes the float range.
    The kernel flags an image from its ``xx``; ``bad_c``: the classes' flags ``[C]`` int8 where
    the caller has them (the split form's epilogue writes them), else made here from ``mm``."""
    b, c = out.shape
    if bad_c is None:
        bad_c = (~torch.isfinite(mm.reshape(c, -1)).all(-1)).to(torch.int8)
    lay = diff_layout(x, mu, sigma, None)

    def run(config):
        _mixture_diff_redo_kernel[(b, triton.cdiv(c, REDO_BLOCK_C))](
            lay.x,
            lay.mu,
            lay.sigma,
            xx,
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
            BLOCK_C=REDO_BLOCK_C,
            **diff_blocks(config, lay.num_steps, lay.dim),
        )

    # One config, untimed: the kernel writes into ``out`` (timing would rerun it) and does work
    # only where a pair is flagged, which timing could not anticipate.
    tuning.tuned("_mixture_diff_redo_kernel", REDO_CONFIGS, (), x.device, run)
