"""Root conftest: seen by `pytest`, `pytest tests/` and `pytest bench/` alike.

* ``--benchmark`` switches the suites in bench/ from small smoke shapes (run in CI) to realistic
  shapes, and makes them write results JSON + table + plot under bench/results/.
* Without a CUDA device, Triton kernels run through the interpreter (TRITON_INTERPRET=1). It must
  be set before triton decorates any kernel, so it is set here, before tests import genrep_fast.
* ``@pytest.mark.gpu`` tests are skipped with a reason when no CUDA device is present.
* Every test starts from the same global random state (torch, NumPy, ``random``): a test that
  draws from a global generator sees the same numbers whichever tests ran before it, alone or in
  the whole suite (``seed_everything``, autouse).
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


TEST_SEED = 0


@pytest.fixture(autouse=True)
def seed_everything():
    """Seed torch (CPU and CUDA), NumPy and ``random`` before every test."""
    random.seed(TEST_SEED)
    np.random.seed(TEST_SEED)  # noqa: NPY002  (the legacy global state is what tests draw from)
    torch.manual_seed(TEST_SEED)  # all devices


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the bench/ suites at realistic shapes and write bench/results/ (default: smoke)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present (torch.cuda)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
