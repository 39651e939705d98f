"""nvtx_range works with and without the nvtx package; the benchmark harness writes a report."""

from __future__ import annotations

import json
import time

import pytest
import torch

from genrep_fast import benchmarking, profiling


def test_nvtx_range_context_and_decorator():
    calls = []

    @profiling.nvtx_range("decorated")
    def f(x):
        calls.append(x)
        return x + 1

    with profiling.nvtx_range("outer"):
        assert f(1) == 2

    @profiling.annotate()
    def g():
        return "ok"

    assert g() == "ok" and g.__name__ == "g"
    assert calls == [1]
    with pytest.raises(ValueError, match="name"):
        profiling.nvtx_range("")


def test_nvtx_range_does_not_swallow_exceptions():
    with pytest.raises(KeyError), profiling.nvtx_range("boom"):
        raise KeyError("x")


def test_time_fn_and_limits_are_positive():
    a = torch.randn(64, 64)
    sec = benchmarking.time_fn(lambda: a @ a, min_time_s=0.01)
    assert 0 < sec < 1
    assert benchmarking.copy_bandwidth("cpu", nbytes=8 * 2**20) > 1e8  # > 0.1 GB/s on any CPU
    assert benchmarking.gemm_seconds(32, 32, 32, torch.float32) > 0


@pytest.mark.gpu
def test_time_fn_on_cuda_hides_host_latency_unless_asked():
    # A GPU-bound op (a 4096^2 matmul) times alike back to back and synced per call; a host-bound
    # one (2 ms of host work before a tiny kernel) is counted back to back too, never hidden; and
    # a slow op runs about min_time_s worth of calls, not max_reps (the run is sized first).
    a = torch.randn(4096, 4096, device="cuda")
    gpu_bound = benchmarking.time_fn(lambda: a @ a, device="cuda", min_time_s=0.05)
    synced = benchmarking.time_fn(lambda: a @ a, device="cuda", min_time_s=0.05, sync_each=True)
    assert 0.5 < gpu_bound / synced < 1.5, (gpu_bound, synced)

    def host_bound():
        time.sleep(0.002)
        return a[:8] + 1

    assert benchmarking.time_fn(host_bound, device="cuda", min_reps=5, min_time_s=0.0) > 0.0015
    calls = []

    def slow():
        calls.append(1)
        torch.cuda._sleep(30_000_000)  # ~15-30 ms of GPU spinning

    benchmarking.time_fn(slow, device="cuda", warmup=0, min_reps=3, min_time_s=0.1)
    assert len(calls) <= 1 + 10, len(calls)


def test_results_json_table_and_plot(tmp_path):
    res = benchmarking.Results(device="cpu", mode="smoke")
    recs = res.add(
        "suite",
        "case",
        {"fast": 0.001, "reference": 0.004},
        baseline="reference",
        bytes_moved=1e6,
        flops=2e6,
        gemm_time=0.0005,
        peak_memory={"fast": 2**20, "reference": 2**22},
    )
    assert recs[0].speedup == pytest.approx(4.0)
    assert recs[0].gemm_fraction == pytest.approx(0.5)
    path = res.write(tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["environment"]["torch"] == torch.__version__
    assert {"device_name", "commit", "command"} <= set(data["environment"])
    md, png = benchmarking.write_report(path)
    table = md.read_text()
    assert "| suite | case |  | fast |" in table and "4.00x vs reference" in table
    assert table.startswith("**Smoke shapes**")  # smoke ratios are not read as performance
    res.mode = "realistic"
    res.records[0].params = {"B": 64, "D": 4096}
    realistic = benchmarking.markdown_table(res.to_json())
    assert realistic.startswith("**Realistic shapes**") and "| B=64, D=4096 |" in realistic
    assert "Autotuner choices" not in realistic  # no tuned launch: no table
    res.tuning = [
        {
            "kernel": "k",
            "key": [75, 4096],
            "device": "cuda:0",
            "chosen": 1,
            "ms": [2.0, 1.5, None],
            "configs": [{"BLOCK_D": 16}, {"BLOCK_D": 32}, {"BLOCK_D": 64}],
        }
    ]
    tuned = benchmarking.markdown_table(json.loads(json.dumps(res.to_json())))
    assert "| k | [75, 4096] | #1: BLOCK_D=32 | 2 / 1.5 / - |" in tuned
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="baseline"):
        res.add("s", "c", {"fast": 1.0}, baseline="eager")
