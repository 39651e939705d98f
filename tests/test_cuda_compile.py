"""Every csrc/cuda/*.cu compiles with nvcc against the installed torch's headers, for sm_80 (A100)
and sm_90 (H100/H200), with the flags torch.utils.cpp_extension uses for a CUDA build.

This catches CUDA build breaks on a machine without a GPU or a CUDA torch: the objects are not
linked (a CPU torch has no CUDA libraries to link against) and nothing runs. The runtime checks of
the kernels are the @pytest.mark.gpu tests in test_alignment_ops.py.
"""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_ext

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc") or (
    "/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None
)


def _std_flag() -> str:
    # The C++ standard this torch's extension builder passes (c++20 from torch 2.12 on, c++17
    # before); compiling with it keeps the check faithful to `pip install -e .`.
    return "-std=c++20" if "-std=c++20" in inspect.getsource(cpp_ext) else "-std=c++17"


def _shim_dir(tmp_path: Path) -> Path:
    # A CPU build of torch ships c10/cuda headers without the cmake-generated
    # c10/cuda/impl/cuda_cmake_macros.h; a CUDA build has it. Its whole content is one define.
    shim = tmp_path / "shim"
    header = shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    header.parent.mkdir(parents=True)
    header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return shim


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.skipif(not CUDA_SOURCES, reason="no csrc/cuda/*.cu sources")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles(source: Path, tmp_path: Path):
    includes = [f"-I{p}" for p in cpp_ext.include_paths()]
    have_macros = any(
        (Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists()
        for p in cpp_ext.include_paths()
    )
    if not have_macros:
        includes.append(f"-I{_shim_dir(tmp_path)}")
    cmd = [
        NVCC,
        "-c",
        str(source),
        "-o",
        str(tmp_path / (source.stem + ".o")),
        *includes,
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{ROOT / 'csrc'}",
        _std_flag(),
        "-O3",
        "--compiler-options",
        "-fPIC",
        "-DGENREP_FAST_WITH_CUDA=1",
        "-DTORCH_EXTENSION_NAME=_C",
        *cpp_ext.COMMON_NVCC_FLAGS,
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    assert res.returncode == 0, f"nvcc failed for {source.name}:\n{res.stderr[-6000:]}"
    assert (tmp_path / (source.stem + ".o")).stat().st_size > 0
