"""Where the time of one shared-bank likelihood call goes: each kernel's device time.

``genrep_fast.mixture_log_likelihood`` on a shared bank, raw tensors and a ``PreparedBank``, in
each precision asked for: one warm-up call (compiles and autotunes), then ``--calls`` calls under
``torch.profiler``; prints, per case, the wall time per call (CUDA events) and the kernels by
device time per call, and writes the same as JSON (``--out``). Each case also gets its host
side: ``host_ms_per_call`` (the calls issued back to back, timed on the host before the one sync)
and the Python functions by own time per call (``cProfile``), for calls whose wall time is the
host's rather than the device's. ``--kl`` adds the fused KL loss forward + backward (B x C of the
shape). On a CPU machine it runs at a smoke shape (the plumbing; its times say nothing about the
GPU).

    python tools/op_breakdown.py --out breakdown.json                  # B=256 C=1000 T=100 D=4096
    python tools/op_breakdown.py --shape 256,100,75,4096 --precisions bf16
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import genrep_fast as G


def _case(x, bank, sigma, precision, calls: int, cuda: bool) -> dict:
    def call():
        return G.mixture_log_likelihood(x, bank, sigma, precision=precision, validate=False)

    call()  # compile + autotune outside the measurement
    if cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            call()
        end.record()
        end.synchronize()
        wall_ms = start.elapsed_time(end) / calls
    else:
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        wall_ms = (time.perf_counter() - t0) * 1e3 / calls
    return {"wall_ms_per_call": wall_ms, **_profiled(call, calls, cuda)}


def _profiled(call, calls: int, cuda: bool) -> dict:
    """``kernels``: the device kernels by device time per call (on a CPU: the ops by CPU time),
    and ``_host_side``."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(calls):
            call()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        dev_us = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        if dev_us <= 0 or (cuda and ev.device_type.name != "CUDA"):
            continue
        rows.append(
            {"name": ev.key, "ms_per_call": dev_us / 1e3 / calls, "count": ev.count / calls}
        )
    rows.sort(key=lambda r: -r["ms_per_call"])
    return {"kernels": rows[:12], **_host_side(call, calls, cuda)}


def _host_side(call, calls: int, cuda: bool, top: int = 15) -> dict:
    """``host_ms_per_call``: ``calls`` calls issued back to back, host clock, before the sync
    that ends them; ``host_functions``: the ``top`` Python functions by own time per call."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    host_ms = (time.perf_counter() - t0) * 1e3 / calls
    if cuda:
        torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        call()
    prof.disable()
    if cuda:
        torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats
    funcs = []
    for (file, line, name), (_, ncalls, own, cum, _) in stats.items():
        where = f"{Path(file).name}:{line}({name})" if line else name
        funcs.append({
            "function": where, "calls_per_call": ncalls / calls,
            "own_us_per_call": own * 1e6 / calls, "cum_us_per_call": cum * 1e6 / calls,
        })  # fmt: skip
    funcs.sort(key=lambda f: -f["own_us_per_call"])
    return {"host_ms_per_call": host_ms, "host_functions": funcs[:top]}


def _kl_case(b: int, c: int, calls: int, cuda: bool) -> dict:
    """The fused KL loss forward + backward at ``[b, c]``: device kernels and host side."""
    dev = "cuda" if cuda else "cpu"
    g = torch.Generator(device="cpu").manual_seed(1)
    logits = torch.randn(b, c, generator=g).to(dev).requires_grad_()
    ll = (torch.randn(b, c, generator=g) * 50).to(dev)

    def call():
        G.posterior_kl_loss(logits, ll).backward()
        logits.grad = None

    call()
    return _profiled(call, calls, cuda)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="256,1000,100,4096", help="B,C,T,D (default ImageNet)")
    ap.add_argument(
        "--precisions", default="bf16,tf32,tf32x3", help="comma-separated GEMM precisions"
    )
    ap.add_argument("--calls", type=int, default=5, help="profiled calls per case (default 5)")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--kl", action="store_true", help="add the fused KL forward + backward")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    b, c, t, d = (int(v) for v in args.shape.split(",")) if cuda else (4, 6, 5, 16)
    dev = "cuda" if cuda else "cpu"
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(b, d, generator=g).to(dev)
    mu = torch.randn(c, t, d, generator=g).to(dev)
    sigma = (1.5 + torch.rand(t, generator=g)).to(dev)
    prepared = G.prepare_bank(mu, sigma)
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    out["shape"] = {"B": b, "C": c, "T": t, "D": d}
    out["cases"] = {}
    for precision in args.precisions.split(","):
        for name, bank, sig in (("raw", mu, sigma), ("prepared", prepared, None)):
            res = _case(x, bank, sig, precision, args.calls, cuda)
            out["cases"][f"{precision} {name}"] = res
            print(f"\n== {precision}, {name} bank: {res['wall_ms_per_call']:.3f} ms per call")
            _print_case(res)
    if args.kl:
        res = _kl_case(b, c, args.calls, cuda)
        out["cases"]["kl fwd+bwd"] = res
        print("\n== fused KL forward + backward")
        _print_case(res)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


def _print_case(res: dict) -> None:
    for r in res["kernels"]:
        print(f"  {r['ms_per_call']:9.3f} ms  x{r['count']:g}  {r['name'][:90]}")
    print(f"  host: {res['host_ms_per_call']:.3f} ms per call issued; own time per call:")
    for f in res["host_functions"][:8]:
        print(f"  {f['own_us_per_call']:9.1f} us  x{f['calls_per_call']:g}  {f['function'][:80]}")


if __name__ == "__main__":
    sys.exit(main())
