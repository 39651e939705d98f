"""Triton compile gate: every specialisation of every Triton kernel that the launchers of
``genrep_fast.kernels`` use, compiled for sm_80 (A100) and sm_90 (H100/H200) with Triton's own
compiler and ptxas, on a machine without a GPU.

How it works. ``_compile_only(arch)`` gives Triton a driver stub whose ``get_current_target()``
names ``sm_<arch>`` and turns every ``kernel[grid](...)`` into ``kernel.run(..., warmup=True)``:
compile, never launch. The launchers (``mixture_lse``, ``mixture_lse_backward``,
``posterior_forward``, ``posterior_kl_backward``) are then called as training calls them, with
tensors on the ``meta`` device: shapes and dtypes without memory, so the full-size shapes of the
configs (C = 1000 classes, T = 75 / 100 kept steps, D = 4096) cost nothing, and their data pointer
(0) is aligned as a CUDA allocation is. Triton specialises a kernel on its constexprs, argument
dtypes and on whether ints are 1 / divisible by 16; its JIT cache then compiles each distinct
specialisation once however many variants launch it.

The interpreter (TRITON_INTERPRET=1, how the tests run on CPU) checks none of this: a kernel that
changes a loop variable's shape, or spills registers at BLOCK sizes the tests never use, passes
every interpreter test. Hence this gate, run by ``tests/test_triton_compile.py``.

Fails on: any compile error (Triton front end, LLVM, ptxas), shared memory past the
architecture's per-block limit (``SHARED_MEMORY_LIMIT``: the launch would fail), more registers
per thread than a block of that many warps can hold (``register_ceiling``: 64 Ki per block; a
``maxnreg`` of 255 on a 16-warp launch compiles, then fails to launch), and any register
spill (ptxas ``-v``: spill stores or loads) of a kernel without float64 pointers, however small
(a config whose kernel ptxas would cap below its needs carries ``maxnreg``, see kernels/mixture.py).
Reported, not failed: spills of float64 kernels (``spill_kind``).
Without a device Triton's ``n_regs`` / ``n_spills`` stay unset (the driver fills them when it
loads the binary), so the numbers come from ptxas's own log. Writes
``triton-compile-report.json`` and ``.md`` into ``--out``.

Command (one worker process per architecture, in parallel; ``--jobs N``: N per architecture,
each compiling the specialisations whose key hashes to its share, ``merge_sections``)::

    python -m genrep_fast.compile_gate --arch 80 90 --out bench/results/

Each report records ``source_fingerprint()`` (the kernels' sources and ``VARIANTS``): the
committed reports (this machine's triton in bench/results/, triton 3.6 in
bench/results/triton-3.6/) are checked against it by tests/test_triton_compile.py, which compiles
only sm_90 itself.

``VARIANTS`` below is the one list of launches. A launcher that picks its config through
``kernels/tuning.py`` (``tuned``) launches every config of its list here, so each variant compiles
each config (``tuning.every_config``); a kernel under ``@triton.autotune`` is compiled at each of
its configs too. To check a config outside the lists, append a ``Variant`` whose ``config``
overrides launch keywords per kernel, e.g.
``replace(v, config={"_mixture_gemm_kernel": {"BLOCK_D": 64, "num_warps": 8, "num_stages": 3}})``.
Every entry of ``kernels/mixture.py``'s ``GEMM_CONFIGS`` also gets variants of its own
(``gemm_config``: launched through ``mixture_lse_gemm(..., config=...)`` at the ImageNet shapes,
every GEMM precision, isotropic and diagonal sigma), and the report's "GEMM configs" table lists,
per config, its registers, shared memory, spills, tensor-core instruction (``wgmma`` on sm_90) and
the modelled bytes / FLOPs at B = 256, C = 1000, T = 100, D = 4096 (``genrep_fast.roofline``).

Occupancy (reported, not failed): every kernel's blocks per SM and what limits them
(``genrep_fast.occupancy``, the rules that reproduce the block limits, occupancy and waves of the
H100's ncu profiles), and, for the GEMM configs and the per-image configs (``DIFF_CONFIGS`` at
the benchmark's B = 64, C = 10, T = 75, D = 4096), the waves their grid takes on the card.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path

import torch

from genrep_fast import occupancy

ROOT = Path(__file__).resolve().parents[1]
REPORT_NAME = "triton-compile-report"
DEFAULT_ARCHS = (80, 90)
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
}
PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")
GEMM_PRECISIONS = PRECISIONS[1:]  # the shared bank's GEMM-form kernel; "ieee" is the diff kernel
# (need x, need mu, need sigma): every combination autograd can ask for.
NEEDS = tuple(n for n in product((True, False), repeat=3) if any(n))
ALL_GRADS = (True, True, True)
MU_SIGMA_GRADS = (False, True, True)  # a shared bank's gradients alone: the bank kernel only
# Bank layouts: shared [C, T, D] or per-image [B, C, T, D], each without / with candidate classes
# (class_index [B, K]). Isotropic sigma [T], [C, T] or (per-image) [B, C, T]; or diagonal.
LAYOUTS = ("shared", "candidates", "per_image", "per_image_candidates")


@dataclass(frozen=True)
class Shape:
    """Sizes of a launch: B images, C bank classes, T kept steps, D latent values per image,
    K candidate classes per image."""

    name: str
    batch: int
    classes: int
    steps: int
    dim: int
    candidates: int


# The configs in configs/: LDM-8 (75 kept steps, isotropic sigma) and DiT-XL/2 (100 kept steps,
# learned diagonal sigma) on 4x32x32 ImageNet latents, 1000 classes, top-20 candidates, batch
# 32 per GPU; the embedded demo (8x8 digits, 10 classes, 16 chains x 20 kept steps, batch 64).
LDM8 = Shape("ldm8", batch=32, classes=1000, steps=75, dim=4096, candidates=20)
DIT_XL2 = Shape("dit-xl2", batch=32, classes=1000, steps=100, dim=4096, candidates=20)
DIGITS = Shape("digits", batch=64, classes=10, steps=320, dim=64, candidates=0)
# The tests' odd sizes (every tile masked, small BLOCKs), and a class count past one posterior
# tile (2048).
ODD = Shape("odd", batch=3, classes=5, steps=7, dim=37, candidates=2)
WIDE = Shape("wide", batch=4, classes=4099, steps=1, dim=1, candidates=0)


@dataclass(frozen=True)
class Variant:
    """One call of a launcher of ``genrep_fast.kernels`` (see ``launch``).

    ``op``: ``"mixture"`` (forward LSE), ``"mixture_backward"``, ``"posterior"`` (class
    posterior), ``"kl"`` (posterior + KL forward) or ``"kl_backward"``. Mixture ops use
    ``layout``, ``sigma`` (``"T"``, ``"CT"``, ``"BCT"``, ``"diagonal"``) in ``sigma_dtype``
    (default: ``dtype``), ``precision``, ``needs`` and ``index_dtype``; posterior ops read
    ``[B, C]`` log-likelihoods (``[B, K]`` with ``layout="candidates"``) with an optional
    ``prior`` (``"C"`` or ``"BC"``), logits in ``logits_dtype`` (default: ``dtype``) and, for
    ``kl_backward``, an incoming gradient of stride ``grad_stride`` (0: a mean's or sum's).
    ``gemm_config``: an index into ``kernels.mixture.GEMM_CONFIGS`` (op ``"mixture"``, a GEMM
    precision): the forward goes through ``mixture_lse_gemm(..., config=GEMM_CONFIGS[i])``.
    ``config``: per kernel name, launch keywords to override (BLOCK sizes, ``num_warps``, ...).
    """

    op: str
    shape: Shape
    dtype: str
    layout: str = "shared"
    sigma: str = "CT"
    sigma_dtype: str | None = None
    precision: str = "ieee"
    needs: tuple[bool, bool, bool] = ALL_GRADS
    index_dtype: str = "int64"
    prior: str = "none"
    logits_dtype: str | None = None
    grad_stride: int = 1
    gemm_config: int | None = None
    config: Mapping[str, Mapping[str, object]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        parts = [self.op, self.shape.name, self.dtype, self.layout]
        if self.op.startswith("mixture"):
            parts.append(f"sigma={self.sigma}")
            if self.sigma_dtype:
                parts.append(f"sigma_dtype={self.sigma_dtype}")
            if "candidates" in self.layout:
                parts.append(f"index={self.index_dtype}")
        if self.op == "mixture":
            parts.append(self.precision)
        if self.gemm_config is not None:
            parts.append(f"gemm_config={self.gemm_config}")
        if self.op == "mixture_backward":
            grads = ",".join(n for n, on in zip(("x", "mu", "sigma"), self.needs) if on)
            parts.append(f"d={grads}")
        if not self.op.startswith("mixture"):
            parts.append(f"prior={self.prior}")
            if self.logits_dtype:
                parts.append(f"logits={self.logits_dtype}")
        if self.op == "kl_backward":
            parts.append(f"grad_stride={self.grad_stride}")
        if self.config:
            parts.append(json.dumps(self.config, sort_keys=True, separators=(",", ":")))
        return "/".join(parts)


def _mixture(
    shape: Shape,
    dtype: str,
    layout: str,
    sigma: str,
    precisions: tuple[str, ...] = PRECISIONS,
    needs: tuple[tuple[bool, bool, bool], ...] = NEEDS,
    **kw,
) -> list[Variant]:
    """The forward at each of ``precisions`` and the backward for each of ``needs``."""
    common = dict(shape=shape, dtype=dtype, layout=layout, sigma=sigma, **kw)
    return [Variant("mixture", precision=p, **common) for p in precisions] + [
        Variant("mixture_backward", needs=n, **common) for n in needs
    ]


def _mixture_variants() -> list[Variant]:
    # Each distinct specialisation costs a compile (~0.5-1 s forward, ~2 s backward, ~10 s for a
    # spilling fp64 backward on this 2-core machine): the axes are covered, not crossed in full.
    out = []
    # fp32: every constexpr combination of every kernel, in each layout, at the configs' shapes
    # (isotropic [C, T] sigma at LDM-8's T = 75, diagonal at DiT-XL/2's T = 100); the backward's
    # gradient flags in every combination where they are kernel flags (shared bank: the bank
    # kernel's NEED_MU / NEED_SIG; per-image bank: the row kernel's NEED_X / WRITE_MU / WRITE_SIG).
    for layout in LAYOUTS:
        needs = NEEDS if layout in ("shared", "per_image") else (ALL_GRADS,)
        out += _mixture(LDM8, "fp32", layout, "CT", needs=needs)
        out += _mixture(DIT_XL2, "fp32", layout, "diagonal", needs=needs)
    # The GEMM kernel's other batch tiles: BLOCK_B = 16 (B <= 16) and 64 (B > 32).
    for batch in (8, 256):
        out += _mixture(replace(LDM8, name=f"ldm8-b{batch}", batch=batch), "fp32", "shared", "CT", GEMM_PRECISIONS, ())  # fmt: skip
        out += _mixture(replace(DIT_XL2, name=f"dit-xl2-b{batch}", batch=batch), "fp32", "shared", "diagonal", GEMM_PRECISIONS, ())  # fmt: skip
    # bf16 (the configs' bank_dtype; a chain bank, shared, keeps an isotropic sigma in fp32), fp16 and
    # fp64 (ACC_F64; may spill; a spilling kernel takes ptxas ~10 s): each kernel with each of its
    # flags on at least once. The GEMM kernel reads fp32 copies of x and the bank: fp32 covers it.
    for dtype in ("bf16", "fp16", "fp64"):
        for shape, sigma in ((LDM8, "CT"), (DIT_XL2, "diagonal")):
            if dtype == "fp16" and sigma == "diagonal":
                continue
            bank = dict(sigma_dtype="fp32") if dtype != "fp64" and sigma == "CT" else {}
            if dtype != "fp64":  # fp64's forward: below
                out += _mixture(shape, dtype, "shared", sigma, ("ieee",), (), **bank)
                out += _mixture(shape, dtype, "candidates", sigma, ("ieee",), (), **bank)
                out += _mixture(shape, dtype, "per_image", sigma, ("ieee",), ())
            out += _mixture(shape, dtype, "shared", sigma, (), (MU_SIGMA_GRADS,), **bank)
            out += _mixture(shape, dtype, "per_image_candidates", sigma, (), (ALL_GRADS,))
    out += _mixture(LDM8, "fp64", "shared", "CT", ("ieee",), ())
    out += _mixture(DIT_XL2, "fp64", "per_image_candidates", "diagonal", ("ieee",), ())
    # The other isotropic sigma shapes ([T]; per-image [B, C, T]) and int32 class indices.
    out += _mixture(LDM8, "fp32", "shared", "T", ("ieee", "tf32x3"), ())
    out += _mixture(LDM8, "fp32", "per_image_candidates", "BCT", ("ieee",), (ALL_GRADS,), index_dtype="int32")  # fmt: skip
    out += _mixture(LDM8, "fp32", "candidates", "CT", ("ieee",), (), index_dtype="int32")
    # The demo config, and the tests' odd sizes.
    out += _mixture(DIGITS, "fp32", "shared", "CT", needs=(ALL_GRADS,))
    out += _mixture(ODD, "fp32", "shared", "CT", needs=(ALL_GRADS,))
    out += _mixture(ODD, "fp32", "shared", "diagonal", GEMM_PRECISIONS, ())
    out += _mixture(ODD, "fp32", "per_image_candidates", "T", ("ieee",), (ALL_GRADS,))
    return out


def _posterior(shape: Shape, dtype: str, layout: str, prior: str, logits: str | None = None):
    """The class posterior, the KL forward and its backward (incoming gradient of stride 0,
    as a mean or sum hands it)."""
    common = dict(shape=shape, dtype=dtype, layout=layout, prior=prior, logits_dtype=logits)
    return [
        Variant("posterior", **common),
        Variant("kl", **common),
        Variant("kl_backward", grad_stride=0, **common),
    ]


def _posterior_variants() -> list[Variant]:
    out = []
    # fp32 over C = 1000 classes: every prior kind, and the per-image loss's gradient (stride 1).
    for prior in ("none", "C", "BC"):
        out += _posterior(LDM8, "fp32", "shared", prior)
        out.append(Variant("kl_backward", LDM8, "fp32", prior=prior, grad_stride=1))
    # The other dtypes; head logits in bf16 / fp16 (autocast) against fp32 log-likelihoods over
    # the K = 20 candidates (the training path) and over all classes.
    for dtype in ("fp64", "bf16", "fp16"):
        out += _posterior(LDM8, dtype, "shared", "BC")
    out += _posterior(LDM8, "fp32", "candidates", "none", logits="bf16")
    out += _posterior(LDM8, "fp32", "shared", "none", logits="fp16")
    # Other class counts: the demo (10), the tests' odd size, past one tile (4099 > 2048).
    for shape in (DIGITS, ODD, WIDE):
        out += _posterior(shape, "fp32", "shared", "none")
    return out


# The shape at which the GEMM configs are compiled and their bytes / FLOPs modelled: the issue's
# ImageNet case (a batch of 256: every config's own BLOCK_B).
GEMM_CONFIG_SHAPE = Shape("gemm-b256", batch=256, classes=1000, steps=100, dim=4096, candidates=0)


def _gemm_config_variants() -> list[Variant]:
    """Every entry of ``GEMM_CONFIGS`` at every GEMM precision, isotropic sigma at T = 75
    (LDM-8's, classes straddle the N tiles) and diagonal at T = 100, fp32 inputs; bf16 inputs
    (the configs' bank dtype) at the bf16 precision."""
    from genrep_fast.kernels.mixture import GEMM_CONFIGS

    iso = replace(GEMM_CONFIG_SHAPE, name="gemm-b256-t75", steps=75)
    out = []
    for i in range(len(GEMM_CONFIGS)):
        for p in GEMM_PRECISIONS:
            out.append(Variant("mixture", iso, "fp32", sigma="CT", precision=p, gemm_config=i))
            out.append(Variant("mixture", GEMM_CONFIG_SHAPE, "fp32", sigma="diagonal", precision=p, gemm_config=i))  # fmt: skip
        out.append(Variant("mixture", iso, "bf16", sigma="CT", sigma_dtype="fp32", precision="bf16", gemm_config=i))  # fmt: skip
    return out


# The launches the gate compiles. Append here (a new layout, a tuning config): the test fails
# when a kernel of genrep_fast.kernels is launched by no variant.
VARIANTS: list[Variant] = _mixture_variants() + _gemm_config_variants() + _posterior_variants()


# ------------------------------------------------------------------------------------------------
# Launching a variant (meta tensors: no memory, no data)
# ------------------------------------------------------------------------------------------------


def _meta(*shape: int, dtype: str) -> torch.Tensor:
    return torch.empty(shape, dtype=DTYPES[dtype], device="meta")


def launch(v: Variant) -> None:
    """Call the launcher of ``v`` once (with ``_compile_only`` active: compile its kernels)."""
    from genrep_fast.kernels import mixture, mixture_backward, posterior_loss

    s = v.shape
    b, c, t, d, k = s.batch, s.classes, s.steps, s.dim, s.candidates
    if v.op.startswith("mixture"):
        per_image = v.layout.startswith("per_image")
        bank = (b, c, t) if per_image else (c, t)
        x = _meta(b, d, dtype=v.dtype)
        mu = _meta(*bank, d, dtype=v.dtype)
        sigma_shape = {"T": (t,), "CT": (c, t), "BCT": (b, c, t), "diagonal": (*bank, d)}[v.sigma]
        sigma = _meta(*sigma_shape, dtype=v.sigma_dtype or v.dtype)
        index = _meta(b, k, dtype=v.index_dtype) if "candidates" in v.layout else None
        if v.op == "mixture" and v.gemm_config is not None:
            cfg = mixture.GEMM_CONFIGS[v.gemm_config]
            mixture.mixture_lse_gemm(x, mu, sigma, v.precision, config=cfg)
        elif v.op == "mixture":
            mixture.mixture_lse(x, mu, sigma, index, precision=v.precision)
        else:
            out_dtype = "fp64" if v.dtype == "fp64" else "fp32"
            grad = _meta(b, k if index is not None else c, dtype=out_dtype)
            mixture_backward.mixture_lse_backward(grad, x, mu, sigma, index, v.needs)
        return
    cols = k if v.layout == "candidates" else c
    ll = _meta(b, cols, dtype=v.dtype)
    prior = {"none": None, "C": _meta(cols, dtype=v.dtype), "BC": _meta(b, cols, dtype=v.dtype)}
    logits = _meta(b, cols, dtype=v.logits_dtype or v.dtype)
    if v.op == "posterior":
        posterior_loss.posterior_forward(ll, prior[v.prior], None, store_posterior=True)
    elif v.op == "kl":
        posterior_loss.posterior_forward(ll, prior[v.prior], logits, store_posterior=False)
    elif v.op == "kl_backward":
        acc = "fp64" if v.dtype == "fp64" else "fp32"  # the dtype of the KL and its statistics
        stats = _meta(b, 4, dtype=acc)
        grad = _meta(1, dtype=acc).expand(b) if v.grad_stride == 0 else _meta(b, dtype=acc)
        posterior_loss.posterior_kl_backward(grad, ll, prior[v.prior], logits, stats)
    else:
        raise ValueError(f"unknown op {v.op!r} of variant {v.name}")


# ------------------------------------------------------------------------------------------------
# Compiling without a device
# ------------------------------------------------------------------------------------------------

_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
# A global load (``ld.global[.qualifiers][.v2|.v4].type``); the group holds its qualifiers.
_PTX_GLOBAL_LOAD = re.compile(r"\bld\.global((?:\.[\w:]+)*)")
# Operand rounding onto tf32: tf32x3's cvt.rna, or the bit trick of kernels/mixture.py's
# _round_tf32 (add half a tf32 ulp, clear the 13 low bits: `and.b32 ..., -8192`).
_PTX_TF32_ROUND = re.compile(
    r"cvt\.rna\.tf32\.f32|and\.b32\s[^;]*,\s*(?:-8192|0[xX][fF]{4}[eE]000);"
)


def parse_ptxas_log(log: str) -> dict[str, int] | None:
    """``{registers, stack_frame, spill_stores, spill_loads}`` (a count, then bytes) from the
    ``ptxas -v`` log of one kernel; None where the log has no resource line."""
    regs = [int(r) for r in _PTXAS_REGISTERS.findall(log)]
    frames = [tuple(map(int, f)) for f in _PTXAS_FRAME.findall(log)]
    if not regs or not frames:
        return None
    return {
        "registers": max(regs),
        "stack_frame": max(f[0] for f in frames),
        "spill_stores": sum(f[1] for f in frames),
        "spill_loads": sum(f[2] for f in frames),
    }


def ptx_summary(ptx: str) -> dict[str, object]:
    """Which tensor-core instruction the PTX uses (``"wgmma"``, ``"mma"`` or ``""``), how many
    tf32 operand roundings it has, and its global loads: ``global_loads``, of which
    ``vector_loads`` (``ld.global.v2`` / ``.v4``)."""
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else ""
    loads = _PTX_GLOBAL_LOAD.findall(ptx)
    return {
        "mma": mma,
        "tf32_rounds": len(_PTX_TF32_ROUND.findall(ptx)),
        "global_loads": len(loads),
        "vector_loads": sum(1 for q in loads if re.search(r"\.v[248]\b", q)),
    }


class _TargetStub:
    """All that Triton asks of its driver to compile, not launch, for ``target``."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


def _short(value: object) -> object:
    return int(value) if isinstance(value, bool) else value


class _Recorder:
    """Compiles each launch of the current variant and records the compiled kernels (one entry
    per distinct binary, with the variants that launch it) and the compile errors."""

    def __init__(self, arch: int, dry_run: bool = False, shard: tuple[int, int] = (0, 1)):
        self.arch = arch
        self.dry_run = dry_run
        self.shard = shard
        self.kernels: dict[str, dict] = {}
        self.failures: list[dict] = []
        self.launches = 0
        self.variant: Variant | None = None

    def launch(self, fn, grid, args, kwargs) -> None:
        name = fn.fn.__name__
        self.launches += 1
        kwargs = {**kwargs, **self.variant.config.get(name, {})}
        params = [p.name for p in fn.params]
        bound = dict(zip(params, args)) | {k: v for k, v in kwargs.items() if k in params}
        constexprs = {p.name: _short(bound[p.name]) for p in fn.params if p.is_constexpr}
        pointers = {
            n: _dtype_name(a.dtype) for n, a in bound.items() if isinstance(a, torch.Tensor)
        }
        index, count = self.shard
        if self.dry_run or count > 1:
            # Triton's own specialisation of the launch, as its JIT cache keys it.
            _, specialization, options = fn.device_caches[0][4](*args, **kwargs)
            key = f"{name}{specialization}{options}"
            if zlib.crc32(key.encode()) % count != index:
                return  # another worker's specialisation (see ``merge_sections``)
        if self.dry_run:
            entry = self.kernels.setdefault(
                key, {"kernel": name, "constexprs": constexprs, "pointers": pointers}
            )
            entry.setdefault("variants", []).append(self.variant.name)
            return
        log = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):
                compiled = fn.run(*args, grid=grid, warmup=True, **kwargs)
        except Exception as err:  # noqa: BLE001 - every compile error is a finding
            self.failed(name, constexprs, pointers, _error_text(err))
            return
        entry = self.kernels.get(compiled.hash)
        if entry is None:
            entry = self._entry(name, fn, compiled, constexprs, pointers, log.getvalue())
            entry["compile_s"] = round(time.perf_counter() - start, 2)
            entry["hash"] = compiled.hash
            self.kernels[compiled.hash] = entry
        entry["variants"].append(self.variant.name)

    def launch_configs(self, tuner, grid, args, kwargs) -> None:
        """An ``@triton.autotune`` kernel: compile it at each of its configs."""
        from triton.runtime.jit import JITFunction

        if not isinstance(tuner.fn, JITFunction):
            text = f"autotuned {type(tuner.fn).__name__}: the gate compiles only a JITFunction"
            self.failed(str(tuner.fn), {}, {}, text)
            return
        for cfg in tuner.configs:
            self.launch(tuner.fn, grid, args, {**kwargs, **cfg.all_kwargs()})

    def failed(self, name, constexprs, pointers, text: str) -> None:
        summary = ([line for line in text.splitlines() if line.strip()] or ["?"])[-1][:400]
        self.failures.append(
            {
                "kernel": name,
                "constexprs": constexprs,
                "pointers": pointers,
                "variant": self.variant.name,
                "summary": summary,
                "error": text[-4000:],
            }
        )

    def _entry(self, name, fn, compiled, constexprs, pointers, log) -> dict:
        meta = compiled.metadata
        resources = parse_ptxas_log(log)
        entry = {
            "kernel": name,
            "module": fn.module,
            "arch": self.arch,
            "constexprs": constexprs,
            "pointers": pointers,
            "fp64": "fp64" in pointers.values(),
            "num_warps": meta.num_warps,
            "num_stages": meta.num_stages,
            "shared": meta.shared,
            **(
                resources
                or dict.fromkeys(("registers", "stack_frame", "spill_stores", "spill_loads"))
            ),
            **ptx_summary(compiled.asm["ptx"]),
            "variants": [],
        }
        if resources is None:
            self.failed(name, constexprs, pointers, f"{log}\nno ptxas -v resource line")
        return entry


def _error_text(err: Exception) -> str:
    return f"{type(err).__name__}: {err}".strip()


def _dtype_name(dtype: torch.dtype) -> str:
    return next((n for n, dt in DTYPES.items() if dt == dtype), str(dtype).removeprefix("torch."))


@contextlib.contextmanager
def _compile_only(arch: int, recorder: _Recorder):
    """Within: Triton targets ``sm_<arch>`` with no device present, and ``kernel[grid](...)``
    hands the launch to ``recorder`` (compile only)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError(
            "the compile gate needs Triton's compiler: unset TRITON_INTERPRET (kernels decorated "
            "under the interpreter never reach it)"
        )
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import autotuner, jit
    from triton.runtime.driver import driver

    from genrep_fast.kernels import tuning

    saved_driver = driver._active
    saved_log, saved_always = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    driver.set_active(_TargetStub(GPUTarget("cuda", arch, 32)))
    # `kernel[grid]` is KernelInterface.__getitem__; these class attributes shadow it.
    jit.JITFunction.__getitem__ = lambda fn, grid: lambda *a, **kw: recorder.launch(fn, grid, a, kw)
    autotuner.Autotuner.__getitem__ = lambda tuner, grid: (
        lambda *a, **kw: recorder.launch_configs(tuner, grid, a, kw)
    )
    # Triton prints ptxas -v's log (registers, spills) only with this knob, and a binary from
    # the on-disk cache comes without one: compile every distinct specialisation afresh.
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    try:
        # A launcher under kernels/tuning.py launches every config of its list: each compiles.
        with tuning.every_config():
            yield recorder
    finally:
        del jit.JITFunction.__getitem__, autotuner.Autotuner.__getitem__
        driver._active = saved_driver
        knobs.nvidia.dump_ptxas_log = saved_log
        knobs.compilation.always_compile = saved_always


def _ptxas_version(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        text = get_ptxas_version(arch)
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        return f"unknown ({type(err).__name__})"
    match = re.search(r"release [^\n]*", text)
    return match[0] if match else text.strip().splitlines()[-1]


def compile_variants(
    arch: int, variants: list[Variant], dry_run: bool = False, shard: tuple[int, int] = (0, 1)
) -> dict:
    """Compile every launch of ``variants`` for ``sm_<arch>`` in this process; the result
    section of one architecture (see ``write_report``). ``dry_run``: only count the distinct
    specialisations (Triton's JIT cache keys), compile nothing. ``shard=(i, n)``: every variant
    is launched, but only the specialisations whose key hashes to ``i`` of ``n`` are compiled
    (``n`` workers share an architecture; ``merge_sections`` joins their sections)."""
    import triton

    start = time.perf_counter()
    recorder = _Recorder(arch, dry_run, shard)
    with _compile_only(arch, recorder):
        for v in variants:
            recorder.variant = v
            try:
                launch(v)
            except Exception as err:  # noqa: BLE001 - a launcher that fails is a finding too
                recorder.failed("(launcher)", {}, {}, _error_text(err))
    return {
        "arch": arch,
        "triton": triton.__version__,
        "ptxas": _ptxas_version(arch),
        "variants": len(variants),
        "launches": recorder.launches,
        "kernels": sorted(
            recorder.kernels.values(), key=lambda e: (e["kernel"], _constexpr_text(e))
        ),
        "failures": recorder.failures,
        "wall_s": round(time.perf_counter() - start, 1),
    }


def merge_sections(parts: list[dict]) -> dict:
    """One architecture's section from its workers' (``compile_variants(..., shard=(i, n))``):
    the kernels of all (one entry per binary, its variants joined), each compile error once.
    Every worker launches every variant, so ``variants`` and ``launches`` are any worker's and a
    launcher's own error appears in each; the wall time is the slowest worker's."""
    if len(parts) == 1:
        return parts[0]
    kernels: dict[str, dict] = {}
    for part in parts:
        for e in part["kernels"]:
            if e["hash"] in kernels:
                kernels[e["hash"]]["variants"] += e["variants"]
            else:
                kernels[e["hash"]] = dict(e, variants=list(e["variants"]))
    failures, seen = [], set()
    for part in parts:
        for f in part["failures"]:
            key = json.dumps([f["kernel"], f["constexprs"], f["variant"], f["summary"]])
            if key not in seen:
                seen.add(key)
                failures.append(f)
    first = parts[0]
    return {
        **{k: first[k] for k in ("arch", "triton", "ptxas", "variants", "launches")},
        "kernels": sorted(kernels.values(), key=lambda e: (e["kernel"], _constexpr_text(e))),
        "failures": failures,
        "wall_s": max(p["wall_s"] for p in parts),
        "workers": len(parts),
    }


# ------------------------------------------------------------------------------------------------
# Verdict and report
# ------------------------------------------------------------------------------------------------


# Shared memory one block may use (bytes, the opt-in maximum): sm_80 (A100) 163 KiB, sm_90
# (H100/H200) 227 KiB. Past it the launch fails with OutOfResources: a compile-time finding.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def shared_memory_too_large(entry: dict) -> bool:
    limit = SHARED_MEMORY_LIMIT.get(entry["arch"])
    return limit is not None and (entry["shared"] or 0) > limit


def spills(entry: dict) -> bool:
    return bool(entry["spill_stores"] or entry["spill_loads"])


def register_ceiling(num_warps: int) -> int:
    """The most registers a thread can have: 255, less when one block's warps fill the register
    file (``occupancy.register_ceiling``, the rule the occupancy column uses)."""
    return occupancy.register_ceiling(num_warps)


def registers_too_many(entry: dict) -> bool:
    """More registers per thread than ``register_ceiling`` allows for the kernel's warps: ptxas
    keeps under it unless ``maxnreg`` lifts the cap, and then the launch fails (OutOfResources)."""
    return (entry["registers"] or 0) > register_ceiling(entry["num_warps"])


def spill_kind(entry: dict) -> str:
    """``""`` (no spill), ``"fp64"`` (allowed: a kernel with float64 pointers) or ``"FAIL"``: any
    spill of a kernel without float64 pointers."""
    if not spills(entry):
        return ""
    return "fp64" if entry["fp64"] else "FAIL"


def verdict(report: dict) -> list[str]:
    """The reasons the gate fails (empty: it passes): compile errors, shared memory or registers
    past what one block may have, and failing spills (``spill_kind``)."""
    problems = []
    for arch in report["archs"].values():
        sm = f"sm_{arch['arch']}"
        if "error" in arch:
            problems.append(f"{sm}: worker failed: {arch['error'][-2000:]}")
            continue
        for f in arch["failures"]:
            problems.append(f"{sm}: {f['kernel']} {_constexpr_text(f)}: {f['summary']}")
        for e in arch["kernels"]:
            if shared_memory_too_large(e):
                problems.append(
                    f"{sm}: {e['kernel']} {_constexpr_text(e)} needs {e['shared']} B of shared "
                    f"memory (limit {SHARED_MEMORY_LIMIT[arch['arch']]} B)"
                )
            if registers_too_many(e):
                problems.append(
                    f"{sm}: {e['kernel']} {_constexpr_text(e)} needs {e['registers']} registers "
                    f"per thread at {e['num_warps']} warps (limit "
                    f"{register_ceiling(e['num_warps'])}: 64 Ki per block)"
                )
            if spill_kind(e) == "FAIL":
                problems.append(
                    f"{sm}: {e['kernel']} {_constexpr_text(e)} spills "
                    f"({e['spill_stores']} B stores, {e['spill_loads']} B loads, "
                    f"{e['registers']} registers)"
                )
    return problems


def _constexpr_text(entry: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in entry["constexprs"].items())


def _dtypes_text(entry: dict) -> str:
    return ",".join(sorted(set(entry["pointers"].values())))


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    except OSError:
        return "unknown"
    if head.returncode:
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def entry_occupancy(entry: dict) -> occupancy.Occupancy:
    """``occupancy.occupancy`` of a compiled kernel of the report."""
    return occupancy.occupancy(
        entry["arch"], entry["num_warps"], entry["registers"] or 0, entry["shared"] or 0
    )


_LIMITER = {"registers": "regs", "shared": "smem", "warps": "warps", "blocks": "max"}


def _blocks_text(entry: dict) -> str:
    if entry.get("arch") not in occupancy.SM_LIMITS or entry["registers"] is None:
        return "?"
    occ = entry_occupancy(entry)
    return f"{occ.blocks} {_LIMITER[occ.limiter]}"


def markdown(report: dict) -> str:
    """The report as a markdown page: conditions, a summary per architecture, then one row per
    compiled kernel."""
    archs = list(report["archs"].values())
    lines = [
        "# Triton compile report",
        "",
        "Every specialisation of every Triton kernel that the launchers of `genrep_fast.kernels` "
        "use, compiled without a GPU by Triton's compiler and ptxas (`genrep_fast/compile_gate.py`"
        "). Registers, spills and stack frame from `ptxas -v`; shared memory from Triton's "
        "metadata; `mma` the tensor-core instruction in the PTX; `tf32 rnd` the tf32 operand "
        "roundings in the PTX; `blocks/SM`: blocks resident on one SM and what limits them "
        "(`genrep_fast.occupancy`: regs, smem, warps; the rules ncu's profiles confirm); "
        "`ld vec/all` the PTX's vector global loads / all its global loads; "
        "`spill`: `FAIL` (any spill without float64), allowed: `fp64`; "
        "`variants`: how many launch the kernel, and the first "
        "(rows that look alike differ in the ints Triton specialises on: strides, sizes "
        "divisible by 16).",
        "",
        f"- command: `{report['command']}`",
        f"- commit: {report['commit']}",
        f"- source fingerprint: {report.get('fingerprint', '-')} (`compile_gate.source_fingerprint`)",
        f"- triton {report['triton']}, torch {report['torch']}, python {report['python']}",
        "- ptxas: " + ", ".join(f"sm_{a['arch']} {a.get('ptxas', '?')}" for a in archs),
        f"- machine: {report['machine']}",
        f"- wall time: {report['wall_s']} s ({report.get('workers_per_arch', 1)} worker "
        "process(es) per architecture, all in parallel)",
        f"- verdict: {'pass' if report['ok'] else 'FAIL'}",
        "",
        "| arch | variants | launches | kernels compiled | compile errors | spilling kernels "
        "(failing) | spilling kernels (fp64, allowed) | max registers | worker s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for a in archs:
        if "error" in a:
            lines.append(f"| sm_{a['arch']} | worker failed | | | | | | | |")
            continue
        ks = a["kernels"]
        lines.append(
            f"| sm_{a['arch']} | {a['variants']} | {a['launches']} | {len(ks)} | "
            f"{len(a['failures'])} | {sum(spill_kind(e) == 'FAIL' for e in ks)} | "
            f"{sum(spill_kind(e) == 'fp64' for e in ks)} | "
            f"{max((e['registers'] or 0 for e in ks), default=0)} | {a['wall_s']} |"
        )
    for a in archs:
        if "error" in a:
            continue
        lines += [
            "",
            f"## sm_{a['arch']}",
            "",
            "| kernel | constexprs | dtypes | warps | stages | regs | spill st/ld B | stack B "
            "| smem B | blocks/SM | mma | tf32 rnd | ld vec/all | spill | variants |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for e in a["kernels"]:
            lines.append(
                f"| {e['kernel']} | {_constexpr_text(e)} | {_dtypes_text(e)} | {e['num_warps']} | "
                f"{e['num_stages']} | {e['registers']} | {e['spill_stores']}/{e['spill_loads']} | "
                f"{e['stack_frame']} | {e['shared']} | {_blocks_text(e)} | {e['mma'] or '-'} | "
                f"{e['tf32_rounds']} | "
                f"{e.get('vector_loads', '?')}/{e.get('global_loads', '?')} | "
                f"{spill_kind(e) or '-'} | {len(e['variants'])}: {e['variants'][0]} |"
            )
        gemm_rows = _gemm_config_rows(a)
        if gemm_rows:
            lines += [
                "",
                f"### GEMM configs on sm_{a['arch']}",
                "",
                "`GEMM_CONFIGS` of `kernels/mixture.py` (index, tile BLOCK_B x BLOCK_N x BLOCK_D),"
                " fp32 inputs, compiled at B = 256, C = 1000, D = 4096; the model "
                "(`compile_gate.gemm_config_model`) at B = 256, C = 1000, T = 100, D = 4096 on a "
                "132-SM H100: classes per program, programs, DRAM GB and TFLOP (useful; "
                "`genrep_fast.roofline`, a prepared bank), MMA work launched / useful, L2 -> SM GB "
                "of the tiles, and the roofline bound at 3.0 TB/s and the nominal peaks.",
                "",
                "| cfg | precision | sigma | tile | warps | stages | regs | smem B | spill st/ld B "
                "| mma | blocks/SM | classes/prog | programs | waves | DRAM GB | TFLOP "
                "| launched/useful | L2 GB | bound us |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
                *gemm_rows,
            ]
        diff_rows = diff_config_rows(a) if a["arch"] in occupancy.SM_LIMITS else []
        if diff_rows:
            sms = occupancy.SM_LIMITS[a["arch"]].sms
            lines += [
                "",
                f"### Per-image configs on sm_{a['arch']}",
                "",
                "`DIFF_CONFIGS` of `kernels/mixture.py` for a per-image bank (isotropic sigma) at "
                f"B = {PER_IMAGE_SHAPE.batch}, C = {PER_IMAGE_SHAPE.classes}, "
                f"T = {PER_IMAGE_SHAPE.steps}, D = {PER_IMAGE_SHAPE.dim} (the benchmark's case): "
                "tile BLOCK_T x BLOCK_D, D pipeline stages, T tiles per program (0: all T), "
                f"programs (B x C x spans of steps), waves on {sms} SMs (how full the machine is "
                "over them), and the DRAM floor at 3.0 TB/s. A memory-bound kernel needs enough "
                "blocks per SM to keep loads in flight and whole waves.",
                "",
                "| cfg | dtype | tile | D stages | T tiles | warps | regs | smem B | blocks/SM "
                "| programs | waves | floor us |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
                *diff_rows,
            ]
        if a["failures"]:
            lines += [
                "",
                f"### Compile errors on sm_{a['arch']}",
                "",
                "| kernel | constexprs | dtypes | error | first variant |",
                "|---|---|---|---|---|",
            ]
            seen = set()
            for f in a["failures"]:
                key = (f["kernel"], _constexpr_text(f), _dtypes_text(f), f["summary"])
                if key not in seen:
                    seen.add(key)
                    summary = f["summary"].replace("|", "\\|")
                    lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {summary} | {f['variant']} |")
    return "\n".join(lines) + "\n"


def gemm_config_model(
    index: int, precision: str, diagonal: bool, arch: int = 90, shape: Shape | None = None
) -> dict:
    """Modelled cost of ``GEMM_CONFIGS[index]`` on ``sm_<arch>`` at ``shape`` (default
    ``GEMM_CONFIG_SHAPE``):
    the launch the launcher makes (BLOCK_B, classes per program, grid on a 132-SM H100), DRAM
    bytes and useful FLOPs (``roofline.shared_bank_gemm``, a prepared bank; diagonal: two bank
    operands and two image operands, twice the FLOPs), the MMA work launched over the useful
    (masked rows of each program's last tile, images past B), the L2 -> SM bytes of the tiles
    (x re-read for every N tile, the bank for every image block) and the roofline bound at the
    nominal H100 peaks and 3.0 TB/s (``roofline.NOMINAL_GPU_PEAKS``)."""
    import triton

    from genrep_fast import roofline
    from genrep_fast.kernels import mixture

    sh = shape or GEMM_CONFIG_SHAPE
    cfg = mixture.GEMM_CONFIGS[index]
    b, c, t, d = sh.batch, sh.classes, sh.steps, sh.dim
    size = mixture.GEMM_OPERAND_DTYPES[precision].itemsize
    max_block_b, _ = mixture.gemm_tile(cfg, precision, arch)
    block_b = max(mixture.GEMM_MIN_BLOCK, min(max_block_b, triton.next_power_of_2(b)))
    batch_blocks = triton.cdiv(b, block_b)
    k = mixture.gemm_classes_per_program(c, t, cfg.BLOCK_N, batch_blocks, mixture.DEFAULT_SM_COUNT)
    groups = triton.cdiv(c, k)
    rows_launched = 0
    for g in range(groups):
        rows_launched += triton.cdiv(min(k, c - g * k) * t, cfg.BLOCK_N) * cfg.BLOCK_N
    n_tiles = rows_launched // cfg.BLOCK_N
    operands = 2 if diagonal else 1
    cost = roofline.shared_bank_gemm(
        b, c, t, d, precision=precision, s_bank=size, s_x=size, prepared=True
    )
    dram = cost.bytes + (operands - 1) * (b * d + c * t * d) * size
    flops = cost.flops * operands
    roofs = roofline.Roofs("H100 nominal", 3.0e12, dict(roofline.NOMINAL_GPU_PEAKS))
    bnd = roofline.bound(roofline.Cost(dram, flops, precision), roofs)
    l2 = operands * size * d * (batch_blocks * n_tiles * block_b + batch_blocks * rows_launched)
    return {
        "block_b": block_b,
        "classes_per_program": k,
        "programs": batch_blocks * groups,
        "dram_bytes": dram,
        "flops": flops,
        "launched_over_useful": (batch_blocks * block_b * rows_launched) / (b * c * t),
        "l2_bytes": l2,
        "bound_us": bnd.seconds * 1e6,
        "bound_kind": bnd.kind,
    }


# The per-image bank's benchmark case (bench/bench_posterior.py's PER_IMAGE_GPU, the issue's
# per-image target): 64 images, each with its own bank of 10 classes x 75 steps, D = 4096. The
# kernels are LDM-8's per-image variants (same T and D, so the same tiles); only the grid differs.
PER_IMAGE_SHAPE = Shape("per-image-b64", batch=64, classes=10, steps=75, dim=4096, candidates=0)


def diff_config_rows(arch: dict) -> list[str]:
    """One row per (``DIFF_CONFIGS`` entry, fp32 / bf16) of ``arch``'s section: the compiled
    per-image kernel, its blocks per SM and its grid at ``PER_IMAGE_SHAPE`` (B x C x spans
    programs), and the DRAM floor at 3.0 TB/s (``roofline.per_image_bank``)."""
    from genrep_fast import roofline
    from genrep_fast.kernels.mixture import DIFF_CONFIGS, diff_blocks, diff_spans

    sh = PER_IMAGE_SHAPE
    rows = []
    for dtype, size in (("fp32", 4), ("bf16", 2)):
        variant = f"mixture/ldm8/{dtype}/per_image/sigma=CT/ieee"
        cost = roofline.per_image_bank(
            sh.batch, sh.classes, sh.steps, sh.dim, s_bank=size, s_x=size
        )
        floor_us = cost.bytes / 3.0e12 * 1e6
        for i, cfg in enumerate(DIFF_CONFIGS):
            blocks = {"T_TILES": 0} | diff_blocks(cfg, sh.steps, sh.dim)
            e = next(
                (
                    e
                    for e in arch["kernels"]
                    if e["kernel"] == "_mixture_diff_kernel"
                    and variant in e["variants"]
                    and e["num_warps"] == blocks["num_warps"]
                    and e["num_stages"] == blocks["num_stages"]
                    and all(e["constexprs"].get(k, v) == v for k, v in blocks.items())
                ),
                None,
            )
            programs = sh.batch * sh.classes * diff_spans(blocks, sh.steps)
            tile = f"{blocks['BLOCK_T']}x{blocks['BLOCK_D']}"
            head = (
                f"| {i} | {dtype} | {tile} | {blocks['D_STAGES']} | {blocks['T_TILES']} | "
                f"{blocks['num_warps']} |"
            )
            if e is None:
                rows.append(f"{head} not compiled | | | {programs} | | {floor_us:.0f} |")
                continue
            rows.append(
                f"{head} {e['registers']} | {e['shared']} | {_blocks_text(e)} | {programs} | "
                f"{_waves_text(e, programs)} | {floor_us:.0f} |"
            )
    return rows


def _waves_text(entry: dict, programs: int) -> str:
    """Waves of ``programs`` blocks of a compiled kernel on the card of its arch, and how full the
    machine is over them (``occupancy.tail_fill``)."""
    occ = entry_occupancy(entry)
    if occ.blocks < 1:
        return "does not fit"
    w = occupancy.waves(entry["arch"], programs, occ.blocks)
    return f"{w:.2f} ({occupancy.tail_fill(w):.0%})"


def _gemm_config_rows(arch: dict) -> list[str]:
    """One row per (GEMM config, precision, sigma) of ``arch``'s section: the compiled kernel's
    resources and ``gemm_config_model``."""
    from genrep_fast.kernels.mixture import GEMM_CONFIGS, gemm_tile

    by_variant = {n: e for e in arch["kernels"] for n in e["variants"]}
    rows = []
    for v in VARIANTS:
        if v.gemm_config is None or v.dtype != "fp32":
            continue
        e = by_variant.get(v.name)
        cfg = GEMM_CONFIGS[v.gemm_config]
        diagonal = v.sigma == "diagonal"
        mdl = gemm_config_model(v.gemm_config, v.precision, diagonal, arch["arch"])
        block_b, block_d = gemm_tile(cfg, v.precision, arch["arch"])
        tile = f"{block_b}x{cfg.BLOCK_N}x{block_d}"
        res = (
            "| compile error | | | | | |"
            if e is None
            else (
                f"| {e['registers']} | {e['shared']} | {e['spill_stores']}/{e['spill_loads']} "
                f"| {e['mma'] or '-'} | {_blocks_text(e)} |"
            )
        )
        waves = "?" if e is None else _waves_text(e, mdl["programs"])
        rows.append(
            f"| {v.gemm_config} | {v.precision} | {'diagonal' if diagonal else 'isotropic'} "
            f"(T={v.shape.steps}) | {tile} | {cfg.num_warps} | {cfg.num_stages} {res} "
            f"{mdl['classes_per_program']} | {mdl['programs']} | {waves} | "
            f"{mdl['dram_bytes'] / 1e9:.2f} | "
            f"{mdl['flops'] / 1e12:.2f} | {mdl['launched_over_useful']:.3f} | "
            f"{mdl['l2_bytes'] / 1e9:.1f} | {mdl['bound_us']:.0f} {mdl['bound_kind']} |"
        )
    return rows


def write_report(report: dict, out: Path) -> tuple[Path, Path]:
    """``out/triton-compile-report.json`` and ``.md``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{REPORT_NAME}.json", out / f"{REPORT_NAME}.md"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


def select(only: str | None) -> list[Variant]:
    """``VARIANTS`` whose name contains ``only`` (all with None)."""
    return [v for v in VARIANTS if only is None or only in v.name]


def _run_workers(
    archs: list[int], only: str | None, dry_run: bool, jobs: int = 1
) -> dict[str, dict]:
    """``jobs`` worker processes per architecture, all in parallel (TRITON_INTERPRET unset, a
    fresh Triton cache each), each compiling its share of the specialisations; their sections
    merged by architecture."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    sections = {}
    with tempfile.TemporaryDirectory(prefix="genrep-compile-gate-") as tmp:
        procs = []
        for arch in archs:
            for i in range(jobs):
                path = Path(tmp) / f"sm_{arch}_{i}.json"
                cmd = [sys.executable, "-m", "genrep_fast.compile_gate", "--worker"]
                cmd += ["--arch", str(arch), "--json", str(path), "--shard", f"{i}/{jobs}"]
                cmd += (["--only", only] if only else []) + (["--dry-run"] if dry_run else [])
                wenv = env | {"TRITON_CACHE_DIR": str(Path(tmp) / f"cache_sm_{arch}_{i}")}
                proc = subprocess.Popen(cmd, env=wenv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
                procs.append((arch, path, proc))
        parts: dict[int, list[dict]] = {}
        for arch, path, proc in procs:
            output, _ = proc.communicate()
            if proc.returncode == 0 and path.exists():
                parts.setdefault(arch, []).append(json.loads(path.read_text()))
            else:
                sections[str(arch)] = {"arch": arch, "error": output[-6000:]}
        for arch, sections_of_arch in parts.items():
            sections.setdefault(str(arch), merge_sections(sections_of_arch))
    return {str(a): sections[str(a)] for a in archs}


def source_fingerprint() -> str:
    """What a compile report was made from: a sha256 of the kernels' sources (``kernels/*.py``)
    and of the names of ``VARIANTS`` (every launch, config and shape the gate compiles). A
    committed report whose fingerprint differs is out of date (tests/test_triton_compile.py)."""
    from genrep_fast import kernels

    digest = hashlib.sha256()
    for path in sorted(Path(kernels.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update("\n".join(v.name for v in VARIANTS).encode())
    return digest.hexdigest()[:16]


def run_gate(archs: list[int], out: Path, only: str | None, command: str, jobs: int = 1) -> dict:
    """Compile the variants for each architecture; write the report into ``out`` and return it."""
    start = time.perf_counter()
    sections = _run_workers(archs, only, dry_run=False, jobs=jobs)
    first = next((s for s in sections.values() if "triton" in s), {})
    report = {
        "command": command,
        "commit": _git_commit(),
        "fingerprint": source_fingerprint() if only is None else f"partial (--only {only})",
        "triton": first.get("triton", "unknown"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU needed",
        "wall_s": round(time.perf_counter() - start, 1),
        "workers_per_arch": jobs,
        "archs": sections,
    }
    report["problems"] = verdict(report)
    report["ok"] = not report["problems"]
    write_report(report, out)
    return report


def _print_dry_run(sections: dict[str, dict]) -> int:
    for a in sections.values():
        if "error" in a:
            print(f"sm_{a['arch']}: worker failed:\n{a['error']}")
            return 1
        per_kernel: dict[str, int] = {}
        for e in a["kernels"]:
            per_kernel[e["kernel"]] = per_kernel.get(e["kernel"], 0) + 1
        print(
            f"sm_{a['arch']}: {a['variants']} variants, {a['launches']} launches, "
            f"{len(a['kernels'])} distinct specialisations to compile {per_kernel}, "
            f"{len(a['failures'])} launcher errors"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m genrep_fast.compile_gate",
        description="Compile every Triton kernel variant of genrep_fast for sm_80 / sm_90 "
        "without a GPU; fail on compile errors and register spills (fp64 may spill).",
    )
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--only", help="only the variants whose name contains this text")
    parser.add_argument(
        "--dry-run", action="store_true", help="count the distinct specialisations, compile none"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes per architecture (default 1), each compiling a share",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.worker:
        (arch,) = args.arch
        index, count = (int(n) for n in args.shard.split("/"))
        section = compile_variants(arch, select(args.only), args.dry_run, (index, count))
        args.json.write_text(json.dumps(section))
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("compile gate: triton is not installed", file=sys.stderr)
        return 2
    if args.dry_run:
        return _print_dry_run(_run_workers(args.arch, args.only, dry_run=True))
    raw = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m genrep_fast.compile_gate", *raw])
    report = run_gate(args.arch, args.out, args.only, command, args.jobs)
    for a in report["archs"].values():
        if "error" not in a:
            print(
                f"sm_{a['arch']}: {a['variants']} variants, {a['launches']} launches, "
                f"{len(a['kernels'])} kernels compiled, {len(a['failures'])} compile errors, "
                f"{a['wall_s']} s"
            )
    for p in report["problems"]:
        print("FAIL", p)
    print(f"report: {out_text(args.out)}/{REPORT_NAME}.{{json,md}} ({report['wall_s']} s)")
    return 0 if report["ok"] else 1


def out_text(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    raise SystemExit(main())
