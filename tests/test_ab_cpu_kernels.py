"""tools/ab_cpu_kernels.py: each side's kernel file registers under its own namespace beside the
headers it includes, and bad arguments stop it before it compiles anything. (Its timing run
builds a JIT module: run by hand.)"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "ab_cpu_kernels.py"


def _tool():
    spec = importlib.util.spec_from_file_location("ab_cpu_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kernel", ["alignment", "mixture"])
def test_each_side_registers_its_own_namespace(kernel, tmp_path):
    tool = _tool()
    sources = tool._sources(tool.KERNELS[kernel], "HEAD", tmp_path)
    schemas, base, head = (Path(s).read_text() for s in sources)
    for side, text in (("base", base), ("head", head)):
        assert f"TORCH_LIBRARY_IMPL(genrep_ab_{side}, CPU, m)" in text
        assert "TORCH_LIBRARY_IMPL(genrep_fast" not in text
        assert f"TORCH_LIBRARY(genrep_ab_{side}, m)" in schemas
    # Each side compiles against its own copies of the headers it includes.
    for src in sources[1:]:
        text = Path(src).read_text()
        local = [line.split('"')[1] for line in text.splitlines() if line.startswith('#include "')]
        assert local and all((Path(src).parent / h).exists() for h in local), (src, local)


def test_every_op_the_kernel_file_registers_has_a_schema():
    # A kernel file that registers an op the tool does not declare fails to load.
    tool = _tool()
    for kernel in tool.KERNELS.values():
        text = (ROOT / kernel.source).read_text()
        impl = text[text.index("TORCH_LIBRARY_IMPL(genrep_fast, CPU, m)") :]
        ops = {line.split('"')[1] for line in impl.splitlines() if 'm.impl("' in line}
        declared = {s.split("(")[0] for s in kernel.schemas}
        assert ops == declared, (kernel.source, ops, declared)


def test_bad_arguments_are_named():
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--base", "HEAD", "--reps", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert "--reps" in res.stderr and "got 0" in res.stderr
