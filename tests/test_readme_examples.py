"""The README's Python examples run as written (docs with working examples)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    """A stand-in for ``genrep-fast demo --out demo_out``: its run folder ``demo_out/run``, from a
    few steps of each stage of the tiny test config (seconds, not the demo's minutes)."""
    from train_helpers import TINY

    from genrep_fast.train.config import load_config
    from genrep_fast.train.trainer import Trainer

    cwd = tmp_path_factory.mktemp("readme")
    cfg = load_config("tiny_digits", TINY + [f"out_dir={cwd / 'demo_out' / 'run'}"])
    Trainer(cfg).run()
    return cwd


# A block whose first line is "# needs CUDA" runs with the GPU tests (marked gpu).
CUDA_MARK = "# needs CUDA\n"
PARAMS = [
    pytest.param(
        code, id=f"block{i}", marks=[pytest.mark.gpu] if code.startswith(CUDA_MARK) else []
    )
    for i, code in enumerate(BLOCKS)
]


@pytest.mark.parametrize("code", PARAMS)
def test_readme_example_runs(code, request, monkeypatch):
    if "demo_out" in code:  # an example over the demo's output
        monkeypatch.chdir(request.getfixturevalue("demo_out"))
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})


def test_readme_quickstart_is_two_commands_and_ci_runs_the_second():
    text = README.read_text()
    quick = re.search(r"## Quickstart.*?```bash\n(.*?)```", text, flags=re.S).group(1)
    commands = [line for line in quick.splitlines() if line.strip()]
    assert len(commands) == 2
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci
