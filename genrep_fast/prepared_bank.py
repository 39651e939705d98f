"""A shared chain bank prepared once for many ``mixture_log_likelihood`` calls.

A shared bank ``(mu [C, T, *latent], sigma)`` is reused across many batches (the trainer refreshes
it every R steps), and the fast paths start every call by deriving per-bank operands from it: the
float64 copy of ``mu`` and its row norms ``|mu|^2`` (torch backend, GEMM form), or the
``bank / |mu|^2 / 1/sigma^2 / log-norm`` operands of the Triton GEMM kernel (the bank rows in
the dot's operand dtype: bf16 for ``precision="bf16"``, fp32 rounded to nearest tf32 for
``"tf32"``, fp32 for ``"tf32x3"``). Given raw tensors,
``mixture_log_likelihood`` recomputes them on every call: nothing is cached behind the caller's
back, so no write to the caller's tensors (in place, through ``.data``, a NumPy or DLPack view,
``set_``) can ever be answered from an old bank.

``PreparedBank`` is the explicit way to pay that cost once. It is a **snapshot**: construction
copies ``mu`` and ``sigma`` into private tensors (validated once, ``sigma > 0`` included); the
operands of a backend are derived from those copies on first use and kept. Later changes of the
caller's tensors do not reach it; to use a changed bank, prepare it again (``ChainBank.prepared``
does this after the bank's own refresh). It takes no gradient for the bank (the teacher is
detached, docs/METHOD.md section 1); the gradient with respect to ``x`` is exact, as with raw tensors.

Memory: the private copy of the bank, plus per backend used: torch, a float64 copy (none for a
float64 bank); per Triton GEMM precision used, a copy of the bank rows in that precision's operand
dtype (none where the private copy already is one: a contiguous isotropic fp32 bank for tf32x3, a
bf16 one for bf16; at C = 1000, T = 100, D = 4096: 0.8 GB in bf16, 1.6 GB in fp32) and three
``[C*T]`` fp32 vectors; for tf32x3 on CUDA with autotuning on, also the bank rows split into tf32
``hi`` and ``lo`` parts for the split form (``kernels/mixture.py``'s ``tf32_parts``: twice the
fp32 bank, 3.3 GB at that size; ``GENREP_FAST_AUTOTUNE=0`` leaves them out). Dropping the
``PreparedBank`` frees all of it.
"""

from __future__ import annotations

import contextlib

import torch

from genrep_fast import mixture_torch
from genrep_fast._validation import (
    FLOAT_DTYPES,
    check_float_tensor,
    check_positive_finite,
    check_same_device,
)
from genrep_fast.layout import is_diagonal


class PreparedBank:
    """Snapshot of a shared bank ``mu: [C, T, *latent]`` with its sigma, for repeated likelihoods.

    Args:
        mu: shared bank ``[C, T, *latent]`` (float16/bfloat16/float32/float64).
        sigma: isotropic ``[T]`` or ``[C, T]``, or diagonal (the shape of ``mu``); finite, > 0.
        dtype: dtype of the snapshot's ``mu`` (and of the ``x`` it accepts); default ``mu.dtype``.
            E.g. ``torch.float32`` widens a bfloat16 bank once instead of on every call.

    Use as ``genrep_fast.mixture_log_likelihood(x, bank, ...)`` or ``bank.log_likelihood(x, ...)``;
    see the module docstring for the snapshot semantics and the memory it holds.
    """

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor, *, dtype: torch.dtype | None = None):
        check_float_tensor("mu", mu, min_ndim=3)
        check_float_tensor("sigma", sigma, min_ndim=1)
        check_same_device(mu=mu, sigma=sigma)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        c, t = mu.shape[0], mu.shape[1]
        if c < 1 or t < 1:
            raise ValueError(f"mu: need C >= 1 and T >= 1, got mu of shape {tuple(mu.shape)}")
        if tuple(sigma.shape) not in ((t,), (c, t), tuple(mu.shape)):
            raise ValueError(
                f"sigma must be isotropic [{t}] or [{c}, {t}], or diagonal (the shape of mu, "
                f"{list(mu.shape)}); got sigma of shape {list(sigma.shape)}"
            )
        check_positive_finite("sigma", sigma)
        with _preparing(mu.device):
            # Private, contiguous, autograd-free copies: whatever later happens to the caller's
            # tensors (or to their inference-mode flag), the snapshot's own stay as they are now.
            self._mu = _private_copy(mu, mu.dtype if dtype is None else dtype)
            self._sigma = _private_copy(sigma, sigma.dtype)
        self._torch_operands: mixture_torch.GemmBank | None = None
        self._triton_operands: dict[str, tuple] = {}  # per GEMM precision

    # ---------------------------------------------------------------- shape facts

    @property
    def num_classes(self) -> int:
        return self._mu.shape[0]

    @property
    def num_steps(self) -> int:
        """T, the mixture components per class."""
        return self._mu.shape[1]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self._mu.shape[2:])

    @property
    def diagonal(self) -> bool:
        return is_diagonal(self._mu, self._sigma)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the snapshot's mu; ``x`` must have it."""
        return self._mu.dtype

    @property
    def device(self) -> torch.device:
        return self._mu.device

    @property
    def nbytes(self) -> int:
        """Bytes held now: the private copies and the operands prepared so far (shared storage
        counted once)."""
        tensors = [self._mu, self._sigma]
        for ops in (self._torch_operands, *self._triton_operands.values()):
            if ops is not None:
                tensors.extend(t for t in ops if t is not None)
        storages = {}
        for t in tensors:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return sum(storages.values())

    def __repr__(self) -> str:
        return (
            f"PreparedBank(C={self.num_classes}, T={self.num_steps}, latent={self.latent_shape}, "
            f"dtype={self.dtype}, diagonal={self.diagonal}, device={self.device})"
        )

    # ---------------------------------------------------------------- use

    def log_likelihood(
        self,
        x: torch.Tensor,
        *,
        class_index: torch.Tensor | None = None,
        precision: str = "ieee",
        backend: str = "auto",
        validate: bool = True,
    ) -> torch.Tensor:
        """``genrep_fast.mixture_log_likelihood(x, self, ...)``: ``[B, C]`` (or ``[B, K]``)."""
        from genrep_fast.posterior import mixture_log_likelihood

        return mixture_log_likelihood(
            x,
            self,
            class_index=class_index,
            precision=precision,
            backend=backend,
            validate=validate,
        )

    def _operands_for(
        self,
        impl: str,
        x: torch.Tensor,
        class_index: torch.Tensor | None,
        precision: str,
    ) -> list[torch.Tensor]:
        """The operands that ``impl`` / ``precision`` use for this call, derived from the private
        copies on first use and kept; ``[]`` where the path reads mu and sigma directly (the
        difference forms, the C++ kernels)."""
        if impl == "torch":
            if self._torch_operands is None:
                with _preparing(self.device):
                    self._torch_operands = mixture_torch.gemm_bank(self._mu, self._sigma)
            return list(self._torch_operands)
        if impl == "triton":
            from genrep_fast.kernels import mixture as mixture_kernels

            if mixture_kernels.uses_gemm_form(x, self._mu, class_index, precision):
                if precision not in self._triton_operands:
                    with _preparing(self.device):
                        self._triton_operands[precision] = mixture_kernels.gemm_operands(
                            self._mu,
                            self._sigma,
                            precision,
                            split=self._split_for(precision),
                        )
                return [t for t in self._triton_operands[precision] if t is not None]
        return []

    def _split_for(self, precision: str) -> bool:
        """Whether the tf32x3 operands include the split form's ``[lo | hi]`` parts: where the
        autotuner times that form (a CUDA bank, tuning on, T within the split form's limit), so
        that its timing and its use read them prepared, not remade per call."""
        from genrep_fast.kernels import mixture as mixture_kernels
        from genrep_fast.kernels import tuning

        return (
            precision == "tf32x3"
            and self.device.type == "cuda"
            and tuning.autotune_enabled()
            and mixture_kernels.split_applies(self._mu, precision)
        )


def prepare_bank(
    mu: torch.Tensor, sigma: torch.Tensor, *, dtype: torch.dtype | None = None
) -> PreparedBank:
    """``PreparedBank(mu, sigma, dtype=dtype)``: a snapshot of a shared bank for repeated calls of
    ``mixture_log_likelihood`` (see ``genrep_fast.prepared_bank``)."""
    return PreparedBank(mu, sigma, dtype=dtype)


def _private_copy(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    return out.copy_(t.detach())


@contextlib.contextmanager
def _preparing(device: torch.device):
    """Normal (not inference-mode) tensors without autograd history and without autocast: the
    snapshot is used later, maybe with an ``x`` that requires grad (inference tensors cannot be
    saved for backward)."""
    with (
        torch.inference_mode(False),
        torch.no_grad(),
        torch.autocast(device.type, enabled=False),
    ):
        yield
