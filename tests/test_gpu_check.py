"""The one-command GPU check (tools/gpu_check.py), run as a CPU dry run at smoke shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_dry_run_writes_results_in_the_bench_format(tmp_path):
    res = _run("--dry-run", "--out", str(tmp_path), "--steps", "gpu_tests,benchmarks,breakdown,ncu")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    steps = summary["steps"]
    assert set(steps) == {"gpu_tests", "benchmarks", "breakdown", "ncu"}
    # The per-kernel breakdown of one call, raw bank and prepared bank.
    breakdown = json.loads((tmp_path / "breakdown.json").read_text())
    assert set(breakdown["cases"]) == {"bf16 raw", "bf16 prepared", "kl fwd+bwd"}
    assert all(c["kernels"] and c["host_ms_per_call"] > 0 for c in breakdown["cases"].values())
    assert all(c["host_functions"] for c in breakdown["cases"].values())
    assert all(s["rc"] == 0 for s in steps.values()), steps
    # The GPU tests were collected (and skipped: no CUDA here), and reported.
    counts = steps["gpu_tests"]["counts"]
    assert counts["tests"] >= 5 and counts["skipped"] == counts["tests"], counts
    # Benchmark results in bench/results' format, with device, versions, commit and command.
    (name,) = steps["benchmarks"]["results"]
    data = json.loads((tmp_path / "bench" / name).read_text())
    env = data["environment"]
    for key in ("device_name", "torch", "triton", "commit", "command", "date"):
        assert env.get(key), key
    assert "bench_posterior.py" in env["command"]
    cases = {r["case"] for r in data["records"]}
    assert {"per_image_float32", "per_image_bfloat16"} <= cases, cases
    assert (tmp_path / "bench" / name.replace(".json", ".md")).exists()
    # Each profiled script (bf16 diff, shared bank, the turned GEMM tile, KL, alignment) ran to
    # its end (without ncu).
    for name, workload in (("diff_bf16", "diff_bf16"), ("gemm", "gemm"),
                           ("gemm_turned", "gemm_turned"), ("kl_fwd", "kl"),
                           ("kl_bwd", "kl"), ("align_combine", "align")):  # fmt: skip
        log = (tmp_path / "logs" / f"ncu_{name}.log").read_text()
        assert f"profiled {workload} on cpu" in log, log[-2000:]
    env = summary["environment"]
    assert env["command"].startswith("python tools/gpu_check.py --dry-run")
    md = (tmp_path / "summary.md").read_text()
    assert "| gpu_tests | 0 |" in md and "per_image_float32" in md
    # The targets table (tools/gpu_targets.py) from the smoke results; cases the dry run skips
    # read "not measured".
    assert "Targets (issue 15)" in md and "| per-image bank B=64 fp32" in md
    assert "not measured" in md


def test_budget_and_bad_steps(tmp_path):
    res = _run("--dry-run", "--out", str(tmp_path), "--steps", "ncu", "--budget-s", "5")
    assert res.returncode == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"]["ncu"]["skipped"].startswith("budget spent")
    res = _run("--dry-run", "--out", str(tmp_path), "--steps", "gpu_tests,nope")
    assert res.returncode == 2 and "--steps: unknown ['nope']" in res.stderr
