"""A build that cannot see torch (an isolated ``pip wheel .``, ``python -m build``) makes a
pure-Python wheel with a warning, or fails on request (``GENREP_FAST_REQUIRE_EXTENSION=1``).

The build runs setuptools' PEP 517 hook in a subprocess where ``import torch`` fails, on a copy of
the files a build reads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md")
BUILD_DIRS = ("genrep_fast", "kernels", "configs", "csrc")

# sys.modules["torch"] = None makes `import torch` raise ImportError, as in a build environment
# without torch.
BUILD_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
from setuptools import build_meta
print(build_meta.build_wheel(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in BUILD_INPUTS:
        shutil.copy2(ROOT / name, src / name)
    for name in BUILD_DIRS:
        shutil.copytree(
            ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
        )
    return src


def _build(src: Path, out: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENREP_FAST_")}
    return subprocess.run(
        [sys.executable, "-c", BUILD_WITHOUT_TORCH, str(out)],
        cwd=src,
        env=dict(env, **env_vars),
        capture_output=True,
        text=True,
    )


def test_build_without_torch_makes_a_pure_python_wheel(source_copy, tmp_path):
    res = _build(source_copy, tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "compiled extension" in res.stderr and "--no-build-isolation" in res.stderr
    (wheel,) = tmp_path.glob("genrep_fast-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = zf.read(metadata).decode()
    assert not any("/_C" in n for n in names)
    assert "genrep_fast/kernels/mixture.py" in names
    assert "genrep_fast/configs/tiny_digits.yaml" in names
    assert "genrep_fast/check_build.py" in names
    assert any(line.startswith("License") and "Apache-2.0" in line for line in meta.splitlines())


def test_required_extension_without_torch_fails(source_copy, tmp_path):
    res = _build(source_copy, tmp_path, GENREP_FAST_REQUIRE_EXTENSION="1")
    assert res.returncode != 0
    assert "GENREP_FAST_REQUIRE_EXTENSION=1 but torch is not installed" in res.stderr
    assert not list(tmp_path.glob("*.whl"))
