"""No host sync in a training step but the one allowed flag read (trainer issue, item 4).

A host sync is any read of a tensor's value back to Python: ``item``, ``int()``, ``float()``,
``bool()``, ``__index__``, ``tolist``, ``numpy``, ``cpu`` and ``nonzero`` (its output size is
data dependent). The CPU test wraps each of them with a counter while a tiny run takes its
stage-0/1/2 steps and attributes every read to the ``train_step`` call it happens in. The one
read a step may make is the non-finite guard's flag (``Trainer._finite_step``: one flag per step,
read on the host so a bad step is skipped); every other read fails the test (but the CPU-only
torch posterior backend's, see ``CPU_BACKEND``). Reads made by
``torch.optim`` of its own step counters are not counted: those counters live on the host
(``capturable=False``), so reading them does not wait for the device.

The GPU test runs the same steps on CUDA under ``torch.cuda.set_sync_debug_mode("error")``, with
only the flag read let through, so a new sync anywhere in the step raises there.
"""

from __future__ import annotations

import sys
from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from train_helpers import tiny_config

from genrep_fast.train.trainer import Trainer

READS = ("item", "__int__", "__float__", "__bool__", "__index__", "tolist", "numpy", "cpu")
ALLOWED = {"_finite_step"}  # the non-finite guard's one flag read per step
# Reads of the torch posterior backend, which the trainer runs on the CPU only (on CUDA,
# runtime.ops=fast resolves to the Triton kernels, which read nothing back: the GPU test below
# holds them to that). On the CPU the tensor read is a host tensor: no device to wait for.
CPU_BACKEND = {"_difference_form_where_not_finite"}


class SyncCounter:
    """Counts value reads inside ``train_step`` calls, per call: ``steps`` holds one Counter of
    ``(method, caller)`` per step, tagged with its stage."""

    def __init__(self):
        self.steps: list[tuple[int, Counter]] = []
        self.current: Counter | None = None

    def record(self, name: str) -> None:
        if self.current is None:
            return
        frame = sys._getframe(2)
        if "torch/optim" in frame.f_code.co_filename.replace("\\", "/"):
            return  # the optimiser's host-side step counters
        # the first frame in this package names the read's origin
        where = frame
        while where is not None and "genrep_fast" not in where.f_code.co_filename:
            where = where.f_back
        origin = where.f_code.co_name if where is not None else frame.f_code.co_name
        self.current[(name, origin)] += 1

    @contextmanager
    def installed(self, trainer: Trainer):
        saved = {}
        for name in READS:
            saved[name] = torch.Tensor.__dict__.get(name)
            orig = getattr(torch.Tensor, name)

            def wrapper(self_t, *a, _name=name, _orig=orig, **k):
                counter.record(_name)
                return _orig(self_t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        counter = self
        orig_nonzero = torch.nonzero

        def nonzero(*a, **k):
            counter.record("nonzero")
            return orig_nonzero(*a, **k)

        orig_t_nonzero = torch.Tensor.nonzero

        def t_nonzero(self_t, *a, **k):
            counter.record("nonzero")
            return orig_t_nonzero(self_t, *a, **k)

        orig_step = trainer.train_step

        def train_step(stage, *a, **k):
            self.current = Counter()
            try:
                return orig_step(stage, *a, **k)
            finally:
                self.steps.append((stage, self.current))
                self.current = None

        trainer.train_step = train_step
        torch.nonzero = nonzero
        torch.Tensor.nonzero = t_nonzero
        try:
            yield self
        finally:
            for name, fn in saved.items():
                if fn is None:
                    delattr(torch.Tensor, name)
                else:
                    setattr(torch.Tensor, name, fn)
            torch.nonzero = orig_nonzero
            torch.Tensor.nonzero = orig_t_nonzero
            del trainer.train_step

    def per_stage(self) -> dict[int, list[Counter]]:
        out: dict[int, list[Counter]] = {}
        for stage, c in self.steps:
            out.setdefault(stage, []).append(c)
        return out


def _disallowed(c: Counter) -> Counter:
    return Counter({k: v for k, v in c.items() if k[1] not in ALLOWED | CPU_BACKEND})


def test_counter_sees_reads():
    """The counter catches each kind of read (so a zero below means no read, not a blind spot)."""
    counter = SyncCounter()

    class Fake:
        def train_step(self, stage):
            x = torch.arange(4)
            int(x[1]), float(x[1]), bool(x[1]), x[1].item(), x.tolist(), x.numpy()
            [0, 1][x[1]], x.cpu(), torch.nonzero(x), x.nonzero()

    fake = Fake()
    with counter.installed(fake):
        fake.train_step(0)
    (_, c), *_ = counter.steps
    names = {name for name, _ in c}
    assert names == set(READS) | {"nonzero"}, names


@pytest.mark.parametrize("extra", [[], ["diffusion.candidate_classes=3"]], ids=["all", "top3"])
def test_training_step_reads_only_the_finite_flag(tmp_path, extra):
    # log_every past the stage length: only each stage's last step logs (its float() reads of
    # the loss parts happen outside train_step anyway). top3: the posterior over candidate
    # classes (class_index, whose range check is a read).
    cfg = tiny_config(tmp_path, "runtime.log_every=100", "stage2.steps=4", *extra)
    tr = Trainer(cfg)
    counter = SyncCounter()
    with counter.installed(tr):
        tr.run()
    stages = counter.per_stage()
    assert sorted(stages) == [0, 1, 2]
    report = {
        s: [sum(_disallowed(c).values()) for c in steps] for s, steps in sorted(stages.items())
    }
    bad = {
        s: dict(sum((_disallowed(c) for c in steps), Counter()))
        for s, steps in stages.items()
        if any(_disallowed(c) for c in steps)
    }
    assert not bad, f"host syncs per step {report}; reads: {bad}"
    # The non-finite guard reads its flag exactly once a step (world == 1: one bool()).
    for steps in stages.values():
        for c in steps:
            assert sum(v for k, v in c.items() if k[1] in ALLOWED) == 1, c


def test_out_of_range_labels_fail_before_the_first_step(tmp_path):
    """The step skips the adapter's value checks: the training set's ids are checked up front."""
    tr = Trainer(tiny_config(tmp_path))
    labels = tr.train_set.labels.clone()  # (not the tensor a cached data set may share)
    labels[3] = tr.net.num_classes
    tr.train_set.labels = labels
    with pytest.raises(ValueError, match="class ids"):
        tr.run()
    assert tr.history == []


@pytest.mark.gpu
def test_training_step_has_no_cuda_sync(tmp_path, monkeypatch):
    """A few steps of every stage on CUDA with sync debug mode "error" (each stage's first step
    excepted: it warms up): any sync but the guard's flag read (let through below) raises."""
    cfg = tiny_config(tmp_path, "runtime.device=cuda", "runtime.log_every=100", "stage2.steps=4")
    tr = Trainer(cfg)
    tr.timer.sync = False  # the section timer's synchronize() is a sync of its own
    orig_finite = tr._finite_step

    def finite_step(*a, **k):  # the one allowed read
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return orig_finite(*a, **k)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    monkeypatch.setattr(tr, "_finite_step", finite_step)
    orig_step = tr.train_step
    steps = Counter()

    def train_step(stage, *a, **k):
        # each stage's first step warms up (Triton compiles and autotunes, cuBLAS and optimiser
        # state are made): the steps after it are held to no sync
        torch.cuda.set_sync_debug_mode("error" if steps[stage] else 0)
        try:
            out = orig_step(stage, *a, **k)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        steps[stage] += 1
        return out

    monkeypatch.setattr(tr, "train_step", train_step)
    tr.run()
    assert steps == {0: 3, 1: 3, 2: 4}
