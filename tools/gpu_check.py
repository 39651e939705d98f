"""One command for a borrowed GPU machine: install, GPU tests, realistic benchmarks, one ncu profile.

Planned for a machine lent for 15 minutes in all (its start included), so the whole run is kept
under a budget (default 480 s) and each step has its own time limit; a step that would not fit is
skipped and says so. Everything lands in ``--out`` (default ``$OUT``, else ``gpu_check_out/``):

* ``summary.json`` / ``summary.md``: environment (device, versions, commit, command), every step
  with its exit code, seconds and log file, the GPU test counts, and the issue-15 targets table
  (``tools/gpu_targets.py``) of each benchmark results JSON;
* ``gpu-tests.xml``: JUnit report of ``pytest -m gpu tests/``;
* ``bench/*.json|md|png``: the benchmark results (``bench/results`` format) of the realistic
  shapes: per-image bank vs copy bandwidth, the shared bank per precision vs a plain GEMM,
  candidate classes at C=1000/K=20, the DiT-XL/2-like alignment list, the fused KL;
* ``breakdown.json``: ``tools/op_breakdown.py``, where one shared-bank call's and one KL step's
  time goes, device kernels and host functions;
* ``ncu_<name>.ncu-rep`` + ``.csv``: Nsight Compute on the kernels of ``PROFILES``: the
  difference-form kernel on a bf16 per-image bank, the shared-bank form the tuner chose and the
  fused GEMM kernel's turned tile, the fused KL forward and backward, the alignment combine
  kernel.

Usage on the GPU machine (from the repository root; see README "Checking on a GPU")::

    GENREP_FAST_COMMIT=<sha> bash tools/gpu_check.sh

``--dry-run`` runs the same steps on a CPU machine at smoke shapes (no install, no ncu; GPU tests
collected and skipped), which is how the script itself is tested.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (name, seconds allowed, what it needs). Measured on the H100 (bench/results/gpu-h100-20261127,
# run 1): install 20 s with the prebuilt extension (a build there takes ~2-3 min with MAX_JOBS=16),
# GPU tests 179 s for 93 tests (Triton compiles on first launch; 132 tests now: ~250 s expected),
# benchmarks 95 s, breakdown 24 s, ncu 66 s for five profiles (~13 s each, seven now).
STEPS = (
    ("install", 240),
    ("gpu_tests", 330),
    ("benchmarks", 220),
    ("breakdown", 90),
    ("ncu", 150),
)


def _run(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, float]:
    """Run ``cmd`` from the repository root, output to ``log``; ``(exit code, seconds)``; a time-out
    gives exit code 124 as ``timeout(1)`` does."""
    start = time.monotonic()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            rc = subprocess.run(
                cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, env=env
            ).returncode
        except subprocess.TimeoutExpired:
            fh.write(f"\n[gpu_check] timed out after {timeout:.0f} s\n")
            rc = 124
    return rc, time.monotonic() - start


def _extension_status() -> dict:
    """Whether ``genrep_fast._C`` loads and has CUDA kernels (in a fresh interpreter)."""
    code = (
        "import json, torch, genrep_fast._ops as o; "
        "print(json.dumps({'extension': o.HAS_EXTENSION, 'cuda_ops': o.HAS_CUDA_OPS}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"extension": False, "cuda_ops": False, "error": out.stderr[-500:]}


def step_install(out: Path, timeout: float, dry_run: bool) -> dict:
    """Wheels the machine lacks (``.whl/``), then the extension: prebuilt (``.gpu-prebuilt/``)
    when present, else built there with ``MAX_JOBS=16`` for sm_90."""
    if dry_run:
        return {"skipped": "dry run: the package is already installed here", **_extension_status()}
    log = out / "logs" / "install.log"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps"]
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    if wheels:
        # Into a folder of their own on PYTHONPATH (inherited by every later step), leaving the
        # machine's own packages as they are.
        site = Path(os.environ.get("GPU_CHECK_SITE", "/tmp/gpu_check_site"))
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        cmd += ["--no-compile", "--upgrade", "--target", str(site), *wheels]
        rc, _ = _run(cmd, out / "logs" / "wheels.log", timeout)
        if rc:
            return {"rc": rc, "log": "logs/wheels.log"}
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p
        )
    env = dict(os.environ)
    prebuilt = sorted(glob.glob(str(ROOT / ".gpu-prebuilt" / "_C*.so")))
    if prebuilt:
        shutil.copy(prebuilt[0], ROOT / "genrep_fast" / Path(prebuilt[0]).name)
        env["GENREP_FAST_NO_EXTENSION"] = "1"
        how = "prebuilt " + Path(prebuilt[0]).name
    else:
        env.update(FORCE_CUDA="1", MAX_JOBS=env.get("MAX_JOBS", "16"))
        env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        how = "built here"
    rc, sec = _run([*pip, "-e", "."], log, timeout, env=env)
    status = _extension_status()
    if rc == 0 and not status.get("cuda_ops"):
        # A prebuilt .so that does not load here: build it instead, once.
        env.pop("GENREP_FAST_NO_EXTENSION", None)
        env.update(FORCE_CUDA="1", MAX_JOBS="16", TORCH_CUDA_ARCH_LIST="9.0")
        for so in glob.glob(str(ROOT / "genrep_fast" / "_C*.so")):
            os.remove(so)
        rc, _ = _run([*pip, "-e", "."], out / "logs" / "install-build.log", timeout - sec, env=env)
        how, status = "built here (the prebuilt extension did not load)", _extension_status()
    return {"rc": rc, "how": how, "log": "logs/install.log", **status}


def _junit_counts(path: Path) -> dict:
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    keys = ("tests", "failures", "errors", "skipped")
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in keys}


def step_gpu_tests(out: Path, timeout: float, dry_run: bool) -> dict:
    xml = out / "gpu-tests.xml"
    # Only the files that hold GPU tests: the GPU machine lacks some test-only packages
    # (hypothesis) that other test files import.
    target = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if "pytest.mark.gpu" in p.read_text()
    )
    cmd = [sys.executable, "-m", "pytest", *target, "-m", "gpu", "-q", "-rfEs"]
    cmd += ["-p", "no:cacheprovider", f"--junitxml={xml}"]
    rc, sec = _run(cmd, out / "logs" / "gpu_tests.log", timeout)
    counts = _junit_counts(xml)
    # pytest exits 5 when every collected test was deselected: not a failure of the check.
    return {"rc": 0 if rc == 5 else rc, "log": "logs/gpu_tests.log", "counts": counts}


def step_benchmarks(out: Path, timeout: float, dry_run: bool) -> dict:
    dest = out / "bench"
    dest.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "bench/bench_posterior.py", "bench/bench_alignment.py"]
    cmd += ["-q", "-s", "-p", "no:cacheprovider"]
    if dry_run:
        # Smoke shapes, and only the new large-shape cases plus the alignment list: the dry run
        # shows the plumbing, the suites themselves are tested by the normal test run.
        cmd += ["-k", "per_image_bank_bandwidth or alignment"]
    else:
        cmd += ["--benchmark"]
    env = dict(os.environ, GENREP_FAST_BENCH_OUT=str(dest))
    rc, sec = _run(cmd, out / "logs" / "benchmarks.log", timeout, env=env)
    written = sorted(p.name for p in dest.glob("*.json"))
    return {"rc": rc, "log": "logs/benchmarks.log", "results": written}


def step_breakdown(out: Path, timeout: float, dry_run: bool) -> dict:
    """``tools/op_breakdown.py``: each kernel's device time and the host side of one shared-bank
    call at B=256, C=1000, T=100, D=4096, raw tensors against a prepared bank, and of the fused
    KL forward + backward (a smoke shape on a CPU)."""
    dest = out / "breakdown.json"
    cmd = [sys.executable, str(ROOT / "tools" / "op_breakdown.py"), "--kl", "--out", str(dest)]
    if dry_run:
        cmd += ["--calls", "1", "--precisions", "bf16"]
    rc, _ = _run(cmd, out / "logs" / "breakdown.log", timeout)
    return {"rc": rc, "log": "logs/breakdown.log", "results": [dest.name] if dest.exists() else []}


PROFILE = """
import sys, torch, genrep_fast as G
which = sys.argv[1]  # the workload: diff, diff_bf16, gemm, gemm_turned, kl or align
dev = "cuda" if torch.cuda.is_available() else "cpu"
big = dev == "cuda"
g = torch.Generator(device=dev).manual_seed(0)
if which == "align":
    # A DiT-XL/2-like list (28 blocks of width 1152: ~300 tensors, 675M parameters), one group
    # per block, fp32.
    sys.path.insert(0, "bench")
    from bench_alignment import dit_like_shapes
    shapes, groups = dit_like_shapes(1152 if big else 16, 28 if big else 2)
    ps = [torch.randn(s, device=dev, generator=g) for s in shapes]
    gs = [torch.randn(s, device=dev, generator=g) for s in shapes]
    def run():
        return G.align_gradients(ps, gs, groups=groups, out=ps)
elif which == "kl":
    # The fused KL at B=256, C=1000, forward and backward (the benchmark's case).
    b, c = (256, 1000) if big else (8, 10)
    logits = torch.randn(b, c, device=dev, generator=g).requires_grad_()
    ll = torch.randn(b, c, device=dev, generator=g) * 50
    def run():
        G.posterior_kl_loss(logits, ll).backward()
        logits.grad = None
elif which == "gemm_turned":
    # The fused GEMM kernel with its first turned tile (GemmConfig.IMAGES_ON_M: 256 images x 64
    # bank rows), forced: the tuner may keep another form. B=256, C=1000, T=100, D=4096, bf16,
    # the operands made once (a prepared bank's).
    from genrep_fast.kernels import mixture as M
    cfg = next(cfg for cfg in M.GEMM_CONFIGS if cfg.IMAGES_ON_M)
    b, c, t, d = (256, 1000, 100, 4096) if big else (2, 3, 5, 16)
    mu = torch.randn(c, t, d, device=dev, generator=g)
    sigma = torch.full((c, t), 60.0, device=dev)
    x = torch.randn(b, d, device=dev, generator=g)
    ops = M.gemm_operands(mu, sigma, "bf16")
    def run():
        return M.mixture_lse_gemm(x, mu, sigma, "bf16", ops, config=cfg)
else:
    if which.startswith("diff"):  # per-image bank, B=64, C=10, T=75, D=4096: memory-bound
        b, c, t, d = (64, 10, 75, 4096) if big else (2, 3, 5, 16)
        dtype = torch.bfloat16 if which == "diff_bf16" else torch.float32
        mu = torch.randn(b, c, t, d, device=dev, generator=g).to(dtype)
        precision = "ieee"
    else:  # shared bank, B=256, C=1000, T=100, D=4096, bf16 GEMM form
        b, c, t, d = (256, 1000, 100, 4096) if big else (2, 3, 5, 16)
        mu = torch.randn(c, t, d, device=dev, generator=g)
        precision = "bf16" if big else "ieee"
    x = torch.randn(b, d, device=dev, generator=g).to(mu.dtype)
    bank = G.prepare_bank(mu, torch.ones(t, device=dev) * 60.0) if which == "gemm" else mu
    sigma = None if which == "gemm" else torch.ones(t, device=dev)
    def run():
        return G.mixture_log_likelihood(x, bank, sigma, precision=precision, validate=False)
run()  # compiles, and times the autotuner's configs: outside the profiled range
if dev == "cuda":
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
run()  # the profiled launch(es), with the config the tuner chose
if dev == "cuda":
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
print("profiled", which, "on", dev)
"""

# (report name, workload of PROFILE, kernel-name regex for ncu): one launch each, with the config
# the autotuner chose (the profiled range starts after a first, tuning call).
# The fp32 difference kernel, the fused GEMM kernel and the group sums were profiled in
# bench/results/gpu-h100-20261126c; these are the kernels that run left unprofiled. The shared-bank
# profile catches whichever form the tuner chose: the fused kernel or the split form's epilogue;
# gemm_turned profiles the fused kernel's turned 256-image tile whatever the tuner chose.
PROFILES = (
    ("diff_bf16", "diff_bf16", "regex:_mixture_diff_kernel"),
    ("gemm", "gemm", "regex:_mixture_gemm_kernel|_gemm_lse_kernel"),
    ("gemm_turned", "gemm_turned", "regex:_mixture_gemm_kernel"),
    ("kl_fwd", "kl", "regex:_posterior_kl_fwd_kernel"),
    ("kl_bwd", "kl", "regex:_posterior_kl_bwd_kernel"),
    ("align_combine", "align", "regex:align_combine_kernel"),
)


def step_ncu(out: Path, timeout: float, dry_run: bool) -> dict:
    """Nsight Compute, full set, on the kernels of ``PROFILES`` (one launch each, with the
    tuner's config). Each report comes back as ``ncu_<name>.ncu-rep`` with its details page as
    CSV."""
    script = out / "ncu_target.py"  # not "profile.py": that would shadow the stdlib module
    script.write_text(PROFILE)
    ncu = shutil.which("ncu")
    start = time.monotonic()
    res: dict = {"rc": 0, "log": "logs/ncu.log", "reports": []}
    with open(out / "logs" / "ncu.log", "w"):
        pass
    for name, workload, kernels in PROFILES:
        left = timeout - (time.monotonic() - start)
        if left < 10:
            res.setdefault("skipped", f"out of time before {name}")
            break
        log = out / "logs" / f"ncu_{name}.log"
        if dry_run or ncu is None:
            rc, _ = _run([sys.executable, str(script), workload], log, left)
            why = "dry run" if dry_run else "ncu is not on PATH"
            res["skipped"] = f"{why}: profiled scripts run without ncu"
        else:
            rep = out / f"ncu_{name}"
            cmd = [ncu, "--set", "full", "--profile-from-start", "off", "-k", kernels]
            cmd += ["-c", "1", "-f", "-o", str(rep), sys.executable, str(script), workload]
            rc, sec = _run(cmd, log, left)
            if rc == 0:
                with open(out / f"ncu_{name}.csv", "w") as fh:
                    subprocess.run(
                        [ncu, "-i", f"{rep}.ncu-rep", "--page", "details", "--csv"],
                        stdout=fh,
                        stderr=subprocess.STDOUT,
                        timeout=max(10.0, left - sec),
                        check=False,
                    )
                res["reports"].append(f"{rep.name}.ncu-rep")
        res["rc"] = res["rc"] or rc
    return res


RUNNERS = {
    "install": step_install,
    "gpu_tests": step_gpu_tests,
    "benchmarks": step_benchmarks,
    "breakdown": step_breakdown,
    "ncu": step_ncu,
}


def _environment() -> dict:
    code = "import json; from genrep_fast.benchmarking import environment as e; import torch; "
    code += "print(json.dumps(e('cuda' if torch.cuda.is_available() else 'cpu')))"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    try:
        env = json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        env = {"error": res.stderr[-500:]}
    smi = shutil.which("nvidia-smi")
    if smi:
        q = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem"
        env["nvidia_smi"] = subprocess.run(
            [smi, f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    env["command"] = " ".join(["python tools/gpu_check.py", *sys.argv[1:]])
    return env


def _targets():
    """tools/gpu_targets.py (a sibling script, not a package module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_targets", Path(__file__).with_name("gpu_targets.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _markdown(summary: dict) -> str:
    env = summary["environment"]
    lines = [
        "# GPU check",
        "",
        f"Device: {env.get('device_name')} ({env.get('nvidia_smi', env.get('device'))}); torch "
        f"{env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, python "
        f"{env.get('python')}; commit {env.get('commit')}; {env.get('date')}.",
        f"Command: `{env.get('command')}`; dry run: {summary['dry_run']}; total "
        f"{summary['seconds']:.0f} s of a {summary['budget_s']:.0f} s budget.",
        "",
        "| step | exit code | seconds | notes |",
        "|---|---:|---:|---|",
    ]
    for name, res in summary["steps"].items():
        notes = res.get("skipped") or res.get("how") or ""
        if "counts" in res:
            notes = ", ".join(f"{k} {v}" for k, v in res["counts"].items())
        if res.get("results"):
            notes = "results: " + ", ".join(res["results"])
        lines.append(f"| {name} | {res.get('rc', '')} | {res.get('seconds', 0):.0f} | {notes} |")
    for name in summary["steps"].get("benchmarks", {}).get("results", []):
        md = Path(summary["out"]) / "bench" / Path(name).with_suffix(".md").name
        if md.exists():
            lines += ["", md.read_text()]
        results = Path(summary["out"]) / "bench" / name
        if results.exists():
            lines += ["", _targets().markdown(json.loads(results.read_text()))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    parser.add_argument("--dry-run", action="store_true", help="CPU, smoke shapes, no install/ncu")
    parser.add_argument("--budget-s", type=float, default=480.0, help="whole run (default 480)")
    parser.add_argument(
        "--steps", default=",".join(RUNNERS), help="comma-separated subset, run in this order"
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    wanted = [s for s in args.steps.split(",") if s]
    unknown = [s for s in wanted if s not in RUNNERS]
    if unknown:
        parser.error(f"--steps: unknown {unknown}; choose from {list(RUNNERS)}")
    summary = {"dry_run": args.dry_run, "budget_s": args.budget_s, "out": str(out), "steps": {}}
    limits = dict(STEPS)
    for name in wanted:  # in the order given (install first, whatever matters most next)
        limit = limits[name]
        left = args.budget_s - (time.monotonic() - start)
        if left < 20:
            summary["steps"][name] = {"skipped": f"budget spent ({left:.0f} s left)"}
            continue
        t0 = time.monotonic()
        print(f"[gpu_check] {name} (at most {min(limit, left):.0f} s) ...", flush=True)
        res = RUNNERS[name](out, min(limit, left), args.dry_run)
        res["seconds"] = time.monotonic() - t0
        summary["steps"][name] = res
        print(f"[gpu_check] {name}: {json.dumps(res)}", flush=True)
        if name == "install" and res.get("rc", 0) != 0:
            break  # nothing else can run without the package
    summary["environment"] = _environment()
    summary["seconds"] = time.monotonic() - start
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(_markdown(summary))
    print((out / "summary.md").read_text())
    failed = [n for n, r in summary["steps"].items() if r.get("rc", 0) not in (0, None)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
