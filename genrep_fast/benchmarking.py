"""Benchmark harness: timing, hardware limits measured in the same run, results JSON and report.

Every benchmark in ``bench/`` times the fast op and its baselines with ``time_fn`` in one process
and records them with ``Results.add``. A record carries the figure of merit next to the time:

* memory-bound ops: ``bytes`` moved -> achieved GB/s and the fraction of ``copy_bandwidth``
  (a device-to-device copy of a large buffer, measured in the same run);
* GEMM-like ops: ``flops`` -> achieved TFLOP/s and the fraction of a plain GEMM of the same shape
  (``gemm_seconds``), measured in the same run.

``python -m genrep_fast.benchmarking RESULTS.json`` turns a results file into a markdown table
(``RESULTS.md``) and a plot (``RESULTS.png``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from genrep_fast import roofline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    min_reps: int = 3,
    max_reps: int = 100,
    min_time_s: float = 0.2,
    l2_cold: bool = False,
    sync_each: bool = False,
) -> float:
    """Median wall time of ``fn()`` in seconds.

    CUDA: one CUDA-event pair around each call, the calls issued back to back with one host sync
    at the end, so each pair brackets that call's GPU work and the host's dispatch of the next
    call overlaps it, as in a training loop (where the host falls behind the GPU, the gaps it
    leaves are counted: such an op is host-bound, and the time says so). ``sync_each`` syncs after
    every call instead: then each time also holds the host's dispatch latency (the GPU idles while
    Python prepares the launch), about 0.1-0.25 ms per posterior call on the H100 machine
    (bench/results/gpu-h100-20261126c). ``l2_cold`` writes a 256 MiB buffer between calls so short
    kernels are timed from DRAM, not from a warm L2 (the H100's L2 is 50 MB). CPU: perf_counter.
    Runs at least ``min_reps`` and until ``min_time_s`` has passed (at most ``max_reps``).

    Why not ``triton.testing.do_bench`` or ``torch.utils.benchmark.Timer``: do_bench times with
    the active Triton GPU driver's events (there is none on the CPU machines that run the smoke
    suites) and always clears the cache between calls, while the suites time both warm and
    L2-cold; the torch Timer's ``blocked_autorange`` times blocks of calls with a host clock
    around a synchronize, so a short kernel's time is a block average, and it has no L2-cold
    mode. Here: one CUDA-event pair per call on CUDA, perf_counter on CPU, a median, and the L2
    flush only where asked.
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    flush = torch.empty(64 * 2**20, dtype=torch.int32, device=device) if l2_cold else None

    def timed_call() -> tuple[torch.cuda.Event, torch.cuda.Event]:
        if flush is not None:
            flush.zero_()
        t0 = torch.cuda.Event(enable_timing=True)
        t1 = torch.cuda.Event(enable_timing=True)
        t0.record()
        fn()
        t1.record()
        return t0, t1

    times: list[float] = []
    if device.type == "cuda" and not sync_each:
        # One synced call sizes the run (the host runs ahead of the GPU: its clock cannot tell
        # when min_time_s of GPU work has passed), then the calls back to back.
        t0, t1 = timed_call()
        t1.synchronize()
        first = max(t0.elapsed_time(t1) * 1e-3, 1e-6)
        reps = max(min_reps, min(max_reps, math.ceil(min_time_s / first)))
        events = [timed_call() for _ in range(reps)]
        events[-1][1].synchronize()
        return statistics.median(a.elapsed_time(b) * 1e-3 for a, b in events)
    start_all = time.perf_counter()
    while len(times) < max_reps and (
        len(times) < min_reps or time.perf_counter() - start_all < min_time_s
    ):
        if device.type == "cuda":
            t0, t1 = timed_call()
            t1.synchronize()
            times.append(t0.elapsed_time(t1) * 1e-3)
        else:
            if flush is not None:
                flush.zero_()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_graph(fn: Callable[[], object], *, device: torch.device | str, warmup: int = 3):
    """``fn`` captured into a CUDA graph: returns the graph's ``replay`` (a callable for
    ``time_fn``). A small op's eager time is the host's (Python, argument checks, one launch per
    torch op: about 25 us per op on the H100 machine, bench/results/gpu-h100-20261127); its
    replay time is the GPU's. Timing both tells the kernels' speed from the host's.

    ``fn`` runs ``warmup`` times on a side stream first (autotuning, lazy allocations, the
    autograd engine's first backward), then once under capture. It must read and write the same
    tensors on every call (a replay repeats the captured kernels on the captured addresses) and
    must not sync the host: capture raises there, which names the offending call."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device: CUDA graph capture needs a CUDA device, got {device}")
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    return graph.replay


@functools.cache
def copy_bandwidth(device: str = "cpu", nbytes: int = 256 * 2**20) -> float:
    """Measured copy bandwidth in bytes/s (read + write counted) of one large buffer copy."""
    dev = torch.device(device)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    sec = time_fn(lambda: dst.copy_(src), device=dev, warmup=2, min_reps=5, min_time_s=0.3)
    return 2 * nbytes / sec


def gemm_seconds(m: int, n: int, k: int, dtype: torch.dtype, device: str = "cpu") -> float:
    """Time of ``[m, k] @ [k, n]`` in ``dtype`` on ``device`` (the GEMM a GEMM-shaped op is judged by)."""
    dev = torch.device(device)
    a = torch.randn(m, k, dtype=dtype, device=dev)
    b = torch.randn(k, n, dtype=dtype, device=dev)
    return time_fn(lambda: a @ b, device=dev)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes); ``GENREP_FAST_COMMIT`` where
    the tree is a copy without ``.git`` (the GPU machine gets the working tree, not the repo)."""
    if os.environ.get("GENREP_FAST_COMMIT"):
        return os.environ["GENREP_FAST_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _command_line() -> str:
    """The command that is running, as a person would type it (``python -m pytest ...``)."""
    if not sys.argv:
        return ""
    prog = Path(sys.argv[0])
    head = f"python -m {prog.parent.name}" if prog.name == "__main__.py" else prog.name
    return " ".join([head, *sys.argv[1:]])


def environment(device: str = "cpu") -> dict:
    """Device name, versions and commit: what every results file records."""
    dev = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name()
    return {
        "device": str(dev),
        "device_name": name,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "command": _command_line(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclasses.dataclass
class Record:
    """One timed implementation of one benchmark case."""

    suite: str
    case: str
    impl: str
    seconds: float
    params: dict = dataclasses.field(default_factory=dict)
    bytes: float | None = None
    flops: float | None = None
    baseline: str | None = None
    speedup: float | None = None  # baseline time / this time
    bandwidth_fraction: float | None = None  # achieved bytes/s / measured copy bandwidth
    gemm_fraction: float | None = None  # plain GEMM time / this time (same shape & precision)
    peak_memory_bytes: int | None = None
    bound: str | None = None  # roofline: "memory" or "compute" (genrep_fast.roofline)
    bound_seconds: float | None = None  # the roofline's time for the case on this device
    bound_fraction: float | None = None  # bound_seconds / this time (1.0: at the roof)


class Results:
    """Collects records of a benchmark session and writes them as JSON."""

    def __init__(self, device: str = "cpu", mode: str = "smoke"):
        self.device = device
        self.mode = mode
        self.records: list[Record] = []
        # Rows of ``genrep_fast.kernels.tuning.report()``: which launch config each tuned kernel
        # chose at each shape, and the times of every config (empty off CUDA).
        self.tuning: list[dict] = []

    def add(
        self,
        suite: str,
        case: str,
        timings: dict[str, float],
        *,
        baseline: str,
        params: dict | None = None,
        bytes_moved: float | None = None,
        flops: float | None = None,
        gemm_time: float | None = None,
        peak_memory: dict[str, int] | None = None,
        cost: roofline.Cost | None = None,
    ) -> list[Record]:
        """Record every implementation of one case; ratios are against ``timings[baseline]``.

        ``cost``: the case's bytes and FLOPs (``genrep_fast.roofline``); every record then carries
        the roofline bound on this run's device and the fraction of it that the time reaches (and
        ``bytes_moved`` / ``flops`` default to the cost's)."""
        if baseline not in timings:
            raise ValueError(f"baseline {baseline!r} is not among the timings {list(timings)}")
        roof = None
        if cost is not None:
            roof = roofline.bound(cost, roofline.device_roofs(self.device))
            bytes_moved = cost.bytes if bytes_moved is None else bytes_moved
            flops = cost.flops if flops is None else flops
        bw = copy_bandwidth(self.device) if bytes_moved is not None else None
        out = []
        for impl, sec in timings.items():
            rec = Record(
                suite=suite,
                case=case,
                impl=impl,
                seconds=sec,
                params=dict(params or {}),
                bytes=bytes_moved,
                flops=flops,
                baseline=baseline,
                speedup=timings[baseline] / sec if sec > 0 else None,
                bandwidth_fraction=(bytes_moved / sec) / bw if bw and sec > 0 else None,
                gemm_fraction=gemm_time / sec if gemm_time and sec > 0 else None,
                peak_memory_bytes=(peak_memory or {}).get(impl),
                bound=roof.kind if roof else None,
                bound_seconds=roof.seconds if roof else None,
                bound_fraction=roof.fraction(sec) if roof and sec > 0 else None,
            )
            self.records.append(rec)
            out.append(rec)
        return out

    def to_json(self) -> dict:
        env = environment(self.device)
        env["copy_bandwidth_GBps"] = copy_bandwidth(self.device) / 1e9 if self.records else None
        if any(r.bound for r in self.records):
            roofs = roofline.device_roofs(self.device)
            env["roofline"] = {
                "bandwidth_GBps": roofs.bandwidth / 1e9,
                "peak_TFLOPs": {k: v / 1e12 for k, v in roofs.peak_flops.items()},
                "source": roofs.source,
            }
        return {
            "environment": env,
            "mode": self.mode,
            "records": [dataclasses.asdict(r) for r in self.records],
            "tuning": self.tuning,
        }

    def write(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(path)
        return path


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


SHAPES_NOTE = {
    "smoke": "**Smoke shapes** (`pytest bench/` without `--benchmark`): small inputs that check "
    "the suites run; their times and ratios say nothing about performance at real sizes. "
    "Realistic shapes: `genrep-fast bench --benchmark`.",
    "realistic": "**Realistic shapes** (`--benchmark`): the sizes of the `params` column.",
}


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()).replace("|", "/")


def markdown_table(data: dict) -> str:
    env = data["environment"]
    mode = data.get("mode", "unknown")
    lines = [
        SHAPES_NOTE.get(mode, f"Shapes: mode {mode}."),
        "",
        f"Device: {env['device_name']} ({env['device']}), torch {env['torch']}, "
        f"triton {env['triton']}, commit {env['commit']}, {env['date']}, mode {mode}; "
        f"measured copy bandwidth {_fmt(env.get('copy_bandwidth_GBps'), '.1f')} GB/s.",
        f"Command: `{env.get('command', '')}`.",
        "",
        "| suite | case | params (shapes) | impl | time (ms) | speedup vs baseline | GB/s | "
        "of copy BW | of GEMM | bound (ms) | of bound | peak mem (MiB) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    roofs = env.get("roofline")
    if roofs:
        peaks = ", ".join(f"{k} {v:.3g}" for k, v in roofs["peak_TFLOPs"].items())
        lines.insert(
            1,
            f"Roofline: {roofs['bandwidth_GBps']:.1f} GB/s; peak TFLOP/s {peaks} "
            f"({roofs['source']}). Bound: max(bytes / bandwidth, FLOPs / peak), formulas in "
            f"genrep_fast/roofline.py.",
        )
    for r in data["records"]:
        gbps = r["bytes"] / r["seconds"] / 1e9 if r["bytes"] and r["seconds"] else None
        mem = r["peak_memory_bytes"] / 2**20 if r["peak_memory_bytes"] else None
        bound_s = r.get("bound_seconds")
        bound = f"{bound_s * 1e3:.3g} {r['bound']}" if bound_s is not None else ""
        lines.append(
            f"| {r['suite']} | {r['case']} | {_params(r.get('params') or {})} | {r['impl']} | "
            f"{r['seconds'] * 1e3:.3f} | "
            f"{_fmt(r['speedup'], '.2f')}x vs {r['baseline']} | {_fmt(gbps, '.1f')} | "
            f"{_fmt(r['bandwidth_fraction'], '.0%')} | {_fmt(r['gemm_fraction'], '.0%')} | "
            f"{bound} | {_fmt(r.get('bound_fraction'), '.0%')} | {_fmt(mem, '.1f')} |"
        )
    if data.get("tuning"):
        lines += [
            "",
            "Autotuner choices (kernels/tuning.py: each config timed once per shape key; ms per "
            "launch, `-` where the config did not fit):",
            "",
            "| kernel | key | chosen config | ms of each config |",
            "|---|---|---|---|",
        ]
        for t in data["tuning"]:
            best = t["configs"][t["chosen"]]
            cfg = ", ".join(f"{k}={v}" for k, v in best.items())
            ms = " / ".join("-" if m is None else f"{m:.3g}" for m in t["ms"])
            lines.append(f"| {t['kernel']} | {t['key']} | #{t['chosen']}: {cfg} | {ms} |")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: str | os.PathLike) -> Path:
    """Speedup of every implementation against its case's baseline, one bar per (case, impl)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in data["records"] if r["impl"] != r["baseline"]]
    labels = [f"{r['suite']}/{r['case']}\n{r['impl']}" for r in recs]
    values = [r["speedup"] or 0.0 for r in recs]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(recs) + 2), 4.5))
    ax.bar(range(len(recs)), values, color="tab:blue")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(recs)))
    ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("speedup vs baseline (x)")
    if values and max(values) / max(min(v for v in values if v > 0), 1e-9) > 50:
        ax.set_yscale("log")
    env = data["environment"]
    ax.set_title(
        f"genrep_fast benchmarks on {env['device_name']} (commit {env['commit']}), "
        f"{data.get('mode', 'unknown')} shapes",
        fontsize=9,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(json_path: str | os.PathLike) -> tuple[Path, Path]:
    """``X.json`` -> ``X.md`` (table) and ``X.png`` (plot) beside it."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    md = json_path.with_suffix(".md")
    md.write_text(markdown_table(data))
    png = plot(data, json_path.with_suffix(".png"))
    return md, png


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Turn a genrep_fast benchmark JSON into a table + plot"
    )
    ap.add_argument("results", nargs="+", help="results JSON file(s)")
    args = ap.parse_args(argv)
    for p in args.results:
        md, png = write_report(p)
        print(md.read_text())
        print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
