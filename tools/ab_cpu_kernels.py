"""The CPU kernels of another commit against the working tree's, in one process.

CPU timings on a shared machine drift by tens of percent between runs, so a before / after
comparison made from two benchmark files says little. This builds one kernel file of csrc/ (and
the headers of csrc/) of ``--base`` and of the working tree into one JIT module, each under an op
namespace of its own (``genrep_ab_base``, ``genrep_ab_head``), with the extension's compiler flags,
then times the two alternately, case by case, and reports the medians, their ratio, the bytes the
case must move over the time (its floor's bandwidth) against the copy bandwidth measured in the
same run, and whether the two give the same bits.

``--kernel alignment`` (``csrc/alignment_cpu.cpp``): one alignment step (``group_sums`` +
``align_combine``) on bench/bench_alignment.py's DiT-like parameter list (``--hidden``,
``--blocks``), per dtype, its bytes the 5-access floor (``roofline.alignment_floor``). The working
tree's loops run twice where the CPU has AVX2: as picked at run time, and with
``GENREP_FAST_CPU_ISA=baseline``.

``--kernel mixture`` (``csrc/mixture_cpu.cpp``): the per-image bank's log-likelihood
(``mixture_ll_diff``) at bench/bench_posterior.py's CPU shape (B=64, C=10, T=75, D=1024), per bank
dtype, isotropic sigma ([1, C, T], fp32) and diagonal sigma (the bank's shape and dtype); bytes:
the bank, x and sigma read once.

    python tools/ab_cpu_kernels.py --base 1d3b972 [--kernel alignment] [--reps 15]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_alignment import dit_like_shapes  # noqa: E402

from genrep_fast import reference, roofline  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Case:
    """One timed call: ``run(ops, slot)`` with ``ops`` a side's op namespace and ``slot`` the
    row's name (the key of the row's own output buffers, made before the timing), returning its
    outputs; ``bytes``: what the call must move at the least."""

    name: str
    run: Callable[[object, str], list[torch.Tensor]]
    bytes: float


@dataclass(frozen=True)
class Kernel:
    source: str
    schemas: tuple[str, ...]
    isa_switch: bool  # reads GENREP_FAST_CPU_ISA
    # One case at a time (a generator: each case's tensors are freed before the next is made).
    cases: Callable[[argparse.Namespace], Iterator[Case]]


def _alignment_cases(args: argparse.Namespace) -> Iterator[Case]:
    shapes, groups = dit_like_shapes(args.hidden, args.blocks)
    ids = reference.resolve_groups(groups, len(shapes))
    for dtype in DTYPES:
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        gs = [(0.2 * p.float() + torch.randn(s, generator=g)).to(dtype) for p, s in zip(ps, shapes)]
        # The update goes into buffers made once per row, as into .grad: a fresh list per call
        # would time the allocation and first touch of 52M values too.
        buffers: dict[str, list[torch.Tensor]] = {}

        def run(ops, slot, ps=ps, gs=gs, buffers=buffers):
            out = buffers.setdefault(slot, [torch.empty_like(p) for p in ps])
            sums = ops.group_sums(ps, gs, ids, len(groups))
            ops.align_combine(ps, gs, sums, ids, 2.0, 0.7, 0.3, "symmetric", out)
            return out

        floor = roofline.alignment_floor((p.numel(), p.element_size()) for p in ps).bytes
        yield Case(str(dtype).removeprefix("torch."), run, floor)


def _mixture_cases(args: argparse.Namespace) -> Iterator[Case]:
    b, c, t, d = 64, 10, 75, 1024
    for dtype in DTYPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b, d, generator=g).to(dtype)
        mu = torch.randn(b, c, t, d, generator=g).to(dtype)
        iso = torch.rand(1, c, t, generator=g) + 0.5
        diag = (torch.rand(b, c, t, d, generator=g) + 0.5).to(dtype)
        name = str(dtype).removeprefix("torch.")
        for label, sigma, s_sigma in (("isotropic", iso, 0), ("diagonal", diag, diag.itemsize)):
            cost = roofline.per_image_bank(
                b, c, t, d, s_bank=mu.element_size(), s_x=x.element_size(), s_sigma=s_sigma
            )
            # The op allocates its [B, C] output itself, as in use.
            yield Case(
                f"{name}, {label} sigma",
                lambda ops, slot, x=x, mu=mu, sigma=sigma: [
                    ops.mixture_ll_diff(x, mu, sigma, None)
                ],
                cost.bytes,
            )


KERNELS = {
    "alignment": Kernel(
        "csrc/alignment_cpu.cpp",
        (
            "group_sums(Tensor?[] p, Tensor?[] g, int[] group_ids, int num_groups) -> Tensor",
            "align_combine(Tensor?[] p, Tensor?[] g, Tensor sums, int[] group_ids, float k, "
            "float w_p, float w_g, str align_mode, Tensor(a!)[] out) -> ()",
        ),
        True,
        _alignment_cases,
    ),
    "mixture": Kernel(
        "csrc/mixture_cpu.cpp",
        (
            "mixture_ll_diff(Tensor x, Tensor mu, Tensor sigma, Tensor? class_index) -> Tensor",
            "mixture_ll_diff_backward(Tensor grad, Tensor x, Tensor mu, Tensor sigma, "
            "Tensor? class_index, bool need_x, bool need_mu, bool need_sigma) -> (Tensor, Tensor, "
            "Tensor)",
        ),
        False,
        _mixture_cases,
    ),
}


def _files(source: str, rev: str | None) -> dict[str, str]:
    """``source`` and every header of csrc/ (what it may include), at ``rev`` (a commit) or in the
    working tree (None)."""
    if rev is None:
        paths = [ROOT / source, *sorted((ROOT / "csrc").glob("*.h"))]
        return {p.name: p.read_text() for p in paths}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout

    names = [n for n in git("ls-tree", "--name-only", rev, "csrc/").split() if n.endswith(".h")]
    return {Path(n).name: git("show", f"{rev}:{n}") for n in [source, *names]}


def _sources(kernel: Kernel, base: str, work: Path) -> list[str]:
    """Each side's kernel file (registering under its own namespace) beside its own headers."""
    stem = Path(kernel.source).stem
    out = []
    for side, rev in (("base", base), ("head", None)):
        folder = work / side
        folder.mkdir()
        for name, text in _files(kernel.source, rev).items():
            if name == Path(kernel.source).name:
                # The object files of one build share a folder: each side's source needs a name
                # of its own.
                name = f"{stem}_{side}.cpp"
                text = text.replace(
                    "TORCH_LIBRARY_IMPL(genrep_fast, CPU, m)",
                    f"TORCH_LIBRARY_IMPL(genrep_ab_{side}, CPU, m)",
                )
            (folder / name).write_text(text)
        out.append(str(folder / f"{stem}_{side}.cpp"))
    defs = "\n".join(
        f"TORCH_LIBRARY(genrep_ab_{side}, m) {{\n"
        + "".join(f'  m.def("{s}");\n' for s in kernel.schemas)
        + "}"
        for side in ("base", "head")
    )
    (work / "schemas.cpp").write_text(f"#include <torch/library.h>\n{defs}\n")
    return [str(work / "schemas.cpp"), *out]


def _copy_bandwidth(reps: int) -> float:
    x = torch.randn(50_000_000)
    y = torch.empty_like(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        y.copy_(x)
        times.append(time.perf_counter() - t0)
    return 2 * x.numel() * 4 / statistics.median(times)


def _same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the commit whose kernels are the baseline")
    ap.add_argument("--kernel", choices=sorted(KERNELS), default="alignment")
    ap.add_argument("--hidden", type=int, default=320, help="alignment: the DiT-like width")
    ap.add_argument("--blocks", type=int, default=28, help="alignment: the DiT-like depth")
    ap.add_argument("--reps", type=int, default=15, help="timed calls per side and case")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.hidden < 1 or args.blocks < 1:
        ap.error(
            f"--reps, --hidden and --blocks must be >= 1, got {args.reps}, {args.hidden}, "
            f"{args.blocks}"
        )
    kernel = KERNELS[args.kernel]

    from torch.utils.cpp_extension import load

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "build").mkdir()
        load(
            name=f"genrep_ab_{args.kernel}", sources=_sources(kernel, args.base, work),
            extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
            build_directory=str(work / "build"), is_python_module=False,
        )  # fmt: skip

    # (row name, namespace, GENREP_FAST_CPU_ISA): the baseline ISA row only where it differs.
    sides = [("base", "base", "native"), ("head", "head", "native")]
    if kernel.isa_switch and " avx2" in Path("/proc/cpuinfo").read_text(errors="ignore"):
        sides.append(("head, baseline ISA", "head", "baseline"))
    rows = []
    for case in kernel.cases(args):
        outs: dict[str, list[torch.Tensor]] = {}
        times: dict[str, list[float]] = {name: [] for name, _, _ in sides}
        for rep in range(args.reps + 1):  # the first round warms up
            for name, ns, isa in sides:
                os.environ["GENREP_FAST_CPU_ISA"] = isa
                ops = getattr(torch.ops, f"genrep_ab_{ns}")
                t0 = time.perf_counter()
                outs[name] = case.run(ops, name)
                if rep:
                    times[name].append(time.perf_counter() - t0)
        os.environ.pop("GENREP_FAST_CPU_ISA", None)
        base_ms = statistics.median(times["base"]) * 1e3
        for name, _, _ in sides:
            ms = statistics.median(times[name]) * 1e3
            rows.append(
                {
                    "case": case.name,
                    "kernels": name,
                    "ms": round(ms, 2),
                    "speedup_vs_base": round(base_ms / ms, 2),
                    "floor_GBps": round(case.bytes / ms / 1e6, 1),
                    "same_bits_as_base": _same_bits(outs[name], outs["base"]),
                }
            )
    copy = _copy_bandwidth(args.reps)
    meta = {
        "command": "python tools/ab_cpu_kernels.py " + " ".join(argv or sys.argv[1:]),
        "kernel": kernel.source,
        "shape": (
            f"DiT-like list, hidden {args.hidden}, {args.blocks} blocks"
            if args.kernel == "alignment"
            else "per-image bank B=64, C=10, T=75, D=1024"
        ),
        "base": args.base,
        "head": subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "copy_GBps": round(copy / 1e9, 1),
    }
    print(
        f"{kernel.source}, {meta['shape']}: copy bandwidth {meta['copy_GBps']} GB/s; {meta['threads']} threads; "
        f"medians of {args.reps} calls"
    )
    print("| case | kernels | ms per call | vs base | GB/s at the floor | of copy BW | same bits |")
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['kernels']} | {r['ms']:.2f} | {r['speedup_vs_base']:.2f}x | "
            f"{r['floor_GBps']:.1f} | {r['floor_GBps'] / meta['copy_GBps']:.0%} | "
            f"{'yes' if r['same_bits_as_base'] else 'no'} |"
        )
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
