"""Fixtures of the benchmark suites: mode (smoke / realistic), device, and the results writer.

With ``--benchmark`` the session's results go to ``bench/results/<device>-<date>.json`` with a
markdown table and a PNG plot beside them; in smoke mode they go to a temporary folder (the report
is still written, so the report code runs in CI too). ``GENREP_FAST_BENCH_OUT=DIR`` writes the
results of either mode to DIR instead (tools/gpu_check.py uses it).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path

import pytest
import torch

from genrep_fast.benchmarking import Results, environment, write_report

RESULTS_DIR = Path(__file__).parent / "results"


@pytest.fixture(scope="session")
def realistic(request: pytest.FixtureRequest) -> bool:
    """True with --benchmark: realistic shapes; False: small smoke shapes."""
    return bool(request.config.getoption("--benchmark"))


@pytest.fixture(scope="session")
def bench_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def results(realistic: bool, bench_device: str, tmp_path_factory: pytest.TempPathFactory):
    res = Results(device=bench_device, mode="realistic" if realistic else "smoke")
    yield res
    if not res.records:
        return
    out_dir = os.environ.get("GENREP_FAST_BENCH_OUT")
    if realistic or out_dir:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", environment(bench_device)["device_name"]).strip("-")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(out_dir or RESULTS_DIR) / f"{slug}-{stamp}.json"
    else:
        path = tmp_path_factory.mktemp("bench") / "smoke.json"
    from genrep_fast.kernels import tuning

    # The autotuner's measurements behind each config it chose (empty off CUDA).
    res.tuning = tuning.report()
    res.write(path)
    md, png = write_report(path)
    print(f"\nbenchmark results: {path}\n{md.read_text()}")
