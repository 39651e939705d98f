"""Layout and dtype conventions of the mixture likelihood, shared by the reference
(``genrep_fast.reference``) and every backend (``mixture_torch``, ``mixture_cpp``, the Triton kernels
of ``genrep_fast.kernels``). The one place that reads a validated ``(x, mu, sigma)`` as
``x: [B, D]`` and a bank of ``[C, T, D]`` / ``[B, C, T, D]``.

* ``x: [B, *latent]``; ``D = prod(latent)``.
* Shared bank ``mu: [C, T, *latent]``; per-image bank ``mu: [B, C, T, *latent]``.
* ``sigma`` isotropic: ``[T]``, ``[C, T]`` or (per-image bank) ``[B, C, T]``; diagonal: the shape
  of ``mu``.
* ``class_index: [B, K]`` restricts the classes per image; the result is then ``[B, K]``.
* Low-precision inputs are computed in float32, float64 inputs in float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

LOG_2PI = math.log(2.0 * math.pi)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_diagonal(mu: torch.Tensor, sigma: torch.Tensor) -> bool:
    return sigma.shape == mu.shape


def is_per_image(x: torch.Tensor, mu: torch.Tensor) -> bool:
    """Per-image bank ``[B, C, T, *latent]`` has two more dims than ``x``; shared bank one more."""
    return mu.dim() == x.dim() + 2


def num_classes_out(x: torch.Tensor, mu: torch.Tensor, class_index: torch.Tensor | None) -> int:
    """K of the ``[B, K]`` result: the candidates per image, else the bank's classes C."""
    if class_index is not None:
        return class_index.shape[1]
    return mu.shape[1] if is_per_image(x, mu) else mu.shape[0]


def sum_to_sigma_shape(grad: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Sum the gradient of a broadcast (leading-dims-expanded) isotropic ``sigma`` back to
    ``sigma``'s own shape; a diagonal sigma's gradient already has it."""
    if grad.dim() > sigma.dim():
        grad = grad.sum(tuple(range(grad.dim() - sigma.dim())))
    return grad.reshape(sigma.shape)


class BankView(NamedTuple):
    """A validated ``(x, mu, sigma)`` with the latent dims flattened (views where the strides
    allow, as ``reshape``; nothing made contiguous, nothing converted).

    ``x: [B, D]``; ``mu: [C, T, D]`` (shared) or ``[B, C, T, D]`` (per-image); ``sigma``: diagonal
    in ``mu``'s new shape, isotropic as given (``[T]``, ``[C, T]`` or ``[B, C, T]``: each backend
    broadcasts it its own way, ``sigma_expanded`` for the torch code). ``lead``: ``(C, T)`` or
    ``(B, C, T)``, the dims of one score.
    """

    x: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    lead: tuple[int, ...]
    per_image: bool
    diagonal: bool

    @property
    def num_classes(self) -> int:
        return self.lead[-2]

    @property
    def num_steps(self) -> int:
        return self.lead[-1]

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    def sigma_expanded(self) -> torch.Tensor:
        """sigma as ``lead`` (isotropic, a broadcast view) or ``lead + (D,)`` (diagonal)."""
        return self.sigma if self.diagonal else self.sigma.expand(self.lead)


def bank_view(x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor) -> BankView:
    """``BankView`` of validated arguments (shapes as ``genrep_fast.mixture_log_likelihood``)."""
    b = x.shape[0]
    x2 = x.reshape(b, -1)
    per_image = is_per_image(x, mu)
    lead = tuple(mu.shape[:3]) if per_image else tuple(mu.shape[:2])
    mu_l = mu.reshape(*lead, x2.shape[1])
    diagonal = is_diagonal(mu, sigma)
    sig = sigma.reshape(mu_l.shape) if diagonal else sigma
    return BankView(x2, mu_l, sig, lead, per_image, diagonal)
