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
