"""Gradient alignment (docs/METHOD.md section 3): the two task gradients, partly projected onto each
other per parameter group, combined into one update ``a * p + b * g`` per group.

``align_gradients`` validates, then dispatches to the compiled ops (``backend="auto"``) or to the
eager reference (``backend="reference"``). The ops are two passes over the tensor lists:

1. ``torch.ops.genrep_fast.group_sums``: ``[G, 3]`` float64 sums ``(<p,g>, |p|^2, |g|^2)`` per group;
2. ``torch.ops.genrep_fast.align_combine``: ``a``, ``b`` per group computed from the sums on the
   device (no host sync) and ``out = a * p + b * g`` written per tensor (in place is allowed).

Between the two, ``reduce_sums`` may change the sums (e.g. an all-reduce over parameter shards,
see ``genrep_fast.distributed``). ``GradientAligner`` wraps both backward passes of a training step.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Sequence

import torch

from genrep_fast import _ops, reference
from genrep_fast._validation import check_choice, check_real, check_tensor

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
            if t is not None:
                check_tensor(f"{name}[{i}]", t)
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


def validate_out(
    out: Sequence[torch.Tensor | None],
    grads_p: Sequence[torch.Tensor | None],
    grads_g: Sequence[torch.Tensor | None],
) -> None:
    if isinstance(out, torch.Tensor) or not isinstance(out, Sequence):
        raise TypeError(f"out must be a list of tensors, got {type(out).__name__}")
    if len(out) != len(grads_p):
        raise ValueError(f"out must have one tensor per gradient ({len(grads_p)}), got {len(out)}")
    for i, (o, p, g) in enumerate(zip(out, grads_p, grads_g)):
        src = p if p is not None else g
        if o is None:
            if src is not None:
                raise TypeError(f"out[{i}] is None but gradient {i} is given")
            continue
        check_tensor(f"out[{i}]", o)
        if src is None:
            continue
        if o.shape != src.shape:
            raise ValueError(
                f"out[{i}] has shape {tuple(o.shape)}, the gradients have {tuple(src.shape)}"
            )
        if o.dtype != src.dtype:
            raise TypeError(f"out[{i}] has dtype {o.dtype}, the gradients have {src.dtype}")
        if o.device != src.device:
            raise ValueError(f"out[{i}] is on {o.device}, the gradients on {src.device}")


def _span(t: torch.Tensor) -> tuple[int, int]:
    """``[first, end)`` byte addresses that ``t``'s elements can occupy (its storage offset
    included). Two tensors on one device share memory only if their spans intersect."""
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.nbytes
    extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1
    return start, start + extent * t.element_size()


def _same_view(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return (
        a.device == b.device
        and a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def aliased_outputs(
    out: Sequence[torch.Tensor | None],
    grads_p: Sequence[torch.Tensor | None],
    grads_g: Sequence[torch.Tensor | None],
    group_ids: Sequence[int],
    same_sums_if_same_inputs: bool,
) -> set[int]:
    """Positions ``i`` whose ``out[i]`` shares memory with a gradient other than its own
    ``grads_p[i]`` / ``grads_g[i]`` seen through the very same view: writing ``out[i]`` there
    would change an input that the combine pass has yet to read (autograd hands one tensor to two
    parameters that are used as ``w + v``; a caller may pass ``out`` swapped or shifted). Those
    updates are computed into temporaries and copied into ``out`` once every input is read.

    Raises ``ValueError`` naming both positions where two outputs share memory, unless they are the
    same view of the same update (same inputs, same coefficients): memory cannot hold two results.
    ``same_sums_if_same_inputs``: groups of equal inputs get equal coefficients (one group per
    tensor, no ``reduce_sums``).
    """
    # (device, start, end, role, index); roles: 0 out, 1 grads_p, 2 grads_g. An input that is
    # out[i] itself is recorded once, as the output (the in-place update of .grad).
    entries: list[tuple[int, int, int, int, int]] = []
    for i, (o, p, g) in enumerate(zip(out, grads_p, grads_g)):
        if o is None or (p is None and g is None):
            continue  # nothing is written into out[i]
        for role, t in ((0, o), (1, p), (2, g)):
            if t is not None and t.numel() and not (role and t is o):
                entries.append((t.get_device(), *_span(t), role, i))
    entries.sort()
    hazards: set[int] = set()
    live: list[tuple[int, int, int, int, int]] = []
    reach = (-2, 0)  # (device, end) furthest reached by a live span
    for entry in entries:
        dev, start, end = entry[:3]
        if (dev, start) >= reach:
            live.clear()  # the common case: no span is still open
        else:
            live = [e for e in live if e[0] == dev and e[2] > start]
            for other in live:
                _clash(entry[3:], other[3:], out, grads_p, grads_g, group_ids,
                       same_sums_if_same_inputs, hazards)  # fmt: skip
        live.append(entry)
        reach = max(reach, (dev, end))
    return hazards


def _clash(e1, e2, out, grads_p, grads_g, group_ids, same_sums_if_same_inputs, hazards) -> None:
    """Two overlapping spans, as ``(role, index)``: record or refuse the overlap."""
    (r1, i), (r2, j) = e1, e2
    if r1 == 0 and r2 == 0:
        same_update = (
            _same_view(out[i], out[j])
            and _same_view(grads_p[i], grads_p[j])
            and _same_view(grads_g[i], grads_g[j])
            and (group_ids[i] == group_ids[j] or same_sums_if_same_inputs)
        )
        if not same_update:
            a, b = min(i, j), max(i, j)
            raise ValueError(
                f"out[{a}] and out[{b}] share memory but receive different updates; pass "
                f"separate output tensors"
            )
        # One update written twice; staged, as out[i] may also be the input of j.
        hazards.update((i, j))
        return
    if r1 and r2:
        return  # two inputs: both are only read
    o, t, k, role = (i, j, j, r2) if r1 == 0 else (j, i, i, r1)
    own = grads_p[o] if role == 1 else grads_g[o]
    if not (k == o and _same_view(out[o], own)):
        hazards.add(o)


def align_gradients(
    grads_p: Sequence[torch.Tensor | None],
    grads_g: Sequence[torch.Tensor | None],
    *,
    groups: Groups = None,
    k: float = 2.0,
    w_p: float = 0.7,
    w_g: float = 0.3,
    mode: str = "symmetric",
    out: Sequence[torch.Tensor | None] | None = None,
    reduce_sums: Callable[[torch.Tensor], torch.Tensor] | None = None,
    backend: str = "auto",
) -> list[torch.Tensor | None]:
    """Aligned update ``a * p + b * g`` per tensor (docs/METHOD.md section 3).

    Args:
        grads_p: perception gradients, one per parameter (None counts as zeros).
        grads_g: generation gradients, same length; ``grads_p[i]`` and ``grads_g[i]`` share shape,
            dtype and device. Dtypes may differ between tensors (fp32 next to bf16 is fine).
        groups: None (one group per tensor), ``"global"`` (all tensors one group) or a list of
            disjoint lists of tensor indices; tensors in no group get ``w_p * p + w_g * g``.
        k: exponent of ``alpha = ((cos + 1) / 2) ** k``, >= 0.
        w_p, w_g: task weights.
        mode: ``"symmetric"``, ``"generation"`` (align only the generation gradient),
            ``"perception"`` (only the perception gradient) or ``"none"``.
        out: optional list of output tensors, one per gradient (shape, dtype, device of the
            gradients; None where both gradients are None). ``out[i]`` may be ``grads_p[i]`` or
            ``grads_g[i]``: the update is then written in place. ``out`` may share memory with
            any gradient in any other way (one tensor for two parameters, as autograd returns
            for ``w + v``; outputs swapped; shifted views): those updates go through a temporary,
            and the result is the same. Two outputs that share memory must receive the same
            update (same inputs and group), else ``ValueError`` names both positions.
        reduce_sums: optional ``f(sums) -> sums`` applied to the ``[G, 3]`` float64 sums
            ``(<p,g>, |p|^2, |g|^2)`` before the coefficients are formed, e.g. an all-reduce when
            each rank holds a shard of every parameter (``distributed.all_reduce_sums``).
        backend: ``"auto"`` (compiled ops where built for the device, else the reference),
            ``"ops"`` or ``"reference"``.

    Returns:
        The update per tensor in its gradient's dtype (the ``out`` tensors when given; None where
        both gradients are None). A group with a non-finite value gets a non-finite update.
    """
    validate_gradients(grads_p, grads_g)
    validate_groups(groups, len(grads_p))
    k = check_real("k", k, minimum=0.0)
    w_p = check_real("w_p", w_p)
    w_g = check_real("w_g", w_g)
    check_choice("mode", mode, MODES)
    check_choice("backend", backend, BACKENDS)
    if out is not None:
        validate_out(out, grads_p, grads_g)
    if reduce_sums is not None and not callable(reduce_sums):
        raise TypeError(f"reduce_sums must be callable, got {type(reduce_sums).__name__}")
    staged: list[tuple[int, torch.Tensor]] = []
    if out is not None:
        out, staged = _stage_aliased_outputs(out, grads_p, grads_g, groups, reduce_sums)
    result = _align_validated(
        grads_p, grads_g, groups, k, w_p, w_g, mode, out, reduce_sums, backend
    )
    return _unstage(result, staged)


def _align_validated(grads_p, grads_g, groups, k, w_p, w_g, mode, out, reduce_sums, backend):
    """``align_gradients`` after its checks, with ``out`` free of aliasing hazards (staged by
    ``align_gradients``; alias-free by construction in ``GradientAligner``)."""
    devices = {t.device for t in (*grads_p, *grads_g) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all gradients must be on one device, got {sorted(map(str, devices))}")
    device = next(iter(devices)) if devices else torch.device("cpu")
    if backend == "ops" and not _ops_available(device):
        raise RuntimeError(
            f"backend='ops' needs the compiled extension genrep_fast._C with {device.type} kernels"
        )
    use_ops = backend == "ops" or (backend == "auto" and _ops_available(device))
    if not use_ops and reduce_sums is None:
        upd = reference.align_gradients(
            grads_p, grads_g, groups=groups, k=k, w_p=w_p, w_g=w_g, mode=mode
        )
        if out is None:
            return upd
        for o, u in zip(out, upd):
            if u is not None:
                o.copy_(u)
        return [o if u is not None else None for o, u in zip(out, upd)]
    return _align_two_pass(grads_p, grads_g, groups, k, w_p, w_g, mode, out, reduce_sums, use_ops)


def _stage_aliased_outputs(out, grads_p, grads_g, groups, reduce_sums):
    """``(out with temporaries where out[i] aliases an input, [(i, the caller's out[i])])``; see
    ``aliased_outputs``. Under torch.compile the memory addresses are not known while tracing, so
    every output is staged (one extra copy each) and outputs are not checked against each other."""
    n = len(out)
    if torch.compiler.is_compiling():
        positions = [
            i
            for i in range(n)
            if out[i] is not None and not (grads_p[i] is None and grads_g[i] is None)
        ]
    else:
        ids = reference.resolve_groups(groups, n)
        same_sums = groups is None and reduce_sums is None
        positions = sorted(aliased_outputs(out, grads_p, grads_g, ids, same_sums))
    if not positions:
        return out, []
    work = list(out)
    for i in positions:
        work[i] = torch.empty_like(out[i])
    return work, [(i, out[i]) for i in positions]


def _unstage(result, staged):
    for i, target in staged:
        target.copy_(result[i])
        result[i] = target
    return result


def _ops_available(device: torch.device) -> bool:
    if device.type == "cpu":
        return _ops.HAS_EXTENSION
    return device.type == "cuda" and _ops.HAS_CUDA_OPS


def _align_two_pass(grads_p, grads_g, groups, k, w_p, w_g, mode, out, reduce_sums, use_ops):
    present, ids, g_count = _two_pass_plan(grads_p, grads_g, groups)
    return _two_pass_run(
        grads_p, grads_g, present, ids, g_count, k, w_p, w_g, mode, out, reduce_sums, use_ops
    )


def _two_pass_plan(grads_p, grads_g, groups) -> tuple[list[int] | None, list[int], int]:
    """``(present, ids, num_groups)``: the positions with a gradient (None: all of them), their
    group ids, the number of groups. Depends on the groups and on which gradients are None."""
    n = len(grads_p)
    ids_all = reference.resolve_groups(groups, n)
    g_count = reference.num_groups(groups, n)
    present = [i for i in range(n) if grads_p[i] is not None or grads_g[i] is not None]
    if len(present) == n:
        return None, ids_all, g_count
    return present, [ids_all[i] for i in present], g_count


def _two_pass_run(
    grads_p, grads_g, present, ids, g_count, k, w_p, w_g, mode, out, reduce_sums, use_ops
):
    n = len(grads_p)
    result: list[torch.Tensor | None] = [None] * n
    if present is None:
        ps, gs = list(grads_p), list(grads_g)
    elif not present:
        return result
    else:
        ps = [grads_p[i] for i in present]
        gs = [grads_g[i] for i in present]
    if out is None:
        outs = [torch.empty_like(p if p is not None else g) for p, g in zip(ps, gs)]
    else:
        outs = list(out) if present is None else [out[i] for i in present]
    if use_ops:
        sums = torch.ops.genrep_fast.group_sums(ps, gs, ids, g_count)
    else:
        sums = _group_sums_torch(ps, gs, ids, g_count)
    if reduce_sums is not None:
        sums = reduce_sums(sums)
        if not isinstance(sums, torch.Tensor) or sums.shape != (g_count, 3):
            raise ValueError(f"reduce_sums must return a [{g_count}, 3] tensor, got {sums!r}")
    if use_ops:
        torch.ops.genrep_fast.align_combine(ps, gs, sums, ids, k, w_p, w_g, mode, outs)
    else:
        _combine_torch(ps, gs, sums, ids, k, w_p, w_g, mode, outs)
    if present is None:
        return outs
    for j, i in enumerate(present):
        result[i] = outs[j]
    return result


def _group_sums_torch(ps, gs, ids, g_count):
    """Torch fallback of ``group_sums`` (float64 accumulation, same contract)."""
    device = next(t.device for t in (*ps, *gs) if t is not None)
    sums = torch.zeros(g_count, 3, dtype=torch.float64, device=device)
    for p, g, gid in zip(ps, gs, ids):
        if gid < 0:
            continue
        p64 = p.double() if p is not None else torch.zeros_like(g, dtype=torch.float64)
        g64 = g.double() if g is not None else torch.zeros_like(p, dtype=torch.float64)
        sums[gid] += torch.stack([(p64 * g64).sum(), (p64 * p64).sum(), (g64 * g64).sum()])
    return sums


def _combine_torch(ps, gs, sums, ids, k, w_p, w_g, mode, outs):
    """Torch fallback of ``align_combine``."""
    a, b = reference.alignment_coefficients(sums, k, w_p, w_g, mode)
    for p, g, gid, o in zip(ps, gs, ids, outs):
        ai, bi = (w_p, w_g) if gid < 0 else (a[gid], b[gid])
        upd = torch.zeros_like(o, dtype=torch.float64)
        if p is not None:
            upd = upd + ai * p.double()
        if g is not None:
            upd = upd + bi * g.double()
        o.copy_(upd)


# ---------------------------------------------------------------------------------------------
# Training-loop API
# ---------------------------------------------------------------------------------------------

GROUP_PRESETS = ("per_tensor", "global")


class GradientAligner:
    """Both task gradients of a training step, aligned per group, left in ``.grad``.

    ``aligner.backward(loss_p, loss_g)`` runs two backward passes over one graph
    (``torch.autograd.grad`` for each loss, the first with ``retain_graph=True``), aligns the two
    gradient lists with the ops and writes the update into the first list's buffers in place, then
    hands them to ``.grad`` (added when ``.grad`` already holds a gradient, like ``.backward``).
    Peak memory: the two gradient lists, no third copy.

    Args:
        model_or_params: an ``nn.Module`` (its parameters that require grad) or an iterable of
            parameters.
        groups: ``"per_tensor"`` or None (one group per parameter), ``"global"`` (one group), or a
            list of disjoint lists of parameters (or of indices into the parameter list), e.g.
            ``GradientAligner.by_module(model, predicate)``. Parameters in no group get
            ``w_p * p + w_g * g``.
        k, w_p, w_g, mode: as in ``align_gradients``.
        process_group: data parallel (DDP): both gradient lists are averaged over this group
            (``torch.distributed.group.WORLD`` when True) before alignment. Run the forward pass
            under ``ddp_model.no_sync()`` so DDP's own hooks do not all-reduce (see
            ``genrep_fast.distributed``).
        sharded: every rank holds its own shard of each parameter as a plain tensor (a ZeRO-style
            partition; gradients of the shard are already averaged over data-parallel ranks by the
            caller): only the ``[G, 3]`` sums are all-reduced (summed) over ``process_group`` so
            every rank forms the same ``a``, ``b``. DTensor parameters are not handled here: pass
            their local gradient shards to ``align_gradients(..., reduce_sums=...)``.
        backend: as in ``align_gradients``.

    AMP: pass losses scaled by one ``torch.amp.GradScaler`` (``scaler.scale(loss)``); the update
    is homogeneous of degree one in the scale, and a non-finite gradient in a group makes that
    group's update non-finite, so ``scaler.step`` skips the step.
    """

    def __init__(
        self,
        model_or_params: torch.nn.Module | Iterable[torch.nn.Parameter],
        groups: str | Sequence[Sequence[torch.Tensor | int]] | None = None,
        *,
        k: float = 2.0,
        w_p: float = 0.7,
        w_g: float = 0.3,
        mode: str = "symmetric",
        process_group: object = None,
        sharded: bool = False,
        backend: str = "auto",
    ):
        if isinstance(model_or_params, torch.nn.Module):
            params = [p for p in model_or_params.parameters() if p.requires_grad]
        elif isinstance(model_or_params, torch.Tensor):
            raise TypeError("model_or_params must be an nn.Module or an iterable of parameters")
        else:
            params = list(model_or_params)
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"model_or_params[{i}] must be a tensor, got {type(p).__name__}")
            if p.layout != torch.strided:
                raise TypeError(
                    f"model_or_params[{i}] must be a dense (strided) parameter, got layout "
                    f"{p.layout}"
                )
            if not p.requires_grad:
                raise ValueError(f"model_or_params[{i}] does not require grad")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("model_or_params lists a parameter more than once")
        if not params:
            raise ValueError("model_or_params holds no parameter that requires grad")
        self.params = params
        self.groups = self._resolve_groups(groups, params)
        self.k = check_real("k", k, minimum=0.0)
        self.w_p = check_real("w_p", w_p)
        self.w_g = check_real("w_g", w_g)
        self.mode = check_choice("mode", mode, MODES)
        self.backend = check_choice("backend", backend, BACKENDS)
        if not isinstance(sharded, bool):
            raise TypeError(f"sharded must be a bool, got {type(sharded).__name__}")
        if sharded and process_group is None:
            raise ValueError("sharded=True needs a process_group (or True for the world group)")
        self.process_group = process_group
        self.sharded = sharded
        # Checked gradient layouts -> their plan (see _plan). A few entries: one per layout a
        # training run meets (e.g. a parameter unused in some steps gives it a None gradient).
        self._plans: dict[tuple, _AlignPlan] = {}

    @staticmethod
    def _resolve_groups(groups, params) -> Groups:
        if groups is None or groups == "per_tensor":
            return None
        if groups == "global":
            return "global"
        if isinstance(groups, str) or not isinstance(groups, Sequence):
            raise TypeError(
                f"groups must be 'per_tensor', 'global', None or a list of lists of parameters, "
                f"got {groups!r}"
            )
        index = {id(p): i for i, p in enumerate(params)}
        resolved = []
        for gi, members in enumerate(groups):
            if isinstance(members, (str, bytes, torch.Tensor)) or not isinstance(members, Iterable):
                raise TypeError(f"groups[{gi}] must be a list of parameters, got {members!r}")
            ids = []
            for m in members:
                if isinstance(m, torch.Tensor):
                    if id(m) not in index:
                        raise ValueError(
                            f"groups[{gi}] holds a tensor of shape {tuple(m.shape)} that is not "
                            f"among the aligner's parameters"
                        )
                    ids.append(index[id(m)])
                else:
                    ids.append(m)
            resolved.append(ids)
        validate_groups(resolved, len(params))
        return resolved

    @staticmethod
    def by_module(
        model: torch.nn.Module,
        predicate: Callable[[str, torch.nn.Module], bool] | type | tuple[type, ...],
    ) -> list[list[torch.nn.Parameter]]:
        """One group per module that ``predicate(name, module)`` accepts (or per instance of the
        given class(es)), e.g. one group per attention block. A module nested inside an accepted
        one belongs to the outer group; parameters shared by two accepted modules go to the first.
        """
        if isinstance(predicate, type) or (
            isinstance(predicate, tuple) and all(isinstance(t, type) for t in predicate)
        ):
            classes = predicate

            def predicate(name, module):
                return isinstance(module, classes)

        elif not callable(predicate):
            raise TypeError(f"predicate must be callable or a class, got {predicate!r}")
        elif len(inspect.signature(predicate).parameters) != 2:
            raise TypeError("predicate must take (name, module)")
        taken: set[int] = set()
        groups: list[list[torch.nn.Parameter]] = []
        inside: list[str] = []
        for name, module in model.named_modules():
            if any(name.startswith(prefix + ".") for prefix in inside):
                continue
            if not predicate(name, module):
                continue
            inside.append(name)
            members = []
            for p in module.parameters():
                if p.requires_grad and id(p) not in taken:
                    taken.add(id(p))
                    members.append(p)
            if members:
                groups.append(members)
        return groups

    def backward(self, loss_p: torch.Tensor, loss_g: torch.Tensor) -> None:
        """Both gradients of one graph, aligned, accumulated into ``.grad`` of the parameters."""
        for name, loss in (("loss_p", loss_p), ("loss_g", loss_g)):
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"{name} must be a scalar tensor, got {loss!r}")
        grads_p = list(
            torch.autograd.grad(loss_p, self.params, retain_graph=True, allow_unused=True)
        )
        grads_g = list(torch.autograd.grad(loss_g, self.params, allow_unused=True))
        reduce_sums = None
        if self.process_group is not None:
            from genrep_fast import distributed

            group = None if self.process_group is True else self.process_group
            if self.sharded:
                reduce_sums = distributed.all_reduce_sums_fn(group)
            else:
                distributed.all_reduce_gradients(grads_p, group)
                distributed.all_reduce_gradients(grads_g, group)
        update = self.align(grads_p, grads_g, reduce_sums=reduce_sums)
        for param, u in zip(self.params, update):
            if u is None:
                continue
            if param.grad is None:
                param.grad = u
            else:
                param.grad.add_(u)

    def align(
        self,
        grads_p: Sequence[torch.Tensor | None],
        grads_g: Sequence[torch.Tensor | None],
        *,
        reduce_sums: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> list[torch.Tensor | None]:
        """The aligned update of two gradient lists of ``self.params``, for a loop that takes the
        gradients itself (e.g. summed over micro-batches, or reduced by DDP). The lists are the
        caller's to give up: the update is written into their buffers where no other entry
        shares the storage (else into a fresh one), so no third list is allocated. Checks and
        dispatch are cached per gradient layout; ``reduce_sums`` as in ``align_gradients``."""
        plan, out = self._prepare(grads_p, grads_g)
        return self._run(plan, grads_p, grads_g, out, reduce_sums)

    def _prepare(self, grads_p, grads_g) -> tuple[_AlignPlan, list[torch.Tensor | None]]:
        """The Python side of a step before the first launch: the plan (cached) and the output
        buffers. Timed on its own by bench/bench_alignment.py (the per-call overhead).

        Each out[i] is grads_p[i] / grads_g[i] with storage no other entry shares, or a fresh
        buffer: no aliasing to stage. Storage sharing is a property of this call's tensors, so it
        is checked every call (never cached by address). With the extension, the layout key and
        these choices come from one native pass (``torch.ops.genrep_fast.grad_layout``); without
        it, or for arguments it cannot read (which the Python checks then name), from Python.
        """
        native = _native_layout(grads_p, grads_g)
        if native is None:
            return self._plan(grads_p, grads_g), _writable_outputs(grads_p, grads_g)
        key, choice = native
        return self._plan(grads_p, grads_g, key), _outputs_of(grads_p, grads_g, choice)

    def _plan(self, grads_p, grads_g, key: object = None) -> _AlignPlan:
        """Validation and dispatch of a step, computed once per gradient layout.

        The key holds everything the checks and the plan read: per gradient its shape, dtype,
        device and layout (None for a missing gradient); ``key`` given: the same facts as
        ``grad_layout``'s code (a str). Two calls with equal keys pass and fail the same checks
        and get the same plan, so the key cannot go stale (no addresses in it).
        """
        if key is None:
            if not all(t is None or isinstance(t, torch.Tensor) for t in (*grads_p, *grads_g)):
                validate_gradients(grads_p, grads_g)  # names the entry that is not a tensor
            key = tuple(
                None if t is None else (t.shape, t.dtype, t.device, t.layout)
                for t in (*grads_p, *grads_g)
            )
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        validate_gradients(grads_p, grads_g)
        devices = {t.device for t in (*grads_p, *grads_g) if t is not None}
        if len(devices) > 1:
            raise ValueError(
                f"all gradients must be on one device, got {sorted(map(str, devices))}"
            )
        device = next(iter(devices)) if devices else torch.device("cpu")
        if self.backend == "ops" and not _ops_available(device):
            raise RuntimeError(
                f"backend='ops' needs the compiled extension genrep_fast._C with {device.type} "
                f"kernels"
            )
        use_ops = self.backend == "ops" or (self.backend == "auto" and _ops_available(device))
        present, ids, g_count = _two_pass_plan(grads_p, grads_g, self.groups)
        plan = _AlignPlan(use_ops, present, ids, g_count)
        if len(self._plans) >= _MAX_PLANS:
            self._plans.pop(next(iter(self._plans)))
        self._plans[key] = plan
        return plan

    def _run(self, plan, grads_p, grads_g, out, reduce_sums) -> list[torch.Tensor | None]:
        if not plan.use_ops and reduce_sums is None:
            return _align_validated(
                grads_p, grads_g, self.groups, self.k, self.w_p, self.w_g, self.mode, out,
                None, self.backend,
            )  # fmt: skip
        return _two_pass_run(
            grads_p, grads_g, plan.present, plan.ids, plan.num_groups, self.k, self.w_p,
            self.w_g, self.mode, out, reduce_sums, plan.use_ops,
        )  # fmt: skip


_MAX_PLANS = 8


@dataclasses.dataclass(frozen=True)
class _AlignPlan:
    """What a ``GradientAligner`` step needs beyond the tensors (see ``GradientAligner._plan``)."""

    use_ops: bool
    present: list[int] | None  # positions with a gradient; None: all
    ids: list[int]  # group id per present position
    num_groups: int


def _native_layout(grads_p, grads_g) -> tuple[str, list[int]] | None:
    """``(layout key, choice per position)`` from ``torch.ops.genrep_fast.grad_layout``, or None
    where the Python path runs instead: no such op in this build, under ``torch.compile``
    (fake tensors have no storage to compare), lists of different lengths or entries that are
    not tensors (the Python checks give those their one-line errors)."""
    if not _ops.HAS_GRAD_LAYOUT or torch.compiler.is_compiling() or len(grads_p) != len(grads_g):
        return None
    try:
        code, choice = torch.ops.genrep_fast.grad_layout(grads_p, grads_g)
    except (TypeError, RuntimeError):
        return None
    return code, choice


def _outputs_of(grads_p, grads_g, choice: list[int]) -> list[torch.Tensor | None]:
    """The output list of ``grad_layout``'s choices (0: p[i], 1: g[i], -1: a fresh buffer, -2:
    none), as ``_writable_outputs`` would choose it."""
    out: list[torch.Tensor | None] = []
    for p, g, c in zip(grads_p, grads_g, choice):
        if c == 0:
            out.append(p)
        elif c == 1:
            out.append(g)
        elif c == -1:
            out.append(
                torch.empty_like(p if p is not None else g, memory_format=torch.contiguous_format)
            )
        else:
            out.append(None)
    return out


def _writable_outputs(grads_p, grads_g) -> list[torch.Tensor | None]:
    """Where the update may go in place: a gradient buffer that is contiguous and whose storage
    no other entry shares (autograd may hand one tensor to two parameters, e.g. for ``a + b``, or
    an expanded stride-0 tensor for ``w.sum()``); a fresh buffer otherwise."""
    # One storage object per tensor, kept while both loops run: asking a tensor for its storage
    # again after the first object is freed costs ~10x more (measured: 1.2 ms vs 0.2 ms for 291
    # tensor pairs), and this runs every step.
    storages = [
        (None if p is None else p.untyped_storage(), None if g is None else g.untyped_storage())
        for p, g in zip(grads_p, grads_g)
    ]
    owners: dict[int, set[int]] = {}
    for i, pair in enumerate(storages):
        for st in pair:
            if st is not None:
                owners.setdefault(st.data_ptr(), set()).add(i)
    out: list[torch.Tensor | None] = []
    for i, (p, g) in enumerate(zip(grads_p, grads_g)):
        choice = None
        for t, st in zip((p, g), storages[i]):
            if (
                t is not None
                and t.is_contiguous()
                and owners[st.data_ptr()] == {i}
                and st.nbytes() == t.numel() * t.element_size()
            ):
                choice = t
                break
        if choice is None and (p is not None or g is not None):
            choice = torch.empty_like(
                p if p is not None else g, memory_format=torch.contiguous_format
            )
        out.append(choice)
    return out
