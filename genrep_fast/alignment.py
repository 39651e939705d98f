"""Gradient alignment (METHOD.md section 3): the two task gradients, partly projected onto each
other per parameter group, combined into one update ``a * p + b * g`` per group.

``align_gradients`` validates, then dispatches to the compiled ops (``backend="auto"``) or to the
eager reference (``backend="reference"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from genrep_fast import _ops, reference
from genrep_fast._validation import check_choice, check_real

MODES = reference.ALIGN_MODES
BACKENDS = ("auto", "ops", "reference")

Groups = None | str | Sequence[Sequence[int]]


def validate_groups(groups: Groups, n: int) -> None:
    if groups is None or groups == "global":
        return
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise TypeError(
            f"groups must be None (one group per tensor), 'global' or a list of lists of tensor "
            f"indices, got {groups!r}"
        )
    owner: dict[int, int] = {}
    for gi, members in enumerate(groups):
        if isinstance(members, (str, bytes)) or not isinstance(members, Sequence):
            raise TypeError(f"groups[{gi}] must be a list of tensor indices, got {members!r}")
        for i in members:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"groups[{gi}] holds {i!r}; tensor indices must be ints")
            if not 0 <= i < n:
                raise ValueError(f"groups[{gi}] holds index {i}, out of range for {n} tensors")
            if i in owner:
                raise ValueError(
                    f"groups overlap: tensor {i} is in groups[{owner[i]}] and groups[{gi}]"
                )
            owner[i] = gi


def validate_gradients(
    grads_p: Sequence[torch.Tensor | None], grads_g: Sequence[torch.Tensor | None]
) -> None:
    for name, seq in (("grads_p", grads_p), ("grads_g", grads_g)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise TypeError(f"{name} must be a list of tensors (or None), got {type(seq).__name__}")
    if len(grads_p) != len(grads_g):
        raise ValueError(
            f"grads_p and grads_g must have the same length, got {len(grads_p)} and {len(grads_g)}"
        )
    for i, (p, g) in enumerate(zip(grads_p, grads_g)):
        for name, t in (("grads_p", p), ("grads_g", g)):
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a tensor or None, got {type(t).__name__}")
            if t is not None and not t.is_floating_point():
                raise TypeError(f"{name}[{i}] must be floating point, got {t.dtype}")
        if p is not None and g is not None:
            if p.shape != g.shape:
                raise ValueError(
                    f"grads_p[{i}] and grads_g[{i}] differ in shape: {tuple(p.shape)} vs "
                    f"{tuple(g.shape)}"
                )
            if p.dtype != g.dtype:
                raise TypeError(
                    f"grads_p[{i}] and grads_g[{i}] differ in dtype: {p.dtype} vs {g.dtype}"
                )
            if p.device != g.device:
                raise ValueError(
                    f"grads_p[{i}] and grads_g[{i}] are on different devices: {p.device} vs "
                    f"{g.device}"
                )


def align_gradients(
    grads_p: Sequence[torch.Tensor | None],
    grads_g: Sequence[torch.Tensor | None],
    *,
    groups: Groups = None,
    k: float = 2.0,
    w_p: float = 0.7,
    w_g: float = 0.3,
    mode: str = "symmetric",
    backend: str = "auto",
) -> list[torch.Tensor | None]:
    """Aligned update ``a * p + b * g`` per tensor (METHOD.md section 3).

    Args:
        grads_p: perception gradients, one per parameter (None counts as zeros).
        grads_g: generation gradients, same length; ``grads_p[i]`` and ``grads_g[i]`` share shape,
            dtype and device.
        groups: None (one group per tensor), ``"global"`` (all tensors one group) or a list of
            disjoint lists of tensor indices; tensors in no group get ``w_p * p + w_g * g``.
        k: exponent of ``alpha = ((cos + 1) / 2) ** k``, >= 0.
        w_p, w_g: task weights.
        mode: ``"symmetric"``, ``"generation"`` (align only the generation gradient),
            ``"perception"`` (only the perception gradient) or ``"none"``.
        backend: ``"auto"`` (compiled ops when built), ``"ops"`` or ``"reference"``.

    Returns:
        The update per tensor in its gradient's dtype (None where both gradients are None).
    """
    validate_gradients(grads_p, grads_g)
    validate_groups(groups, len(grads_p))
    k = check_real("k", k, minimum=0.0)
    w_p = check_real("w_p", w_p)
    w_g = check_real("w_g", w_g)
    check_choice("mode", mode, MODES)
    check_choice("backend", backend, BACKENDS)
    if backend == "reference" or (backend == "auto" and not _ops.HAS_EXTENSION):
        return reference.align_gradients(
            grads_p, grads_g, groups=groups, k=k, w_p=w_p, w_g=w_g, mode=mode
        )
    if not _ops.HAS_EXTENSION:
        raise RuntimeError("backend='ops' needs the compiled extension genrep_fast._C")
    return _align_with_ops(grads_p, grads_g, groups, k, w_p, w_g, mode)


def _align_with_ops(grads_p, grads_g, groups, k, w_p, w_g, mode):
    n = len(grads_p)
    ids_all = reference.resolve_groups(groups, n)
    g_count = reference.num_groups(groups, n)
    present = [i for i in range(n) if grads_p[i] is not None or grads_g[i] is not None]
    ps = [grads_p[i] if grads_p[i] is not None else torch.zeros_like(grads_g[i]) for i in present]
    gs = [grads_g[i] if grads_g[i] is not None else torch.zeros_like(grads_p[i]) for i in present]
    ids = [ids_all[i] for i in present]
    out: list[torch.Tensor | None] = [None] * n
    if not present:
        return out
    sums = torch.ops.genrep_fast.group_sums(ps, gs, ids, g_count)
    a, b = reference.alignment_coefficients(sums, k, w_p, w_g, mode)
    for j, i in enumerate(present):
        gid = ids[j]
        if gid < 0:
            upd = w_p * ps[j].double() + w_g * gs[j].double()
        else:
            upd = a[gid] * ps[j].double() + b[gid] * gs[j].double()
        out[i] = upd.to(ps[j].dtype)
    return out
