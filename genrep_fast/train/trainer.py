"""The two-stage GenRep trainer (docs/METHOD.md section 4).

* Stage 0 (only when no pretrained backbone is given): plain DDPM training, standing in for the
  pretrained diffusion model the paper starts from.
* Stage 1: ``eps_sem`` learns ``L_percept = CE + L_gen_distil``; the teacher of the distillation
  is the class posterior of the chain bank, refreshed from the current model every R steps.
* Stage 2: ``eps_unified`` starts as a copy of ``eps_sem``. Every step, on one batch: L_percept
  and L_genera (with ``x_sem`` from the EMA teacher ``eps_sem``), their two gradients (two
  backward passes), aligned per attention block, one optimiser step, then
  ``theta_sem <- m theta_sem + (1 - m) theta_unified`` with one fused ``torch._foreach_lerp_``.

``runtime.ops = "reference"`` swaps the posterior, the alignment and the EMA for the eager
reference implementations, so the end-to-end speedup of the package's ops can be measured.

Faults: a step whose loss or update is not finite is skipped (no optimiser step, no EMA; the
batch is consumed and the step counts), logged with its batch's sample indices, and
``runtime.max_bad_steps`` consecutive skips stop the run (``TrainingDiverged``, exit code 4 of the
CLI). The check is one flag per step read on the host: the step's only read of a value (labels are
range-checked once per training set, the model calls skip their value checks; tests/
test_train_syncs.py counts the reads; on CUDA, ``Timer`` still synchronises at each section's
edges unless its ``sync`` is off). A non-finite bank is
not installed; a checkpoint with a non-finite tensor is refused. ``backbone_lr_scale: 0`` freezes
the backbone for the stage (``requires_grad`` off: no graph or gradient is made for it).

Data parallel: under ``torchrun`` every process takes its slice of each global batch; both task
gradients are averaged over the processes (``genrep_fast.distributed.all_reduce_gradients``)
before alignment (alignment is non-linear, it must see the global batch's gradients), so every
replica applies the same update. Gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from genrep_fast import align_gradients
from genrep_fast.profiling import ProfileWindow, nvtx_range
from genrep_fast.train import checkpoint as ckpt
from genrep_fast.train.config import ConfigError, TrainConfig, run_defining_changes
from genrep_fast.train.data import Batches, build_datasets, describe_sample
from genrep_fast.train.network import (
    GenRepNet,
    build_chain_bank,
    build_network,
    generation_loss,
    perception_loss,
)

STAGES = (0, 1, 2)
TIMING_SECTIONS = (
    "data",
    "features",
    "bank_refresh",
    "posterior",
    "generation",
    "backward_p",
    "backward_g",
    "alignment",
    "allreduce",
    "optimizer",
    "ema",
)


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was written before this was raised."""

    def __init__(self, signum: int, checkpoint: Path | None):
        super().__init__(f"stopped by signal {signum}; checkpoint: {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint


class TrainingDiverged(Exception):
    """``runtime.max_bad_steps`` consecutive steps had a non-finite loss or gradient; the model,
    the optimiser and the EMA teacher hold the last finite state (no checkpoint is written)."""

    exit_code = 4


class Timer:
    """Wall seconds per named section (CUDA synchronised at the edges when timing a GPU run;
    ``sync = False`` keeps the sections' host syncs out, the seconds then time the launches)."""

    def __init__(self, device: torch.device, sync: bool = True):
        self.device = device
        self.sync = sync
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        # Each section is also an NVTX range "genrep.<name>" (Nsight Systems' timeline).
        with nvtx_range(f"genrep.{name}"):
            sync = self.sync and self.device.type == "cuda"
            if sync:
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            try:
                yield
            finally:
                if sync:
                    torch.cuda.synchronize(self.device)
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def ema_update(
    teacher: list[torch.Tensor], student: list[torch.Tensor], decay: float, fused: bool = True
) -> None:
    """``teacher <- decay * teacher + (1 - decay) * student`` in place.

    ``fused``: one multi-tensor ``torch._foreach_lerp_`` (a single kernel launch per tensor chunk
    on CUDA); otherwise the per-tensor loop a training script usually writes (the reference).
    """
    if fused:
        torch._foreach_lerp_(teacher, student, 1.0 - decay)
    else:
        for t, s in zip(teacher, student):
            t.mul_(decay).add_(s, alpha=1.0 - decay)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up to 1, then constant or cosine decay to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine" and total > warmup:
        frac = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return 1.0


def resolve_device(name: str) -> torch.device:
    from genrep_fast.train.preflight import check_device

    check_device(name)  # a ConfigError naming runtime.device, not torch's AssertionError
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", local)
        return torch.device("cpu")
    return torch.device(name)


class Trainer:
    """Runs the stages of a ``TrainConfig``; see the module docstring.

    Args:
        cfg: the validated configuration.
        out_dir: run folder (checkpoints, metrics.jsonl, pictures); default ``cfg.out_dir``.
        resume: a checkpoint folder or run folder to continue from (exactly: same weights,
            optimiser moments, RNG states, bank, data position). A run folder whose ``latest`` is
            broken resumes from its newest intact checkpoint.
        allow_config_change: resume even if ``cfg`` differs from the checkpoint's config in a
            run-defining key (``config.RUN_DEFINING_KEYS``); otherwise that is a ``ConfigError``
            listing the keys. A changed ``diffusion.*`` drops the saved bank (it is rebuilt).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | Path | None = None,
        *,
        resume: str | Path | None = None,
        allow_config_change: bool = False,
    ):
        self.cfg = cfg
        self.out_dir = Path(out_dir or cfg.out_dir)
        self._init_distributed()
        rt = cfg.runtime
        if rt.threads:
            torch.set_num_threads(rt.threads)
        self.device = resolve_device(rt.device) if self.world == 1 else self._dist_device
        self.fast = rt.ops == "fast"
        self.backend = "auto" if self.fast else "reference"
        if rt.autocast == "bf16" or (rt.autocast == "auto" and self.device.type == "cuda"):
            self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16)
        else:
            self.autocast = None
        self._seed_everything(cfg.seed)
        self.train_set, self.test_set = build_datasets(cfg.data, cfg.seed)
        self.net: GenRepNet = build_network(cfg, self.device)
        # The noise schedule on the device once (diffusers' add_noise moves it on first use; the
        # losses index it every step): no blocking host-to-device copy inside a step.
        sched = self.net.scheduler
        sched.alphas_cumprod = sched.alphas_cumprod.to(self.device)
        if rt.compile:
            self.net.backbone.compile()
        self.teacher: GenRepNet | None = None
        self.bank = None
        self.stage = 0 if cfg.stage0.steps > 0 else 1
        self.step = 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.generator = self._new_generator(self.stage)
        self.timer = Timer(self.device)
        self.stage_seconds: dict[int, float] = {}
        self.history: list[dict] = []
        self._stop_signal: int | None = None
        self._stop_agreed = False  # world > 1: the stop flag all ranks agreed on at the last step
        self.bad_steps = 0  # steps skipped for a non-finite loss or gradient, whole run
        self.bad_streak = 0  # ... consecutive, up to the last step
        self._step_ok = True
        # The dataset whose class ids were range-checked once (_check_labels); None: check per batch.
        self._labels_checked = None
        self._step_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._saved: tuple[tuple[int, int], Path] | None = None
        self._tb = None
        if self.rank == 0:
            for p in ckpt.remove_stale_temporaries(self.out_dir / "checkpoints"):
                print(
                    f"genrep-fast: removed {p}, left by a killed checkpoint write", file=sys.stderr
                )
        if resume is not None:
            self.load(resume, allow_config_change=allow_config_change)
        if self.rank == 0:  # after load: a refused resume leaves the run folder as it was
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    # ------------------------------------------------------------------ setup

    def _init_distributed(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self._dist_device = torch.device("cpu")
        if self.world > 1:
            if not dist.is_initialized():
                use_cuda = torch.cuda.is_available() and self.cfg.runtime.device != "cpu"
                dist.init_process_group("nccl" if use_cuda else "gloo")
            if torch.cuda.is_available() and self.cfg.runtime.device != "cpu":
                local = int(os.environ.get("LOCAL_RANK", 0))
                torch.cuda.set_device(local)
                self._dist_device = torch.device("cuda", local)

    def _seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)  # noqa: NPY002 - seeds third-party code that uses the global state
        torch.manual_seed(seed)

    def _new_generator(self, stage: int) -> torch.Generator:
        # one stream per stage (and per rank): a resumed stage replays the same noise
        g = torch.Generator(self.device)
        g.manual_seed(self.cfg.seed * 7919 + stage * 104_729 + self.rank)
        return g

    def stage_config(self, stage: int):
        return getattr(self.cfg, f"stage{stage}")

    def trainable(self, stage: int) -> list[tuple[str, torch.nn.Parameter, float]]:
        """(name, parameter, lr scale) of what a stage trains."""
        st = self.stage_config(stage)
        out = [
            (f"backbone.{n}", p, st.backbone_lr_scale)
            for n, p in self.net.backbone.named_parameters()
        ]
        if stage >= 1:
            out += [(f"head.{n}", p, 1.0) for n, p in self.net.head.named_parameters()]
        if stage == 2 and self.cfg.loss.semantic:
            out += [(f"modulation.{n}", p, 1.0) for n, p in self.net.modulation.named_parameters()]
        return [(n, p, s) for n, p, s in out if s > 0]

    def _make_optimizer(self, stage: int) -> None:
        st = self.stage_config(stage)
        params = self.trainable(stage)
        self.params = [p for _, p, _ in params]
        self.param_names = [n for n, _, _ in params]
        # What the stage does not train is frozen: autograd then builds no graph for it (a frozen
        # backbone's forward is inference only) and no gradient is computed for it.
        trained = {id(p) for p in self.params}
        for p in self.net.parameters():
            p.requires_grad_(id(p) in trained)
        groups: dict[float, list] = {}
        for _, p, s in params:
            groups.setdefault(s, []).append(p)
        self.optimizer = torch.optim.AdamW(
            [{"params": ps, "lr": st.lr * s, "lr_scale": s} for s, ps in groups.items()],
            lr=st.lr,
            betas=tuple(st.betas),
            weight_decay=st.weight_decay,
            foreach=self.fast,
        )
        self.align_groups = self._alignment_groups() if stage == 2 else None

    def _alignment_groups(self):
        mode = self.cfg.align.groups
        if mode == "per_tensor":
            return None
        if mode == "global":
            return "global"
        index = {n: i for i, n in enumerate(self.param_names)}
        groups = []
        for block in self.net.adapter.attention_block_names:
            prefix = f"backbone.{block}."
            members = [i for n, i in index.items() if n.startswith(prefix)]
            if members:
                groups.append(members)
        return groups

    def _set_lr(self, stage: int, step: int) -> float:
        st = self.stage_config(stage)
        f = lr_factor(step, st.warmup_steps, st.steps, st.schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = st.lr * g["lr_scale"] * f
        return st.lr * f

    # ------------------------------------------------------------------ bank

    def refresh_bank(self) -> None:
        g = torch.Generator(self.device)
        g.manual_seed(self.cfg.seed * 31 + self.stage * 1_000_003 + self.step)
        with self.timer("bank_refresh"):
            bank = build_chain_bank(
                self.net, self.cfg, g, modulated=self.stage == 2 and self.cfg.loss.semantic
            )
            if self.world > 1:  # every replica distils from rank 0's bank
                dist.broadcast(bank.mu, 0)
                dist.broadcast(bank.sigma, 0)
                bank.mark_changed()  # written in place, after any snapshot of it
            finite = bool(torch.isfinite(bank.mu).all() & torch.isfinite(bank.sigma).all())
        if finite:
            self.bank = bank
            # the posterior's snapshot, taken here rather than in the next step (its sigma check
            # reads a flag back: once per refresh, not inside a step)
            bank.prepared()
            return
        what = "kept the previous bank" if self.bank is not None else "no bank to fall back on"
        self.log({"stage": self.stage, "step": self.step, "event": f"non-finite bank, {what}"})
        if self.bank is None:
            raise TrainingDiverged(
                f"the chain bank built from the model at stage {self.stage} step {self.step} is "
                "not finite"
            )

    # ------------------------------------------------------------------ running

    def run(self) -> dict:
        """Run the remaining stages; returns the per-stage seconds and the last logged losses."""
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def on_signal(signum, frame):
            self._stop_signal = signum

        if threading_is_main():
            for s in old:
                signal.signal(s, on_signal)
        try:
            for stage in STAGES:
                if stage < self.stage or self.stage_config(stage).steps == 0:
                    continue
                self._run_stage(stage)
        finally:
            if threading_is_main():
                for s, h in old.items():
                    signal.signal(s, h)
        return {"stage_seconds": dict(self.stage_seconds), "timing": dict(self.timer.seconds)}

    def _enter_stage(self, stage: int) -> None:
        if stage == 2 and self.teacher is None:
            self.teacher = self.net  # eps_sem, updated only by the EMA from now on
            self.net = self.teacher.copy()  # eps_unified
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        if self.stage != stage:
            self.stage, self.step = stage, 0
            self.generator = self._new_generator(stage)
        if self.optimizer is None or getattr(self, "_optim_stage", None) != stage:
            self._make_optimizer(stage)
            self._optim_stage = stage

    def _run_stage(self, stage: int) -> None:
        from tqdm.auto import tqdm

        self._enter_stage(stage)
        st = self.stage_config(stage)
        cfg = self.cfg
        if self.step >= st.steps:  # resumed from the checkpoint that ended this stage
            return
        accum = cfg.runtime.grad_accum
        self._check_labels(self.train_set)
        batches = Batches(
            self.train_set,
            cfg.data.batch_size,
            cfg.seed + 1000 * stage,
            start=self.step * accum,
            rank=self.rank,
            world=self.world,
            num_workers=cfg.data.num_workers,
        )
        bar = tqdm(
            total=st.steps,
            initial=self.step,
            desc=f"stage {stage}",
            dynamic_ncols=True,
            disable=not (cfg.runtime.progress and self.rank == 0),
            leave=True,
        )
        t_start = time.perf_counter()
        self.net.train()
        rt = cfg.runtime
        window = self._profile_window(rt.profile_from, rt.profile_steps if stage == 2 else 0)
        while self.step < st.steps:
            if (
                stage >= 1
                and cfg.loss.gen_distil
                and cfg.diffusion.bank_refresh_every
                and self.step % cfg.diffusion.bank_refresh_every == 0
            ) or (stage >= 1 and cfg.loss.gen_distil and self.bank is None):
                self.refresh_bank()
                self.net.train()
            lr = self._set_lr(stage, self.step)
            window.at_step(self.step)
            with nvtx_range(f"genrep.stage{stage}.step"):
                parts = self.train_step(stage, batches, accum)
            self.step += 1
            bar.update(1)
            if not self._step_ok:
                try:
                    self._skipped_step(stage, batches.dataset, parts)
                except TrainingDiverged:
                    bar.close()
                    raise
            else:
                self.bad_streak = 0
                if self.step % cfg.runtime.log_every == 0 or self.step == st.steps:
                    # (the step's flag read already waited for these values)
                    parts = {k: float(v) for k, v in parts.items()}
                    rec = {"stage": stage, "step": self.step, "lr": lr, **parts}
                    if self.bad_steps:
                        rec["bad_steps"] = self.bad_steps
                    bar.set_postfix({k: f"{v:.3g}" for k, v in parts.items()})
                    self.log(rec)
            if (
                cfg.runtime.ckpt_every
                and self.step % cfg.runtime.ckpt_every == 0
                and self.step < st.steps
            ):
                self.save()
            if self._should_stop():
                bar.close()
                path = self.save()
                raise TrainingInterrupted(self._stop_signal or signal.SIGTERM, path)
        bar.close()
        window.close()
        self.stage_seconds[stage] = (
            self.stage_seconds.get(stage, 0.0) + time.perf_counter() - t_start
        )
        self.save()

    def _profile_window(self, first: int, count: int) -> ProfileWindow:
        """The CUDA profiler's window over a stage's steps (runtime.profile_from / profile_steps);
        nothing is started on a device other than CUDA."""
        return ProfileWindow(first, count if self.device.type == "cuda" else 0)

    def _check_labels(self, dataset) -> None:
        """The class ids of a batch source, checked once (on the host) so that a step does not
        read them back: the step's model calls skip their value checks (``check_values=False``).
        A dataset without a ``labels`` tensor is checked batch by batch on the host instead."""
        if self._labels_checked is dataset:
            return
        labels = getattr(dataset, "labels", None)
        if isinstance(labels, torch.Tensor) and labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.net.num_classes:
                raise ConfigError(
                    f"the training set's class ids lie in [{lo}, {hi}], outside [0, "
                    f"model.num_classes={self.net.num_classes})"
                )
            self._labels_checked = dataset
        else:
            self._labels_checked = None

    def _check_batch_labels(self, y: torch.Tensor) -> None:
        # a host tensor straight from the batch source: no device sync
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.net.num_classes):
            raise ConfigError(
                f"a training batch holds class ids in [{int(y.min())}, {int(y.max())}], outside "
                f"[0, model.num_classes={self.net.num_classes})"
            )

    def _should_stop(self) -> bool:
        if self.world > 1:  # agreed on by all ranks with the step's finiteness flag
            return self._stop_agreed
        return self._stop_signal is not None

    def _skipped_step(self, stage: int, dataset, parts: dict[str, torch.Tensor]) -> None:
        """Log the step just skipped (its sample indices, which inputs and losses were not
        finite); raise ``TrainingDiverged`` after ``runtime.max_bad_steps`` in a row."""
        self.bad_steps += 1
        self.bad_streak += 1
        indices, bad_inputs = [], []
        for idx, x0 in self._step_inputs:
            idx = [int(i) for i in idx]
            indices += idx
            rows = (~torch.isfinite(x0.float().flatten(1))).any(1).nonzero().flatten().tolist()
            bad_inputs += [describe_sample(dataset, idx[r]) for r in rows]
        bad_losses = [k for k, v in parts.items() if not bool(torch.isfinite(v))]
        rec = {
            "stage": stage,
            "step": self.step,
            "skipped": "non-finite loss or gradient",
            "bad_steps": self.bad_steps,
            "nonfinite_losses": bad_losses,
            "nonfinite_inputs": bad_inputs,
            "sample_indices": indices,  # this process's part of the batch
        }
        self.log(rec)
        print(
            f"genrep-fast: stage {stage} step {self.step}: skipped, non-finite "
            f"{', '.join(bad_losses) or 'gradient'}"
            + (f"; non-finite inputs: {', '.join(bad_inputs[:3])}" if bad_inputs else "")
            + f" (rank {self.rank}, sample indices {indices[:8]}{' ...' if len(indices) > 8 else ''})",
            file=sys.stderr,
        )
        limit = self.cfg.runtime.max_bad_steps
        if limit and self.bad_streak >= limit:
            latest = ckpt.list_checkpoints(self.out_dir / "checkpoints")
            raise TrainingDiverged(
                f"stopped: {self.bad_streak} steps in a row with a non-finite loss or gradient "
                f"(stage {stage}, steps {self.step - self.bad_streak + 1}-{self.step}; "
                f"runtime.max_bad_steps={limit}); the model holds the last finite state; newest "
                f"checkpoint: {latest[-1] if latest else 'none'}; see {self.out_dir / 'metrics.jsonl'}"
            )

    def _autocast(self):
        return self.autocast if self.autocast is not None else nullcontext()

    def train_step(self, stage: int, batches: Batches, accum: int) -> dict[str, torch.Tensor]:
        """One optimiser step of ``stage`` over ``accum`` micro-batches; returns the loss parts as
        detached 0-d tensors (no host sync)."""
        cfg, timer = self.cfg, self.timer
        n = len(self.params)
        acc_p: list[torch.Tensor | None] = [None] * n
        acc_g: list[torch.Tensor | None] = [None] * n
        totals: dict[str, torch.Tensor] = {}

        def add(acc, loss):
            if not loss.requires_grad:  # no trained parameter feeds it (e.g. a frozen backbone)
                return
            for i, gr in enumerate(torch.autograd.grad(loss, self.params, allow_unused=True)):
                if gr is None:
                    continue
                acc[i] = gr if acc[i] is None else acc[i].add_(gr)

        self._step_inputs = []  # (sample indices, x0) per micro-batch, reported if skipped
        for _ in range(accum):
            with timer("data"):
                x0, y = next(batches)
                if self._labels_checked is not batches.dataset:
                    self._check_batch_labels(y)
                x0 = x0.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                self._step_inputs.append((batches.last_indices, x0))
            if stage == 0:
                with self._autocast():
                    loss_g, parts = generation_loss(
                        self.net, x0, y, self.generator, cfg, check_values=False
                    )
                with timer("backward_g"):
                    add(acc_g, loss_g / accum)
            else:
                with timer("features"), self._autocast():
                    loss_p, logits, parts = perception_loss(
                        self.net, x0, y, self.bank, cfg, self.backend, timer, check_values=False
                    )
                if stage == 2:
                    with timer("generation"), self._autocast():
                        x_sem = None
                        if cfg.loss.semantic:
                            with torch.no_grad():
                                _, x_sem = self.teacher.perceive(x0, check_values=False)
                        loss_g, gparts = generation_loss(
                            self.net, x0, y, self.generator, cfg, x_sem, check_values=False
                        )
                    parts.update(gparts)
                with timer("backward_p"):
                    add(acc_p, loss_p / accum)
                if stage == 2:
                    with timer("backward_g"):
                        add(acc_g, loss_g / accum)
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + v / accum

        if self.world > 1:
            from genrep_fast.distributed import all_reduce_gradients

            with timer("allreduce"):
                for acc in (acc_p, acc_g):
                    if any(a is not None for a in acc):
                        all_reduce_gradients(acc)
        with timer("alignment"):
            if stage == 2:
                update = align_gradients(
                    acc_p,
                    acc_g,
                    groups=self.align_groups,
                    k=cfg.align.k,
                    w_p=cfg.align.w_p,
                    w_g=cfg.align.w_g,
                    mode=cfg.align.mode,
                    backend=self.backend,
                )
            else:
                update = acc_g if stage == 0 else acc_p
        with timer("optimizer"):
            grads = [u for u in update if u is not None]
            norm = (
                torch.nn.utils.get_total_norm(grads, foreach=self.fast)
                if grads
                else torch.zeros((), device=self.device)
            )
            self._step_ok = self._finite_step(norm, totals)
            if self._step_ok:
                for p, u in zip(self.params, update):
                    p.grad = u
                st = self.stage_config(stage)
                if st.grad_clip > 0:
                    with_grad = [p for p in self.params if p.grad is not None]
                    torch.nn.utils.clip_grads_with_norm_(
                        with_grad, st.grad_clip, norm, foreach=self.fast
                    )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        if stage == 2 and self._step_ok:
            with timer("ema"):
                ema_update(
                    self._teacher_tensors(), self._student_tensors(), cfg.ema_decay, fused=self.fast
                )
        return totals

    def _finite_step(self, grad_norm: torch.Tensor, losses: dict[str, torch.Tensor]) -> bool:
        """Whether the step's update norm and every loss part are finite: one flag computed on
        the device and read once (with world > 1, all-reduced together with the stop flag, so every
        rank skips the same steps and stops at the same step). This read is the step's only host
        sync."""
        vals = [grad_norm.float().reshape(1)] + [v.float().reshape(1) for v in losses.values()]
        bad = (~torch.isfinite(torch.cat(vals))).any().float()
        if self.world == 1:
            return not bool(bad)
        stop = torch.tensor(float(self._stop_signal is not None), device=bad.device)
        flags = torch.stack([bad, stop]).to(self._dist_device)
        dist.all_reduce(flags)
        bad_any, stop_any = (flags > 0).tolist()
        self._stop_agreed = stop_any
        return not bad_any

    def _teacher_tensors(self) -> list[torch.Tensor]:
        if not hasattr(self, "_ema_pairs"):
            t = dict(self.teacher.named_parameters())
            s = dict(self.net.named_parameters())
            names = [n for n in t if not n.startswith("modulation.")]
            self._ema_pairs = ([t[n].data for n in names], [s[n].data for n in names])
        return self._ema_pairs[0]

    def _student_tensors(self) -> list[torch.Tensor]:
        self._teacher_tensors()
        return self._ema_pairs[1]

    # ------------------------------------------------------------------ logging

    def log(self, record: dict) -> None:
        self.history.append(record)
        if self.rank != 0:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), **record}) + "\n")
        if self.cfg.runtime.tensorboard:
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"))
            base = sum(self.stage_config(s).steps for s in STAGES if s < record["stage"])
            for k, v in record.items():
                if k not in ("stage", "step") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"stage{record['stage']}/{k}", v, base + record["step"])

    # ------------------------------------------------------------------ state

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = ckpt.prefixed("net", self.net.state_dict())
        meta: dict = {
            "stage": self.stage,
            "step": self.step,
            "config": self.cfg.to_dict(),
            "stage_seconds": {str(k): v for k, v in self.stage_seconds.items()},
            "timing": self.timer.seconds,
            "bad_steps": self.bad_steps,
            "bad_streak": self.bad_streak,
        }
        if self.teacher is not None:
            tensors.update(ckpt.prefixed("teacher", self.teacher.state_dict()))
        if self.optimizer is not None:
            t, m = ckpt.optimizer_to_flat(self.optimizer)
            tensors.update(t)
            meta["optimizer"] = m
            meta["optimizer_stage"] = self._optim_stage
        if self.bank is not None:
            tensors["bank/mu"] = self.bank.mu
            tensors["bank/sigma"] = self.bank.sigma
            tensors["bank/timesteps"] = self.bank.timesteps
            meta["bank"] = {"sigma_min": self.bank.sigma_min}
        tensors["rng/generator"] = self.generator.get_state()
        t, m = ckpt.rng_state()
        tensors.update(t)
        meta["rng"] = m
        return tensors, meta

    def save(self) -> Path | None:
        """Checkpoint into ``out_dir/checkpoints`` (rank 0 writes; the others wait); returns its
        folder, or None when it was refused for a non-finite tensor (logged). A state saved
        already (same stage and step, e.g. SIGTERM on a ``ckpt_every`` step) is not written again:
        its folder is returned."""
        key = (self.stage, self.step)
        if self._saved is not None and self._saved[0] == key:
            return self._saved[1]
        path = None
        if self.rank == 0:
            tensors, meta = self.state()
            try:
                path = ckpt.save_checkpoint(
                    self.out_dir / "checkpoints",
                    f"stage{self.stage}-{self.step:08d}",
                    tensors,
                    meta,
                    keep=self.cfg.runtime.keep_checkpoints,
                )
            except ckpt.NonFiniteCheckpointError as exc:
                self.log({"stage": self.stage, "step": self.step, "event": f"refused: {exc}"})
                print(f"genrep-fast: checkpoint refused: {exc}", file=sys.stderr)
        if self.world > 1:
            dist.barrier()
        self._saved = (key, path)  # (a refused state would be refused again)
        return path

    def load(self, path: str | Path, *, allow_config_change: bool = False) -> None:
        """Continue from a checkpoint (see the class docstring for ``allow_config_change``)."""
        loaded = ckpt.open_checkpoint(path, map_location="cpu")
        tensors, meta = loaded.tensors, loaded.meta
        changes = run_defining_changes(meta.get("config", {}), self.cfg.to_dict())
        if changes and not allow_config_change:
            raise ConfigError(
                f"resume: the config differs from that of {loaded.path} in keys that change the "
                f"run: {'; '.join(changes)}. Use the checkpoint's values, or pass "
                "--allow-config-change (Trainer(allow_config_change=True)) to resume anyway"
            )
        keep_bank = not any(c.startswith("diffusion.") for c in changes)
        stage, step = int(meta["stage"]), int(meta["step"])
        if any(k.startswith("teacher/") for k in tensors):
            self.teacher = self.net
            self.net = self.teacher.copy()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            _load_module(self.teacher, ckpt.unprefixed("teacher", tensors), "teacher")
        _load_module(self.net, ckpt.unprefixed("net", tensors), "net")
        self.stage, self.step = stage, step
        self.stage_seconds = {int(k): v for k, v in meta.get("stage_seconds", {}).items()}
        self.timer.seconds = dict(meta.get("timing", {}))
        self.bad_steps = int(meta.get("bad_steps", 0))
        self.bad_streak = int(meta.get("bad_streak", 0))
        if "optimizer" in meta:
            self._make_optimizer(int(meta["optimizer_stage"]))
            self._optim_stage = int(meta["optimizer_stage"])
            ckpt.optimizer_from_flat(self.optimizer, tensors, meta["optimizer"])
        if "bank/mu" in tensors and keep_bank:  # (a changed diffusion.* rebuilds the bank)
            from genrep_fast.models import ChainBank

            d = self.cfg.diffusion
            self.bank = ChainBank(
                tensors["bank/mu"].to(self.device),
                tensors["bank/sigma"].to(self.device),
                tensors["bank/timesteps"],
                num_steps=d.num_steps,
                burn_in=d.burn_in,
                thin=d.thin,
                chains_per_class=d.chains_per_class,
                sigma_min=meta["bank"]["sigma_min"],
                batch_size=d.bank_batch_size,
            )
        self.generator = self._new_generator(stage)
        self.generator.set_state(tensors["rng/generator"])
        ckpt.set_rng_state(tensors, meta["rng"])


def load_for_inference(
    path: str | Path, overrides: list[str] = ()
) -> tuple[TrainConfig, GenRepNet, Path]:
    """``(config, network, checkpoint folder)`` of a checkpoint (or a run folder's latest intact
    one) for evaluation, sampling or classification: reads only the ``net/`` tensors, builds no
    dataset and writes nothing. ``overrides`` (``key=value``) apply to the saved config; the
    network is in eval mode on ``runtime.device``."""
    from genrep_fast.train.config import apply_overrides, config_from_dict

    loaded = ckpt.open_checkpoint(path, map_location="cpu", prefixes=("net/",))
    cfg = config_from_dict(apply_overrides(loaded.meta["config"], list(overrides)))
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    net = build_network(cfg, resolve_device(cfg.runtime.device))
    _load_module(net, ckpt.unprefixed("net", loaded.tensors), "net")
    for p in net.parameters():
        p.requires_grad_(False)
    return cfg, net.eval(), loaded.path


def _load_module(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ckpt.CheckpointError(
            f"checkpoint {what}: does not match the configured model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); was it written with another config?"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ckpt.CheckpointError(
                f"checkpoint {what}: {k} has shape {tuple(v.shape)}, the model {tuple(own[k].shape)}"
            )
    module.load_state_dict(state)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
