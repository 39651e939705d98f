"""The mixture log-likelihood in the C++ kernels of csrc/mixture_cpu.cpp (``backend="cpp"`` of
``genrep_fast.mixture_log_likelihood``; under ``backend="auto"``, the CPU path of the memory-bound
layouts: a per-image bank, or candidate classes of either bank).

``genrep_fast::mixture_ll_diff`` / ``mixture_ll_diff_backward``: the exact difference form
``sum_d (x_d - mu_d)^2``, each mu row read once per image, fp32 accumulation (fp64 for fp64
inputs), parallel over images with OpenMP. Several times faster than the torch code of the same
layouts (``genrep_fast.mixture_torch``; timings: bench/bench_posterior.py, recorded under
bench/results/). CPU tensors only, and only with the compiled extension (``_ops.HAS_MIXTURE_CPU_OPS``).
"""

from __future__ import annotations

import torch

from genrep_fast import _ops
from genrep_fast.layout import bank_view, compute_dtype, is_per_image


def available(device: torch.device) -> bool:
    """The kernels are built (``genrep_fast._C``) and run on ``device``."""
    return _ops.HAS_MIXTURE_CPU_OPS and device.type == "cpu"


def preferred(x: torch.Tensor, mu: torch.Tensor, class_index: torch.Tensor | None) -> bool:
    """What ``backend="auto"`` sends here on CPU: a per-image bank, or candidate classes of either
    bank (the difference form reads each candidate's T rows once); the float64 GEMM form of
    ``mixture_torch`` is kept for a shared bank without candidates."""
    return class_index is not None or is_per_image(x, mu)


def kernel_args(x, mu, sigma, class_index):
    """Arguments of ``genrep_fast::mixture_ll_diff``: ``x [B, D]``, ``mu [B, C, T, D]`` or
    ``[C, T, D]`` (views), isotropic sigma as ``[Bs, Cs, T]`` in the accumulation dtype (a copy of
    at most B*C*T values), diagonal sigma in mu's shape (converted to the accumulation dtype only
    when its dtype differs from mu's), class_index as int64. The kernel calls ``.contiguous()`` on
    each: a strided mu or diagonal sigma is copied once per call."""
    view = bank_view(x, mu, sigma)
    acc = compute_dtype(x.dtype)
    sig = view.sigma
    if view.diagonal:
        if sig.dtype != mu.dtype:
            sig = sig.to(acc)
    else:
        sig = sig.to(acc)
        sig = sig.reshape((1,) * (3 - sig.dim()) + tuple(sig.shape))
    cls = None if class_index is None else class_index.long()
    return view.x, view.mu, sig, cls


def forward(x, mu, sigma, class_index):
    """``log p(x|y)`` ``[B, C]`` / ``[B, K]`` of validated arguments (no autograd)."""
    return torch.ops.genrep_fast.mixture_ll_diff(*kernel_args(x, mu, sigma, class_index))


def backward(grad, x, mu, sigma, class_index, needs):
    """Gradients of ``sum(grad * forward(...))`` in the inputs' shapes, None where ``needs`` is
    False."""
    with torch.no_grad():
        x2, mu_c, sig, cls = kernel_args(x, mu, sigma, class_index)
        gx, gmu, gsig = torch.ops.genrep_fast.mixture_ll_diff_backward(
            grad.to(compute_dtype(x.dtype)), x2, mu_c, sig, cls, *needs
        )
        gx = gx.reshape(x.shape) if needs[0] else None
        gmu = gmu.reshape(mu.shape) if needs[1] else None
        # Isotropic: [Bs, Cs, T] -> sigma's own shape (the same number of values).
        gsig = gsig.reshape(sigma.shape).to(sigma.dtype) if needs[2] else None
    return gx, gmu, gsig
