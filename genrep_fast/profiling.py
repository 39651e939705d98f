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


class ProfileWindow:
    """Opens a profiler capture for ``count`` steps from step ``first`` (``at_step`` is called with
    the step about to run): ``start()`` before step ``first``, ``stop()`` before step
    ``first + count``. For ``nsys profile --capture-range=cudaProfilerApi``, whose capture the CUDA
    profiler API opens and closes (``torch.cuda.profiler.start/stop``, the defaults when CUDA is
    present; nothing happens without CUDA). ``count = 0``: never."""

    def __init__(self, first: int, count: int, start=None, stop=None):
        if first < 0 or count < 0:
            raise ValueError(f"ProfileWindow: first and count must be >= 0, got {first}, {count}")
        self.first, self.count = first, count
        self.active = False
        if start is None or stop is None:
            import torch

            cuda = torch.cuda.is_available()
            start = start or (torch.cuda.profiler.start if cuda else lambda: None)
            stop = stop or (torch.cuda.profiler.stop if cuda else lambda: None)
        self._start, self._stop = start, stop

    def at_step(self, step: int) -> None:
        if not self.count:
            return
        if not self.active and self.first <= step < self.first + self.count:
            self._start()
            self.active = True
        elif self.active and step >= self.first + self.count:
            self.close()

    def close(self) -> None:
        if self.active:
            self._stop()
            self.active = False
