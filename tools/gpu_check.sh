#!/usr/bin/env bash
# The one command for a borrowed GPU machine (see tools/gpu_check.py and README "Checking on a
# GPU"): install with the prebuilt extension when .gpu-prebuilt/ is there, GPU tests, realistic
# benchmarks, one ncu profile; results under $OUT (or gpu_check_out/). Arguments pass through
# (--dry-run, --budget-s, --steps, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 tools/gpu_check.py "$@"
