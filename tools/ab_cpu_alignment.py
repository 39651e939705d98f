"""The CPU alignment kernels of another commit against the working tree's, in one process.

CPU timings on a shared machine drift by tens of percent between runs, so a before / after
comparison made from two benchmark files says little. This builds ``csrc/alignment_cpu.cpp`` (and
the headers of csrc/) of ``--base`` and of the working tree into one JIT module, each under an op namespace
of its own (``genrep_ab_base``, ``genrep_ab_head``), with the extension's compiler flags, then
times one alignment step (``group_sums`` + ``align_combine``) of each, alternating, on
bench/bench_alignment.py's DiT-like parameter list, per dtype. It reports the medians, their
ratio, the bandwidth at the 5-access floor (``roofline.alignment_floor``) and the copy bandwidth
measured in the same run, and whether the two give the same bits. The working tree's loops run
twice where the CPU has AVX2: as picked at run time, and with ``GENREP_FAST_CPU_ISA=baseline``.

    python tools/ab_cpu_alignment.py --base 1d3b972 [--hidden 320 --blocks 28 --reps 15]
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
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_alignment import dit_like_shapes  # noqa: E402

from genrep_fast import reference, roofline  # noqa: E402

KERNEL = "csrc/alignment_cpu.cpp"
SCHEMAS = (
    "group_sums(Tensor?[] p, Tensor?[] g, int[] group_ids, int num_groups) -> Tensor",
    "align_combine(Tensor?[] p, Tensor?[] g, Tensor sums, int[] group_ids, float k, float w_p, "
    "float w_g, str align_mode, Tensor(a!)[] out) -> ()",
)


def _files(rev: str | None) -> dict[str, str]:
    """``csrc/alignment_cpu.cpp`` and every header of csrc/ (what it may include), at ``rev`` (a
    commit) or in the working tree (None)."""
    if rev is None:
        paths = [ROOT / KERNEL, *sorted((ROOT / "csrc").glob("*.h"))]
        return {p.name: p.read_text() for p in paths}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout

    names = [n for n in git("ls-tree", "--name-only", rev, "csrc/").split() if n.endswith(".h")]
    return {Path(n).name: git("show", f"{rev}:{n}") for n in [KERNEL, *names]}


def _sources(base: str, work: Path) -> list[str]:
    """Each side's kernel file (registering under its own namespace) beside its own headers."""
    out = []
    for side, rev in (("base", base), ("head", None)):
        folder = work / side
        folder.mkdir()
        for name, text in _files(rev).items():
            if name == Path(KERNEL).name:
                # The object files of one build share a folder: each side's source needs a name
                # of its own.
                name = f"alignment_cpu_{side}.cpp"
                text = text.replace(
                    "TORCH_LIBRARY_IMPL(genrep_fast, CPU, m)",
                    f"TORCH_LIBRARY_IMPL(genrep_ab_{side}, CPU, m)",
                )
            (folder / name).write_text(text)
        out.append(str(folder / f"alignment_cpu_{side}.cpp"))
    defs = "\n".join(
        f"TORCH_LIBRARY(genrep_ab_{side}, m) {{\n"
        + "".join(f'  m.def("{s}");\n' for s in SCHEMAS)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the commit whose kernels are the baseline")
    ap.add_argument("--hidden", type=int, default=320)
    ap.add_argument("--blocks", type=int, default=28)
    ap.add_argument("--reps", type=int, default=15, help="timed steps per side and dtype")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.reps < 1 or args.hidden < 1 or args.blocks < 1:
        ap.error(
            f"--reps, --hidden and --blocks must be >= 1, got {args.reps}, {args.hidden}, {args.blocks}"
        )

    from torch.utils.cpp_extension import load

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "build").mkdir()
        load(
            name="genrep_ab", sources=_sources(args.base, work), extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"], build_directory=str(work / "build"),
            is_python_module=False,
        )  # fmt: skip
    shapes, groups = dit_like_shapes(args.hidden, args.blocks)
    ids = reference.resolve_groups(groups, len(shapes))

    def step(side: str, ps, gs, out):
        ops = getattr(torch.ops, f"genrep_ab_{side}")
        sums = ops.group_sums(ps, gs, ids, len(groups))
        ops.align_combine(ps, gs, sums, ids, 2.0, 0.7, 0.3, "symmetric", out)

    # (name, namespace, GENREP_FAST_CPU_ISA): the baseline ISA row only where it differs.
    sides = [("base", "base", "native"), ("head", "head", "native")]
    if " avx2" in Path("/proc/cpuinfo").read_text(errors="ignore"):
        sides.append(("head, baseline ISA", "head", "baseline"))
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        g = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        gs = [(0.2 * p.float() + torch.randn(s, generator=g)).to(dtype) for p, s in zip(ps, shapes)]
        outs = {name: [torch.empty_like(p) for p in ps] for name, _, _ in sides}
        times: dict[str, list[float]] = {name: [] for name, _, _ in sides}
        for rep in range(args.reps + 1):  # the first round warms up
            for name, ns, isa in sides:
                os.environ["GENREP_FAST_CPU_ISA"] = isa
                t0 = time.perf_counter()
                step(ns, ps, gs, outs[name])
                if rep:
                    times[name].append(time.perf_counter() - t0)
        os.environ.pop("GENREP_FAST_CPU_ISA", None)
        floor = roofline.alignment_floor((p.numel(), p.element_size()) for p in ps).bytes
        base_ms = statistics.median(times["base"]) * 1e3
        for name, _, _ in sides:
            ms = statistics.median(times[name]) * 1e3
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "kernels": name,
                    "ms": round(ms, 2),
                    "speedup_vs_base": round(base_ms / ms, 2),
                    "floor_GBps": round(floor / ms / 1e6, 1),
                    "same_bits_as_base": all(
                        torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                        for a, b in zip(outs[name], outs["base"])
                    ),
                }
            )
    copy = _copy_bandwidth(args.reps)
    meta = {
        "command": "python tools/ab_cpu_alignment.py " + " ".join(argv or sys.argv[1:]),
        "base": args.base,
        "head": subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "params": sum(torch.Size(s).numel() for s in shapes),
        "tensors": len(shapes),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "copy_GBps": round(copy / 1e9, 1),
    }
    print(
        f"{meta['params'] / 1e6:.1f}M parameters in {meta['tensors']} tensors; copy bandwidth "
        f"{meta['copy_GBps']} GB/s; {meta['threads']} threads; medians of {args.reps} steps"
    )
    print(
        "| dtype | kernels | ms per step | vs base | GB/s at the floor | of copy BW | same bits |"
    )
    print("|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['kernels']} | {r['ms']:.2f} | {r['speedup_vs_base']:.2f}x | "
            f"{r['floor_GBps']:.1f} | {r['floor_GBps'] / meta['copy_GBps']:.0%} | "
            f"{'yes' if r['same_bits_as_base'] else 'no'} |"
        )
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
