"""Argument checks shared by the public API.

Every check raises ``TypeError`` (wrong kind, layout or dtype: a list for a tensor, a sparse
tensor) or ``ValueError`` (wrong shape, range or device, a meta tensor) with a message that names
the argument, what it got and what was expected. Checks never
modify their inputs, so bad input changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    # bool is an int subclass; True as a step count is almost certainly a bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(name: str, value: object, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_tensor(name: str, t: object) -> torch.Tensor:
    """A dense tensor that holds data: not a list, not sparse, not on the meta device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    # device.type, not is_meta: under torch.compile the tensors are fake ones on a real device.
    if t.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device (a shape without data); the ops compute values, pass "
            f"a cpu or cuda tensor"
        )
    return t


def check_float_tensor(name: str, t: object, *, min_ndim: int = 0) -> torch.Tensor:
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}"
        )
    if t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    return t


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {desc}")


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    dtypes = {k: v.dtype for k, v in present.items()}
    if len(set(dtypes.values())) > 1:
        desc = ", ".join(f"{k} is {d}" for k, d in dtypes.items())
        raise TypeError(f"tensors must share one floating dtype, got {desc}")


def check_positive_finite(name: str, t: torch.Tensor) -> None:
    """sigma must be > 0 and finite everywhere. One host sync: skip with validate=False."""
    if t.numel() == 0:
        return
    bad = ~(torch.isfinite(t) & (t > 0))
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0].tolist())
        raise ValueError(
            f"{name} must be finite and > 0 everywhere; {name}[{', '.join(map(str, idx))}] = "
            f"{t[idx].item()!r}"
        )


def check_class_index(
    class_index: torch.Tensor,
    *,
    num_classes: int,
    shape: tuple[int, int] | None = None,
    rows: int | None = None,
    check_values: bool = True,
) -> None:
    """Candidate classes ``[B, K]`` (int64 or int32; already a checked tensor on the right
    device): exactly ``shape`` when given, else ``[rows, K >= 1]``; with ``check_values`` every
    value in ``[0, num_classes)`` (one host sync, skipped under torch.compile, where it would
    break the graph: a compiled caller validates its indices eagerly once)."""
    if class_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"class_index must be int64 or int32, got {class_index.dtype}")
    if shape is not None:
        if tuple(class_index.shape) != tuple(shape):
            raise ValueError(
                f"class_index must have the shape of log_likelihood {tuple(shape)}, got "
                f"{tuple(class_index.shape)}"
            )
    elif class_index.dim() != 2 or class_index.shape[0] != rows or class_index.shape[1] < 1:
        raise ValueError(
            f"class_index must be [B, K] = [{rows}, K >= 1], got shape {tuple(class_index.shape)}"
        )
    if (
        check_values
        and class_index.numel()
        and not torch.compiler.is_compiling()
        and (int(class_index.min()) < 0 or int(class_index.max()) >= num_classes)
    ):
        raise ValueError(
            f"class_index values must lie in [0, {num_classes}) (C = number of classes), got "
            f"range [{int(class_index.min())}, {int(class_index.max())}]"
        )
