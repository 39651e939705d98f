"""Launch configs of the Triton kernels: a small autotuner, and the CUDA device guard that every
launch of ``genrep_fast.kernels`` runs under.

A kernel's launcher keeps a short list of configs (plain dicts of launch keywords: its ``BLOCK_*``
constexprs, ``num_warps``, ``num_stages``), the first being the default, and hands one launch to
``tuned(name, configs, key, device, run)``; ``run(config)`` allocates the outputs, launches and
returns them. ``tuned`` then:

* on CUDA, the first time it sees ``(name, key, device)``, times every config (``WARMUP`` + ``REPS``
  runs each, on the current stream, CUDA events) and caches the fastest; later calls with that key
  launch the cached config with no timing and no host sync. ``key`` holds what the best config
  depends on (sizes, dtypes, constexpr flags), not the data;
* while a CUDA graph is being captured, launches the config chosen for that key before the
  capture (a warm-up call), else the first (timing would sync);
* under the interpreter (``TRITON_INTERPRET=1``), on any other device, with
  ``GENREP_FAST_AUTOTUNE=0``, or while ``torch.use_deterministic_algorithms`` is on, launches the
  first config only.

Numerics across configs: every config computes the same sums in the same precision, but a
different ``BLOCK_D`` (or ``num_warps``, which changes Triton's reduction tree) changes the
summation order, so two configs agree to rounding (a few fp32 ulps of each result; the bounds
of docs/NUMERICS.md hold for each config: ``tests/test_tuning.py`` checks every config against
float64), not bitwise. Each config is deterministic by itself (no atomics); the choice is made once per
process, so results are bitwise reproducible across runs only with the first config pinned
(``GENREP_FAST_AUTOTUNE=0`` or deterministic algorithms on).

The timing runs ``run`` several times on fresh outputs and reads the events back (a host sync):
only on the first call of a key, which the training loop makes in its first (warm-up) step.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar

import torch

AUTOTUNE_ENV = "GENREP_FAST_AUTOTUNE"
# Timing per config: one warm-up run (compiles the config), then REPS timed runs. The shapes that
# matter take 0.1-100 ms a launch, so 3 runs separate configs that differ by more than noise.
WARMUP = 1
REPS = 3

Config = Mapping[str, object]
R = TypeVar("R")

# (kernel name, key, device) -> index of the fastest config.
_BEST: dict[tuple[str, tuple, str], int] = {}
# (kernel name, key, device) -> (configs, milliseconds of each; inf where it did not fit): the
# measurements behind each choice, for the benchmark report.
_TIMES: dict[tuple[str, tuple, str], tuple[tuple[Config, ...], tuple[float, ...]]] = {}
# The device a launch runs under (set by ``device_guard``): what the guard tests check.
_GUARDED: contextvars.ContextVar[torch.device | None] = contextvars.ContextVar(
    "genrep_fast_guarded_device", default=None
)
# Set by the compile gate: ``tuned`` launches every config (compiles them), returns the first's.
_EVERY_CONFIG: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "genrep_fast_every_config", default=False
)


def autotune_enabled() -> bool:
    """False with ``GENREP_FAST_AUTOTUNE=0`` and with ``torch.use_deterministic_algorithms(True)``:
    then every launch uses its first config."""
    env = os.environ.get(AUTOTUNE_ENV, "1").strip().lower()
    if env not in ("0", "1", "false", "true", "off", "on", ""):
        raise ValueError(f"{AUTOTUNE_ENV}={env!r}: expected 0 or 1")
    if env in ("0", "false", "off"):
        return False
    return not torch.are_deterministic_algorithms_enabled()


def interpreted() -> bool:
    """True under the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def device_guard(device: torch.device) -> Iterator[None]:
    """Within: ``device`` is the current CUDA device (``torch.cuda.device``), so a launch for
    tensors on ``cuda:1`` runs on cuda:1 and on its current stream even while cuda:0 is current.
    A no-op device switch for CPU and meta tensors (the interpreter, the compile gate)."""
    token = _GUARDED.set(device)
    try:
        if device.type == "cuda":
            with torch.cuda.device(device):
                yield
        else:
            yield
    finally:
        _GUARDED.reset(token)


def guarded_device() -> torch.device | None:
    """The device of the innermost ``device_guard`` active here (None outside any)."""
    return _GUARDED.get()


@contextlib.contextmanager
def every_config() -> Iterator[None]:
    """Within: ``tuned`` runs every config of its list (the compile gate compiles them all)."""
    token = _EVERY_CONFIG.set(True)
    try:
        yield
    finally:
        _EVERY_CONFIG.reset(token)


def tuned(
    name: str,
    configs: Sequence[Config],
    key: tuple,
    device: torch.device,
    run: Callable[[Config], R],
) -> R:
    """``run(config)`` under ``device_guard(device)`` with the config of ``configs`` chosen for
    ``(name, key, device)`` (``choose``); returns what ``run`` returns.

    ``name``: the kernel's name (the cache separates kernels); ``configs``: non-empty, the first
    the default; ``key``: hashable, what the best config depends on. ``run`` must not accumulate
    into its inputs: the timing calls it several times.
    """
    if not configs:
        raise ValueError(f"tuned({name!r}): configs is empty; expected at least one config")
    with device_guard(device):
        if _EVERY_CONFIG.get():
            results = [run(cfg) for cfg in configs]
            return results[0]
        return run(configs[choose(name, configs, key, device, run)])


def choose(
    name: str,
    configs: Sequence[Config],
    key: tuple,
    device: torch.device,
    run: Callable[[Config], object],
    timer: Callable[[Callable[[], object]], float] | None = None,
) -> int:
    """Index into ``configs`` for ``(name, key, device)``: 0 with one config or autotuning off
    (``autotune_enabled``); else the cached choice, or the config of least ``timer(lambda:
    run(config))`` (cached). ``timer`` None: CUDA events on the current stream, and 0 off CUDA
    and under the interpreter; during a CUDA graph capture the cached choice (that of a warm-up
    call before it), else 0 (no timing, no sync there)."""
    if len(configs) == 1 or not autotune_enabled():
        return 0
    cache_key = (name, key, str(device))
    if timer is None:
        if device.type != "cuda" or interpreted():
            return 0
        if torch.cuda.is_current_stream_capturing():
            return _BEST.get(cache_key, 0)
        timer = _cuda_time
    best = _BEST.get(cache_key)
    if best is None:
        times = _times(configs, run, timer)
        best = min(range(len(times)), key=times.__getitem__)
        _BEST[cache_key] = best
        _TIMES[cache_key] = (tuple(configs), tuple(times))
    return best


def _cuda_time(fn: Callable[[], object]) -> float:
    """Mean milliseconds of ``fn`` over REPS runs after WARMUP, CUDA events on the current stream
    (the read-back of the end event is this tuner's one host sync)."""
    for _ in range(WARMUP):
        fn()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPS):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / REPS


def _times(configs: Sequence[Config], run: Callable[[Config], object], timer) -> list[float]:
    """``timer`` of each config; inf for a config that does not fit the device (Triton's
    ``OutOfResources``: shared memory, registers; or out of device memory, e.g. a split GEMM
    form's scratch or per-call operand parts where the fused kernel needs none)."""
    from triton.runtime.errors import OutOfResources

    times = []
    for cfg in configs:
        try:
            times.append(timer(lambda cfg=cfg: run(cfg)))
        except (OutOfResources, torch.OutOfMemoryError):
            times.append(math.inf)
    if all(math.isinf(t) for t in times):
        raise RuntimeError(f"no config of {list(configs)} fits this device")
    return times


def chosen() -> dict[tuple[str, tuple, str], int]:
    """A copy of the cache: ``(kernel name, key, device) -> index of the chosen config``."""
    return dict(_BEST)


def report() -> list[dict]:
    """Every timed choice of this process, for the benchmark report: kernel name, key, device,
    the configs, their milliseconds (None where one did not fit) and the chosen index."""
    rows = []
    for (name, key, device), (configs, times) in _TIMES.items():
        rows.append(
            {
                "kernel": name,
                "key": _plain(key),
                "device": device,
                "configs": [_config_dict(c) for c in configs],
                "ms": [None if math.isinf(t) else t for t in times],
                "chosen": _BEST[(name, key, device)],
            }
        )
    return rows


def _config_dict(config) -> dict:
    """A config as a plain dict: a mapping as it is, a named tuple (``GemmConfig``) by field."""
    return dict(config._asdict()) if hasattr(config, "_asdict") else dict(config)


def _plain(v):
    """``v`` as JSON values: tuples as lists, anything else that is not a number, a string, a
    bool or None (a dtype) as its ``str``."""
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v if v is None or isinstance(v, (int, float, str, bool)) else str(v)


def clear() -> None:
    """Forget every choice (the next call of each key times its configs again)."""
    _BEST.clear()
    _TIMES.clear()


def fit_blocks(config: Config, **limits: int) -> dict[str, object]:
    """``config`` as launch keywords with each ``BLOCK_<X>`` named in ``limits`` capped at
    ``limits[X]`` (a power of two: ``triton.next_power_of_2`` of the size), so a small shape
    does not pay for a large tile."""
    out = dict(config)
    for name, limit in limits.items():
        out[name] = min(int(out[name]), limit)
    return out
