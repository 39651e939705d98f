"""NVTX ranges around the trainer's phases and the CUDA profiler window (docs/TRAINING.md,
"Profile with Nsight Systems"), checked on the CPU with recording stand-ins."""

from __future__ import annotations

import pytest
from train_helpers import tiny_config

from genrep_fast import profiling
from genrep_fast.profiling import ProfileWindow
from genrep_fast.train.config import ConfigError
from genrep_fast.train.trainer import Trainer


class _RecordingNvtx:
    def __init__(self):
        self.open: list[str] = []
        self.seen: list[str] = []

    def push_range(self, name, color=None, domain=None):
        assert domain == profiling.DOMAIN
        self.open.append(name)
        self.seen.append(name)

    def pop_range(self, domain=None):
        self.open.pop()


def test_every_trainer_phase_is_an_nvtx_range_and_the_window_spans_stage_2(tmp_path, monkeypatch):
    nvtx = _RecordingNvtx()
    monkeypatch.setattr(profiling, "_nvtx", nvtx)
    calls = []
    monkeypatch.setattr(
        Trainer,
        "_profile_window",
        lambda self, first, count: ProfileWindow(
            first,
            count,
            start=lambda: calls.append(("start", self.stage, self.step)),
            stop=lambda: calls.append(("stop", self.stage, self.step)),
        ),
    )
    cfg = tiny_config(
        tmp_path, "stage2.steps=5", "runtime.profile_from=1", "runtime.profile_steps=2"
    )
    Trainer(cfg, tmp_path).run()
    assert not nvtx.open  # every range was closed
    seen = set(nvtx.seen)
    for phase in ("data", "features", "posterior", "bank_refresh", "generation", "backward_p",
                  "backward_g", "alignment", "optimizer", "ema"):  # fmt: skip
        assert f"genrep.{phase}" in seen, phase
    for stage in (0, 1, 2):
        assert f"genrep.stage{stage}.step" in seen
    # The capture opens before stage-2 step 1 and closes before step 3, once.
    assert calls == [("start", 2, 1), ("stop", 2, 3)]


def test_profile_window_edges():
    calls = []
    w = ProfileWindow(2, 3, start=lambda: calls.append("start"), stop=lambda: calls.append("stop"))
    for step in range(8):
        w.at_step(step)
        calls.append(step)
    assert calls == [0, 1, "start", 2, 3, 4, "stop", 5, 6, 7]
    w = ProfileWindow(6, 3, start=lambda: calls.append("s2"), stop=lambda: calls.append("e2"))
    w.at_step(7)  # resumed inside the window: starts there, and close() ends it
    w.close()
    assert calls[-2:] == ["s2", "e2"]
    never = ProfileWindow(0, 0, start=lambda: calls.append("x"), stop=lambda: calls.append("x"))
    never.at_step(0)
    assert "x" not in calls
    with pytest.raises(ValueError, match="first and count"):
        ProfileWindow(-1, 2)


def test_profile_keys_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="runtime.profile_steps"):
        tiny_config(tmp_path, "runtime.profile_steps=-1")
