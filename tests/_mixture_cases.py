"""Random mixture banks shared by the Triton forward and backward tests."""

from __future__ import annotations

import pytest
import torch

# The devices a kernel test runs on: the CPU (the Triton interpreter, in CI) and, marked gpu, CUDA
# (the compiled kernels; `tools/gpu_check.py` runs the gpu-marked cases on the lent H100).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def make_bank(b, c, t, latent, *, per_image=False, sigma_kind="c_t", seed=0):
    """``x: [b, *latent]``, ``mu: [c, t, *latent]`` (``[b, c, t, *latent]`` with ``per_image``),
    float32 standard normal; ``sigma`` in [0.5, 1.5) of shape ``[t]`` (``"t"``), ``[c, t]``
    (``"c_t"``), ``[b, c, t]`` (``"b_c_t"``) or mu's shape (``"diag"``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *latent, generator=g)
    lead = (b, c, t) if per_image else (c, t)
    mu = torch.randn(*lead, *latent, generator=g)
    shapes = {"t": (t,), "c_t": (c, t), "b_c_t": (b, c, t), "diag": tuple(mu.shape)}
    sigma = 0.5 + torch.rand(shapes[sigma_kind], generator=g)
    return x, mu, sigma
