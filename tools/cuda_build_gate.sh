#!/usr/bin/env bash
# CUDA build gate: builds genrep_fast._C with its CUDA kernels (FORCE_CUDA=1) against a CUDA torch
# in a side virtual environment, installs the wheel there, imports it (no GPU needed) and checks
# with `python -m genrep_fast.check_build --require-cuda` that every op has the kernels its entry
# in genrep_fast/check_build.py DEVICE_CONTRACT lists. Exit status 0: the gate passed.
#
# It builds the working tree as it is (uncommitted edits included), from a copy, so the build/
# folder and the genrep_fast/_C*.so of your own (CPU) install are left alone.
#
# Environment (all optional):
#   GENREP_CUDA_VENV       the side venv (default: .venv-cuda in the repository); reused when present
#   GENREP_CUDA_TORCH      the torch requirement installed there (default: torch==2.14.1, CUDA 13.0)
#   TORCH_CUDA_ARCH_LIST   the GPU architectures built (default: "8.0;9.0", A100 and H100/H200)
#   MAX_JOBS               parallel compile jobs (default: the number of cores)
#   CUDA_HOME              the CUDA toolkit; needs an nvcc of the CUDA major version of that torch
#   GENREP_PREBUILT_OUT    also copy the checked _C*.so there (the prebuilt extension that
#                          tools/gpu_check.py installs on a GPU machine, e.g. .gpu-prebuilt)
#
# Prebuilding for a GPU machine with torch 2.11.0 + CUDA 13.0 (sm_90):
#   GENREP_CUDA_VENV=$HOME/.cache/genrep-gpu-venv GENREP_CUDA_TORCH=torch==2.11.0 \
#   TORCH_CUDA_ARCH_LIST=9.0 GENREP_PREBUILT_OUT=.gpu-prebuilt tools/cuda_build_gate.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${GENREP_CUDA_VENV:-$root/.venv-cuda}"
torch_req="${GENREP_CUDA_TORCH:-torch==2.14.1}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# The copy of the sources and its build folder (kept between runs: ninja recompiles only what
# changed); the wheel goes to dist/ inside it.
work="$venv/genrep-build"

fail() {
    echo "cuda_build_gate: FAIL: $*" >&2
    exit 1
}
step() { echo "cuda_build_gate: $* ($(date +%T))"; }

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
fi
nvcc="${CUDA_HOME:+$CUDA_HOME/bin/}nvcc"
command -v "$nvcc" >/dev/null || fail "no nvcc (set CUDA_HOME to a CUDA toolkit)"
nvcc_version="$("$nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')"

if ! "$venv/bin/python" -c "import sys, ninja, numpy, torch; sys.exit(torch.version.cuda is None)" \
    2>/dev/null; then
    step "installing $torch_req, ninja and numpy into $venv"
    python3 -m venv "$venv"
    # numpy only silences torch's "Failed to initialize NumPy" warning.
    { "$venv/bin/python" -m pip install -q --upgrade pip &&
        "$venv/bin/python" -m pip install -q "$torch_req" ninja numpy; } >"$venv/install.log" 2>&1 || {
        tail -20 "$venv/install.log" >&2
        fail "installing $torch_req into $venv failed (full log: $venv/install.log)"
    }
fi
torch_cuda="$("$venv/bin/python" -c "import torch; print(torch.version.cuda or '')")"
[ -n "$torch_cuda" ] || fail "the torch in $venv is a CPU build: remove $venv or set GENREP_CUDA_TORCH"
[ "${torch_cuda%%.*}" = "${nvcc_version%%.*}" ] ||
    fail "torch in $venv is built for CUDA $torch_cuda but $nvcc is CUDA $nvcc_version"
step "torch $("$venv/bin/python" -c "import torch; print(torch.__version__)") (CUDA $torch_cuda), nvcc $nvcc_version, arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs"

# Copy the files git would see (tracked, and untracked unless ignored), keeping their times so
# that an unchanged source is not recompiled. A file deleted from the tree goes from the copy too.
mkdir -p "$work"
find "$work" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
# The side venv is left out when it lies in the tree without being ignored.
venv_rel="$(realpath -m --relative-to="$root" "$venv")/"
(cd "$root" && git ls-files -z --cached --others --exclude-standard |
    { grep -zv "^${venv_rel//./\\.}" || true; } |
    tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xpf - -C "$work"

step "building the wheel with FORCE_CUDA=1"
start=$SECONDS
(cd "$work" && FORCE_CUDA=1 "$venv/bin/python" -m pip wheel -q . --no-build-isolation --no-deps \
    -w dist) >"$venv/build.log" 2>&1 || {
    tail -40 "$venv/build.log" >&2
    fail "the CUDA build failed (full log: $venv/build.log)"
}
wheel="$(ls "$work"/dist/genrep_fast-*.whl)"
step "built $(basename "$wheel") ($(du -h "$wheel" | cut -f1)) in $((SECONDS - start)) s"
"$venv/bin/python" -m pip install -q --no-deps --force-reinstall "$wheel"

# From a folder outside the repository, so the installed package is imported, not the sources.
cd "$venv"
"$venv/bin/python" -m genrep_fast.check_build --require-cuda ||
    fail "the CUDA build does not register the kernels it should (see above)"
if [ -n "${GENREP_PREBUILT_OUT:-}" ]; then
    out="$(cd "$root" && mkdir -p "$GENREP_PREBUILT_OUT" && cd "$GENREP_PREBUILT_OUT" && pwd)"
    so="$("$venv/bin/python" -c "import genrep_fast._C as c; print(c.__file__)")"
    cp "$so" "$out/"
    echo "torch $("$venv/bin/python" -c "import torch; print(torch.__version__)") arch $TORCH_CUDA_ARCH_LIST" \
        >"$out/BUILD.txt"
    step "prebuilt extension: $out/$(basename "$so")"
fi
step "passed"
