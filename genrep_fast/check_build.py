"""``python -m genrep_fast.check_build`` (also ``genrep-fast check-build``): is the compiled
extension ``genrep_fast._C`` installed, and does it register the kernels it should?

Prints each op the extension declares (``TORCH_LIBRARY(genrep_fast, m)`` in
csrc/registration.cpp) with the devices that have a kernel for it, and checks them against
``DEVICE_CONTRACT``. Exit status 0: the build is complete. Exit status 1: the extension is missing
or fails to load (every op would silently fall back to torch), or an op breaks the contract:

* every op has a CPU kernel;
* a build with CUDA kernels (``FORCE_CUDA=1``, or a visible GPU, with a CUDA torch and nvcc) has a
  CUDA kernel for every op whose contract lists CUDA, and none for an op whose contract does not.

``--require-cuda`` also fails a build without CUDA kernels (tools/cuda_build_gate.sh uses it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys

import torch

# The devices that implement each op of the compiled library, one entry per op declared in
# csrc/registration.cpp. A new op needs an entry here (the check fails without one).
DEVICE_CONTRACT: dict[str, tuple[str, ...]] = {
    "group_sums": ("CPU", "CUDA"),  # csrc/alignment_cpu.cpp, csrc/cuda/alignment_cuda.cu
    "align_combine": ("CPU", "CUDA"),  # csrc/alignment_cpu.cpp, csrc/cuda/alignment_cuda.cu
    # csrc/grad_layout.cpp; metadata only, the same function registered for CUDA in
    # csrc/cuda/alignment_cuda.cu
    "grad_layout": ("CPU", "CUDA"),
    # CPU only (csrc/mixture_cpu.cpp): on CUDA the mixture likelihood runs the Triton kernels of
    # genrep_fast.kernels.
    "mixture_ll_diff": ("CPU",),
    "mixture_ll_diff_backward": ("CPU",),
}
DEVICES = ("CPU", "CUDA")
LIBRARY = "genrep_fast"

# Run in a fresh interpreter that loads only torch and the shared object: there the library's ops
# are exactly those the extension declares, without the Python custom ops of genrep_fast.posterior
# that share the namespace.
_INVENTORY_SCRIPT = """
import json, sys, torch
torch.ops.load_library(sys.argv[1])
has = torch._C._dispatch_has_kernel_for_dispatch_key
names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith(sys.argv[2] + "::")]
print(json.dumps({n.split("::", 1)[1]: [d for d in sys.argv[3:] if has(n, d)] for n in names}))
"""


def extension_path() -> str | None:
    """Path of the installed ``genrep_fast._C`` shared object, or None when there is none."""
    spec = importlib.util.find_spec("genrep_fast._C")
    return spec.origin if spec is not None else None


def kernel_inventory(path: str) -> dict[str, list[str]]:
    """``{op name: devices with a kernel}`` for every op the shared object at ``path`` declares."""
    res = subprocess.run(
        [sys.executable, "-c", _INVENTORY_SCRIPT, path, LIBRARY, *DEVICES],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise RuntimeError(f"loading {path} failed:\n{res.stderr.strip()}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def contract_problems(inventory: dict[str, list[str]], require_cuda: bool = False) -> list[str]:
    """What is wrong with ``inventory`` (as ``kernel_inventory`` returns it), one line each;
    an empty list when it meets ``DEVICE_CONTRACT``."""
    problems = []
    cuda_built = any("CUDA" in devices for devices in inventory.values())
    if require_cuda and not cuda_built:
        problems.append(
            "no op has a CUDA kernel: the extension was built without csrc/cuda/*.cu (build with "
            "FORCE_CUDA=1, a CUDA torch and an nvcc of the same CUDA major version)"
        )
    for name in sorted(set(DEVICE_CONTRACT) - set(inventory)):
        problems.append(
            f"{LIBRARY}::{name} is in DEVICE_CONTRACT but the extension does not declare it "
            "(a stale build: rebuild; or a removed op: drop its entry)"
        )
    for name, devices in sorted(inventory.items()):
        expected = DEVICE_CONTRACT.get(name)
        if expected is None:
            problems.append(
                f"{LIBRARY}::{name} is declared (csrc/registration.cpp) but has no entry in "
                f"DEVICE_CONTRACT (genrep_fast/check_build.py): list the devices that implement it"
            )
            continue
        if "CPU" not in devices:
            problems.append(
                f"{LIBRARY}::{name} has no CPU kernel: no TORCH_LIBRARY_IMPL({LIBRARY}, CPU, m) "
                "in csrc/*.cpp registers it"
            )
        if cuda_built and "CUDA" in expected and "CUDA" not in devices:
            problems.append(
                f"{LIBRARY}::{name} has no CUDA kernel in a CUDA build (expected "
                f"{', '.join(expected)}): no TORCH_LIBRARY_IMPL({LIBRARY}, CUDA, m) in "
                "csrc/cuda/*.cu registers it"
            )
        if "CUDA" in devices and "CUDA" not in expected:
            problems.append(
                f"{LIBRARY}::{name} has a CUDA kernel that DEVICE_CONTRACT does not list: add "
                "CUDA to its entry"
            )
    return problems


def _table(inventory: dict[str, list[str]]) -> str:
    width = max([len(n) for n in inventory] + [2])
    rows = [f"  {'op':<{width}}  " + "  ".join(f"{d:<4}" for d in DEVICES) + "  expected"]
    for name, devices in sorted(inventory.items()):
        marks = "  ".join(f"{'yes' if d in devices else '-':<4}" for d in DEVICES)
        expected = ", ".join(DEVICE_CONTRACT.get(name, ("?",)))
        rows.append(f"  {name:<{width}}  {marks}  {expected}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m genrep_fast.check_build", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--require-cuda", action="store_true", help="fail unless the CUDA kernels were built"
    )
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    path = extension_path()
    if path is None:
        print(
            "FAIL: genrep_fast._C is not installed: every op falls back to torch. Install torch "
            "first, then `pip install -e . --no-build-isolation` (a C++ compiler and the Python "
            "headers are needed; see the README's Install section).",
            file=sys.stderr,
        )
        return 1
    print(f"genrep_fast._C: {path}")
    try:
        inventory = kernel_inventory(path)
        import genrep_fast._C  # noqa: F401  (the import genrep_fast._ops makes, with its error)
    except (RuntimeError, ImportError) as exc:
        print(f"FAIL: genrep_fast._C does not load: {exc}", file=sys.stderr)
        return 1
    print(_table(inventory))
    problems = contract_problems(inventory, require_cuda=args.require_cuda)
    if problems:
        for p in problems:
            print(f"FAIL: {p}", file=sys.stderr)
        return 1
    cuda = any("CUDA" in d for d in inventory.values())
    print(f"ok: {len(inventory)} ops, CPU kernels" + (" and CUDA kernels" if cuda else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
