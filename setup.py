"""Build of genrep_fast and its compiled extension ``genrep_fast._C``.

Install torch first, then ``pip install -e . --no-build-isolation``. The extension is compiled
against the torch that is installed:

* CPU-only torch: a C++ extension (OpenMP) with the CPU kernels of ``csrc/*.cpp``;
* CUDA torch with nvcc: the same plus ``csrc/cuda/*.cu``.

Without torch in the build environment (an isolated build: ``pip wheel .``, ``pip install .``
without ``--no-build-isolation``, ``python -m build``) the package is built without the extension,
with a warning: a pure-Python wheel whose ops fall back to torch.

Environment: ``FORCE_CUDA=1`` builds the CUDA sources even when no GPU is visible;
``TORCH_CUDA_ARCH_LIST`` picks the architectures (default "8.0;9.0" when no GPU is visible);
``MAX_JOBS`` bounds the parallel compile jobs (read by torch's ninja build);
``GENREP_FAST_NO_EXTENSION=1`` skips the extension (pure-Python install; ops fall back to torch);
``GENREP_FAST_REQUIRE_EXTENSION=1`` makes a build that cannot compile it (no torch) an error.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

import setuptools
from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import (
        CUDA_HOME,
        BuildExtension,
        CppExtension,
        CUDAExtension,
    )
except ImportError:
    torch = None

HERE = os.path.dirname(os.path.abspath(__file__))
SETUPTOOLS_VERSION = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())

NO_TORCH_WARNING = """
################################################################################################
genrep_fast: torch is not installed in this build environment, so the compiled extension
genrep_fast._C is NOT built. This is a pure-Python build: every op falls back to torch (slower on
CPU, and no CUDA gradient-alignment kernels). An isolated build (`pip wheel .`, `pip install .`
without --no-build-isolation, `python -m build`) never sees torch, on purpose. To compile the
extension, install torch first, then build against it:
    pip install torch && pip install -e . --no-build-isolation
`python -m genrep_fast.check_build` says whether an install has the extension.
(GENREP_FAST_NO_EXTENSION=1 builds without it on purpose, without this warning;
GENREP_FAST_REQUIRE_EXTENSION=1 turns this case into an error.)
################################################################################################
"""


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _check_bdist_wheel() -> None:
    # setuptools < 70.1 has no bdist_wheel of its own: it comes from the `wheel` package, which an
    # isolated build installs (build-system.requires) and a fresh venv lacks. Without it pip fails
    # with "invalid command 'bdist_wheel'"; this says what to install (pip shows it on failure).
    if SETUPTOOLS_VERSION < (70, 1) and importlib.util.find_spec("wheel") is None:
        print(
            f"genrep_fast: setuptools {setuptools.__version__} needs the `wheel` package to build"
            " a wheel; `pip install 'setuptools>=77'` (or `pip install wheel`), then retry.",
            file=sys.stderr,
        )


def _license() -> dict:
    # The license is set here, not in pyproject.toml: setuptools >= 77 reads `license = "..."`
    # there as an SPDX expression, while setuptools 61-76 (a venv of Python <= 3.11 bundles 65.5)
    # rejects that string; its table form is deprecated from 77 on. Declared dynamic in
    # pyproject.toml.
    if SETUPTOOLS_VERSION >= (77,):
        return {"license_expression": "Apache-2.0"}
    return {"license": "Apache-2.0"}


def _want_cuda() -> bool:
    # torch.version.cuda is None for a CPU build of torch: its libraries cannot link CUDA code.
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return _flag("FORCE_CUDA") or torch.cuda.is_available()


def _extensions():
    if _flag("GENREP_FAST_NO_EXTENSION"):
        return []
    if torch is None:
        if _flag("GENREP_FAST_REQUIRE_EXTENSION"):
            sys.exit(
                "genrep_fast: GENREP_FAST_REQUIRE_EXTENSION=1 but torch is not installed in this"
                " build environment. Install torch first, then build with --no-build-isolation."
            )
        print(NO_TORCH_WARNING, file=sys.stderr)
        return []
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # Headers are not sources: without them here, editing only a header would leave the extension
    # "up to date" and unbuilt.
    headers = sorted(glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True))
    headers += sorted(glob.glob(os.path.join("csrc", "**", "*.cuh"), recursive=True))
    # No -std flag: torch.utils.cpp_extension adds the standard its own headers need.
    cxx_flags = ["-O3"]
    link_flags = []
    if sys.platform.startswith("linux"):
        cxx_flags += ["-fopenmp"]
        link_flags += ["-fopenmp"]
    if not _want_cuda():
        return [
            CppExtension(
                "genrep_fast._C",
                cpp_sources,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
                depends=headers,
                py_limited_api=True,
            )
        ]
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # No GPU to query: build for A100 (sm_80) and H100/H200 (sm_90).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    return [
        CUDAExtension(
            "genrep_fast._C",
            cpp_sources + cuda_sources,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "-lineinfo"],
            },
            extra_link_args=link_flags,
            define_macros=[("GENREP_FAST_WITH_CUDA", "1")],
            depends=headers,
            py_limited_api=True,
        )
    ]


ext_modules = _extensions()

_check_bdist_wheel()
setup(
    # `kernels/` sits at the top level of the repository but installs as genrep_fast.kernels,
    # so no top-level `kernels` module lands in site-packages.
    # The YAML configs likewise install as genrep_fast/configs/*.yaml (package data).
    packages=find_packages(include=["genrep_fast", "genrep_fast.*"])
    + ["genrep_fast.kernels", "genrep_fast.configs"],
    package_dir={"genrep_fast.kernels": "kernels", "genrep_fast.configs": "configs"},
    package_data={"genrep_fast.configs": ["*.yaml"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)} if ext_modules else {},
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
    zip_safe=False,
    **_license(),
)
