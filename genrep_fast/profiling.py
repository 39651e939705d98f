"""NVTX ranges for Nsight Systems / Nsight Compute.

``nvtx_range(name)`` works as a context manager and as a decorator. It is backed by the ``nvtx``
package when that is installed (``pip install nvtx``) and is a no-op otherwise, so the same code runs
on a CPU build of torch (where ``torch.cuda.nvtx`` raises). Ranges are cheap (about a microsecond
with nvtx installed), but keep them out of per-element loops.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TypeVar

try:
    import nvtx as _nvtx

    HAS_NVTX = True
except ImportError:
    _nvtx = None
    HAS_NVTX = False

F = TypeVar("F", bound=Callable)

DOMAIN = "genrep_fast"


class nvtx_range(contextlib.ContextDecorator):  # noqa: N801 - reads like a function at call sites
    """``with nvtx_range("bank_refresh"): ...`` or ``@nvtx_range("features")``."""

    def __init__(self, name: str, color: str | None = None):
        if not isinstance(name, str) or not name:
            raise ValueError(f"nvtx_range: name must be a non-empty str, got {name!r}")
        self.name = name
        self.color = color

    def __enter__(self) -> nvtx_range:
        if _nvtx is not None:
            _nvtx.push_range(self.name, color=self.color, domain=DOMAIN)
        return self

    def __exit__(self, *exc) -> bool:
        if _nvtx is not None:
            _nvtx.pop_range(domain=DOMAIN)
        return False


def annotate(name: str | None = None) -> Callable[[F], F]:
    """Decorator form with the function's qualified name as the default range name."""

    def wrap(fn: F) -> F:
        label = name or fn.__qualname__

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with nvtx_range(label):
                return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap
