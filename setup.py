"""Build of genrep_fast and its compiled extension ``genrep_fast._C``.

Install torch first, then ``pip install -e . --no-build-isolation``. The extension is compiled
against the torch that is installed:

* CPU-only torch: a C++ extension (OpenMP) with the CPU kernels of ``csrc/*.cpp``;
* CUDA torch with nvcc: the same plus ``csrc/cuda/*.cu``.

Environment: ``FORCE_CUDA=1`` builds the CUDA sources even when no GPU is visible;
``TORCH_CUDA_ARCH_LIST`` picks the architectures (default "8.0;9.0" when no GPU is visible);
``MAX_JOBS`` bounds the parallel compile jobs (read by torch's ninja build);
``GENREP_FAST_NO_EXTENSION=1`` skips the extension (pure-Python install; ops fall back to torch).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import (
        CUDA_HOME,
        BuildExtension,
        CppExtension,
        CUDAExtension,
    )
except ImportError:  # pragma: no cover - exercised only on a machine without torch
    sys.exit(
        "genrep_fast: torch is not installed. Install torch first (e.g. `pip install torch==2.13.0`),"
        " then `pip install -e . --no-build-isolation`."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    # torch.version.cuda is None for a CPU build of torch: its libraries cannot link CUDA code.
    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    return _flag("FORCE_CUDA") or torch.cuda.is_available()


def _extensions():
    if _flag("GENREP_FAST_NO_EXTENSION"):
        return []
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
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
            py_limited_api=True,
        )
    ]


ext_modules = _extensions()

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
)
