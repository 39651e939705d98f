"""The root conftest's autouse fixture seeds the global generators before every test."""

from __future__ import annotations

import random

import numpy as np
import torch

TEST_SEED = 0  # the root conftest.py's


def test_global_generators_start_from_the_test_seed():
    # What this test draws first must be what the seed gives, whatever ran before it (NumPy's
    # generator is seeded from the OS at start-up, so without the fixture this fails even alone).
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])  # noqa: NPY002
    torch.manual_seed(TEST_SEED)
    np.random.seed(TEST_SEED)  # noqa: NPY002  (the global state the fixture seeds)
    random.seed(TEST_SEED)
    assert torch.equal(got[0], torch.rand(4))
    assert np.array_equal(got[1], np.random.rand(4))  # noqa: NPY002
    assert got[2] == [random.random() for _ in range(4)]


def test_draws_of_an_earlier_test_do_not_leak():
    # Runs after the test above (file order), which left all three generators advanced.
    first = torch.rand(1)
    torch.manual_seed(TEST_SEED)
    assert torch.equal(first, torch.rand(1))
