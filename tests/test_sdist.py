"""A source release builds: the sdist carries every file of csrc/, kernels/ and configs/, and a wheel
built from it in a fresh venv (torch==2.13.0, ``--no-build-isolation``) installs a
``genrep_fast._C`` that loads and registers the ops.

Slow (a venv, a torch install and a compile: minutes on two cores), and part of the plain
``pytest`` run that CI makes. The sdist is built without torch's help
(``GENREP_FAST_NO_EXTENSION=1``), as an isolated ``python -m build --sdist`` is: only MANIFEST.in
puts the C++ and CUDA sources in it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from genrep_fast.check_build import DEVICE_CONTRACT

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("csrc", "kernels", "configs")
TORCH = os.environ.get("GENREP_SDIST_TEST_TORCH", "torch==2.13.0")

# Run by the fresh venv's python from a folder outside the repository: the installed package,
# its compiled extension and the ops it registers.
IMPORT_CHECK = """
import sys, torch, genrep_fast, genrep_fast._C
assert genrep_fast._ops.HAS_EXTENSION
assert genrep_fast._C.__file__.startswith(sys.prefix), genrep_fast._C.__file__
print(" ".join(sorted(n for n in sys.argv[1:] if hasattr(torch.ops.genrep_fast, n))))
"""


def _run(cmd, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert res.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    )
    return res


def _source_files() -> set[str]:
    files = set()
    for top in SHIPPED:
        for p in (ROOT / top).rglob("*"):
            if (
                p.is_file()
                and "__pycache__" not in p.parts
                and p.suffix not in (".pyc", ".so", ".o")
            ):
                files.add(p.relative_to(ROOT).as_posix())
    return files


@pytest.mark.slow
def test_sdist_builds_a_wheel_with_the_extension(tmp_path: Path):
    dist = tmp_path / "dist"
    env = dict(os.environ, GENREP_FAST_NO_EXTENSION="1")
    _run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])",
            str(dist),
        ],
        cwd=ROOT,
        env=env,
    )
    (sdist,) = dist.glob("genrep_fast-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    prefix = names[0].split("/")[0]
    in_sdist = {n.split("/", 1)[1] for n in names if "/" in n}
    missing = sorted(_source_files() - in_sdist)
    assert not missing, f"{sdist.name} lacks {missing}: add them to MANIFEST.in"
    assert not any(n.endswith((".so", ".pyc")) for n in in_sdist), sorted(in_sdist)
    assert prefix == sdist.name.removesuffix(".tar.gz")

    venv = tmp_path / "venv"
    try:
        _run([sys.executable, "-m", "venv", str(venv)])
        py = str(venv / "bin" / "python")
        _run([py, "-m", "pip", "install", "-q", TORCH, "ninja"])
        wheels = tmp_path / "wheels"
        build_env = dict(
            os.environ, GENREP_FAST_REQUIRE_EXTENSION="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2")
        )
        build_env.pop("GENREP_FAST_NO_EXTENSION", None)
        build_env.pop("FORCE_CUDA", None)
        _run(
            [
                py,
                "-m",
                "pip",
                "wheel",
                "-q",
                str(sdist),
                "--no-build-isolation",
                "--no-deps",
                "-w",
                str(wheels),
            ],
            env=build_env,
            cwd=tmp_path,
        )
        (wheel,) = wheels.glob("genrep_fast-*.whl")
        assert "abi3" in wheel.name, wheel.name  # a compiled wheel, not a pure-Python one
        _run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)])
        ops = _run([py, "-c", IMPORT_CHECK, *DEVICE_CONTRACT], cwd=tmp_path).stdout.split()
        assert sorted(ops) == sorted(DEVICE_CONTRACT)
        check = _run([py, "-m", "genrep_fast.check_build"], cwd=tmp_path)
        assert "ok:" in check.stdout
    finally:
        shutil.rmtree(venv, ignore_errors=True)
