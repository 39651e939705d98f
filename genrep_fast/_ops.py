"""Loads the compiled extension ``genrep_fast._C`` and registers the fake (meta) implementations
of its ops so they trace under ``torch.compile``.

``HAS_EXTENSION`` says whether the extension loaded; ``HAS_CUDA_OPS`` whether it was built with the
CUDA kernels. Without the extension every op falls back to its torch implementation.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("genrep_fast")

try:
    from genrep_fast import _C  # noqa: F401  (import runs the TORCH_LIBRARY registrations)

    HAS_EXTENSION = True
except ImportError as exc:  # pragma: no cover - only without a build
    HAS_EXTENSION = False
    _IMPORT_ERROR = exc
    log.warning("genrep_fast: compiled extension not available (%s); using torch fallbacks", exc)


def _has_kernel(op_name: str, key: str) -> bool:
    if not HAS_EXTENSION:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"genrep_fast::{op_name}", key)


HAS_CUDA_OPS = _has_kernel("group_sums", "CUDA") and _has_kernel("align_combine", "CUDA")

if HAS_EXTENSION:

    @torch.library.register_fake("genrep_fast::group_sums")
    def _group_sums_fake(p, g, group_ids, num_groups):
        present = [t for t in (*p, *g) if t is not None]
        device = present[0].device if present else torch.device("cpu")
        return torch.empty((num_groups, 3), dtype=torch.float64, device=device)

    @torch.library.register_fake("genrep_fast::align_combine")
    def _align_combine_fake(p, g, sums, group_ids, k, w_p, w_g, align_mode, out):
        # Writes into `out` only: nothing to allocate, nothing to return.
        return None


def _has_cpu_kernels(*op_names: str) -> bool:
    """Whether each op has a CPU kernel; False for an op an older build of the extension lacks."""
    try:
        return all(_has_kernel(name, "CPU") for name in op_names)
    except RuntimeError:  # "operator ... does not exist": an older build of the extension
        return False


# The metadata pass of a GradientAligner step (csrc/grad_layout.cpp; one function registered for
# CPU and CUDA). False with an extension built before it existed: the aligner then does the same
# bookkeeping in Python.
HAS_GRAD_LAYOUT = _has_cpu_kernels("grad_layout")

# The CPU kernels of the mixture likelihood's difference form (csrc/mixture_cpu.cpp). False with an
# extension built before they existed: mixture_log_likelihood then keeps to its torch code (genrep_fast.mixture_torch).
HAS_MIXTURE_CPU_OPS = _has_cpu_kernels("mixture_ll_diff", "mixture_ll_diff_backward")

if HAS_MIXTURE_CPU_OPS:

    def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    @torch.library.register_fake("genrep_fast::mixture_ll_diff")
    def _mixture_ll_diff_fake(x, mu, sigma, class_index):
        k = class_index.shape[1] if class_index is not None else mu.shape[-3]
        return x.new_empty((x.shape[0], k), dtype=_accumulation_dtype(x.dtype))

    @torch.library.register_fake("genrep_fast::mixture_ll_diff_backward")
    def _mixture_ll_diff_backward_fake(
        grad, x, mu, sigma, class_index, need_x, need_mu, need_sigma
    ):
        return (
            torch.empty_like(x) if need_x else x.new_empty(0),
            torch.empty_like(mu) if need_mu else x.new_empty(0),
            torch.empty_like(sigma) if need_sigma else x.new_empty(0),
        )


# ------------------------------------------------------------------------------------------------
# Arguments no kernel takes. Without a kernel for their dispatch key, the dispatcher answers a
# sparse tensor (or a tensor on a device this build has no kernel for) with NotImplementedError
# ("Could not run ... with arguments from the 'SparseCPU' backend"); these kernels raise TypeError
# (layout) or ValueError (device) naming the argument instead, as the Python API does.
# ------------------------------------------------------------------------------------------------

_SPARSE_KEYS = ("SparseCPU", "SparseCUDA", "SparseCsrCPU", "SparseCsrCUDA")


def _tensor_arguments(op_name: str, args: tuple):
    """``(name, tensor)`` for every tensor argument of a call, list entries as ``name[i]``."""
    schema = getattr(torch.ops.genrep_fast, op_name).default._schema
    for arg, value in zip(schema.arguments, args):
        if isinstance(value, torch.Tensor):
            yield arg.name, value
        elif isinstance(value, (list, tuple)):
            for j, t in enumerate(value):
                if isinstance(t, torch.Tensor):
                    yield f"{arg.name}[{j}]", t


def _rejecting_kernel(op_name: str, kernel_devices: tuple[str, ...]):
    def reject(*args):
        for name, t in _tensor_arguments(op_name, args):
            if t.layout != torch.strided:
                raise TypeError(
                    f"{op_name}: {name} must be a dense (strided) tensor, got layout {t.layout}"
                )
        for name, t in _tensor_arguments(op_name, args):
            if t.device.type not in kernel_devices:
                raise ValueError(
                    f"{op_name}: {name} is on {t.device}; this build of genrep_fast._C runs it on "
                    f"{' or '.join(kernel_devices)} tensors only"
                )
        raise ValueError(f"{op_name}: no kernel for these arguments' devices")

    return reject


if HAS_EXTENSION:
    _REJECT_LIB = torch.library.Library("genrep_fast", "IMPL")
    _KERNEL_DEVICES = {
        "group_sums": ("cpu", "cuda") if HAS_CUDA_OPS else ("cpu",),
        "align_combine": ("cpu", "cuda") if HAS_CUDA_OPS else ("cpu",),
        "mixture_ll_diff": ("cpu",),
        "mixture_ll_diff_backward": ("cpu",),
    }
    for _name, _devices in _KERNEL_DEVICES.items():
        if not _has_cpu_kernels(_name):
            continue  # an older build without this op
        _keys = _SPARSE_KEYS + (() if "cuda" in _devices else ("CUDA",))
        for _key in _keys:
            _REJECT_LIB.impl(_name, _rejecting_kernel(_name, _devices), _key)
