"""Wall time of the chain-bank build on 1 vs W gloo processes (CPU), the trainer's sharded build.

    python bench/bank_build_ranks.py --ranks 1 2 --repeats 3 --out bench/results/bank_build_ranks

Each configuration runs under ``torch.distributed.run`` with one thread per process; every
process builds its share of the model batches of ``tiny_digits``'s bank (10 classes x S=16
chains x N=50 steps; ``diffusion.bank_batch_size=16``, so 10 model batches to share) from the same
seeded network, then all_gathers. Reported: per repeat, the slowest rank's seconds from a barrier
before the build to the end of the gather (the first build is a warm-up and not timed); and
whether every configuration's bank is bit-identical to the first one's. Writes ``OUT.json`` and
``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SETTINGS = ["diffusion.bank_batch_size=16", "runtime.threads=1"]


def worker(out: Path, repeats: int, settings: list[str]) -> None:
    import torch.distributed as dist

    from genrep_fast.train.config import load_config
    from genrep_fast.train.network import build_chain_bank, build_network

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    cfg = load_config("tiny_digits", SETTINGS + settings)
    torch.manual_seed(cfg.seed)
    net = build_network(cfg, torch.device("cpu"))
    seconds = []
    for i in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        bank = build_chain_bank(net, cfg, None, modulated=False, seed=1234, sharded=True)
        t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the build is done when the slowest rank is
        if i:
            seconds.append(t.item())
    if dist.get_rank() == 0:
        torch.save((bank.mu, bank.sigma), out / "bank.pt")
        (out / "seconds.json").write_text(json.dumps(seconds))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], help="extra config override")
    ap.add_argument("--out", default="bench/results/bank_build_ranks")
    args = ap.parse_args()
    rows, reference, identical = [], None, {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.ranks:
            out = Path(tmp) / f"w{w}"
            out.mkdir()
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc_per_node={w}",
                "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}",
                __file__,
                "--worker",
                str(out),
                str(args.repeats),
                *args.set,
            ]
            env = dict(os.environ, OMP_NUM_THREADS="1")
            load_before = os.getloadavg()
            subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
            seconds = json.loads((out / "seconds.json").read_text())
            bank = torch.load(out / "bank.pt")
            if reference is None:
                reference = bank
            identical[w] = all(torch.equal(a, b) for a, b in zip(bank, reference))
            rows.append(
                {
                    "ranks": w,
                    "seconds": seconds,
                    "median_s": statistics.median(seconds),
                    "loadavg_before": load_before,
                    "loadavg_after": os.getloadavg(),
                }
            )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    result = {
        "command": "python bench/bank_build_ranks.py "
        + " ".join(
            f"--{k} {v}"
            for k, v in [("ranks", " ".join(map(str, args.ranks))), ("repeats", args.repeats)]
        )
        + "".join(f" --set {s}" for s in args.set),
        "commit": commit,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "torch": torch.__version__,
        "uptime_after": uptime,
        "config": "tiny_digits " + " ".join(SETTINGS + args.set),
        "results": rows,
        "bank_identical_to_first": identical,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    base = rows[0]["median_s"]
    lines = [
        "# Chain-bank build: 1 vs more gloo processes (CPU)",
        "",
        f"`{result['command']}` at commit `{commit}`; {result['machine']}; torch {torch.__version__}.",
        f"Config: {result['config']}. `uptime` after: `{uptime}`.",
        "",
        "| ranks | seconds per build (repeats) | median | speed-up | load avg before | bank identical |",
        "|---:|---|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {', '.join(f'{s:.2f}' for s in r['seconds'])} | "
            f"{r['median_s']:.2f} | {base / r['median_s']:.2f}x | "
            f"{', '.join(f'{v:.1f}' for v in r['loadavg_before'])} | {identical[r['ranks']]} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
    else:
        main()
