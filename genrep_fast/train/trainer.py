"""The two-stage GenRep trainer (docs/METHOD.md section 4).

* Stage 0 (only when no pretrained backbone is given): plain DDPM training, standing in for the
  pretrained diffusion model the paper starts from.
* Stage 1: ``eps_sem`` learns ``L_percept = CE + L_gen_distil``; the teacher of the distillation
  is the class posterior of the chain bank, refreshed from the current model every R steps.
* Stage 2: ``eps_unified`` starts as a copy of ``eps_sem``. Every step, on one batch: L_percept
  and L_genera (with ``x_sem`` from the EMA teacher ``eps_sem``), their two gradients (two
  backward passes), aligned per attention block (``GradientAligner.align``), one optimiser step,
  then ``theta_sem <- m theta_sem + (1 - m) theta_unified`` with one fused ``torch._foreach_lerp_``.

``Trainer.train_step`` composes one step from named pieces (docs/ARCHITECTURE.md, "The trainer"):
``_micro_batch``, ``_task_losses`` (what each stage runs), ``_update``, ``_optimizer_step``.

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

Data parallel: under ``torchrun`` every process takes its slice of each global batch. The network
is wrapped in ``DistributedDataParallel`` (one wrapper per stage, over what the stage trains), and
each task loss is its own forward and ``backward()`` through it, so DDP's bucketed all-reduce
averages the perception and the generation gradient over the processes while each backward runs;
the step then aligns the two averaged gradients (alignment is non-linear, it must see the global
batch's gradients), identically on every replica. With ``grad_accum`` > 1 the earlier
micro-batches of stages 0 and 1 run under ``no_sync`` (stage 2 reduces each micro-batch, see
``train_step``). The bank is built sharded (``ChainBank.build(sharded=True)``: each rank its share
of the classes' chains, then ``all_gather``; the same bank on any number of ranks). No collective
serves stopping or skipping per step: a rank whose loss is not finite multiplies it by NaN before
its backward, so the averaged gradient, and the update norm every rank checks, is NaN on every
rank and all skip the same step; a SIGTERM/SIGINT is agreed on (one all-reduce of a flag) only at
log steps (``runtime.log_every``), checkpoint steps and a stage's last step. Gloo on CPU,
NCCL on CUDA.
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

from genrep_fast import GradientAligner
from genrep_fast.profiling import ProfileWindow, nvtx_range
from genrep_fast.train import checkpoint as ckpt
from genrep_fast.train.config import ConfigError, TrainConfig, run_defining_changes
from genrep_fast.train.data import Batches, build_datasets, describe_sample
from genrep_fast.train.latent_space import LatentSpace
from genrep_fast.train.network import (
    GenRepNet,
    build_chain_bank,
    build_network,
    class_names_for,
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
    # Not diffusers' get_scheduler("cosine" / "constant_with_warmup"): after the warm-up it gives
    # the same factors (checked over 2000 steps, warm-up 100: equal from step 100 on), but its
    # warm-up is step / warmup, so the first step has lr 0 (a wasted step) and every warm-up step
    # is one behind ours (0.99 at step 99 against 1.0): a switch would change existing runs and
    # their resumes mid-warm-up. It is also a LambdaLR whose step count is state to checkpoint;
    # this is a pure function of the step, so a resume is exact with nothing saved for it.
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
        self.world, self.rank, self._dist_device = self._init_distributed()
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
        # model.vae: loaded and checked against the config before any data is read (and before
        # seeding: loading may draw random numbers); pixel batches are encoded to latents in the
        # step's data section (train/latent_space.py)
        self.latent_space = LatentSpace.from_config(cfg, self.device)
        self._seed_everything(cfg.seed)
        self.train_set, self.test_set = build_datasets(cfg.data, cfg.seed)
        # diffusion.sigma_min: auto chooses the teacher's bandwidth on a split of the training set
        # (never the test set); the stages train on the rest.
        self.val_set = None
        self._val_tensors = None  # (x, y) of val_set on the device, read at the first choice
        self.teacher_val: dict = {}  # the last bandwidth choice: teacher_bandwidth, _val_nll, ...
        if cfg.diffusion.sigma_min == "auto":
            from genrep_fast.train.bandwidth import split_validation

            d = cfg.diffusion
            self.train_set, self.val_set = split_validation(
                self.train_set, d.bandwidth_val_fraction, d.bandwidth_val_max, cfg.seed
            )
        self.net: GenRepNet = build_network(cfg, self.device)
        self.net.class_names = class_names_for(
            getattr(self.train_set, "class_names", None), self.net.num_classes
        )
        # The noise schedule on the device once (diffusers' add_noise moves it on first use; the
        # losses index it every step): no blocking host-to-device copy inside a step.
        sched = self.net.scheduler
        sched.alphas_cumprod = sched.alphas_cumprod.to(self.device)
        if rt.compile:
            self.net.backbone.compile()
        # stage 2's EMA teacher eps_sem (self.net is then the student eps_unified) and the
        # parameter tensors ema_update blends, teacher's and student's in the same order
        self.teacher: GenRepNet | None = None
        self._ema_teacher: list[torch.Tensor] = []
        self._ema_student: list[torch.Tensor] = []
        self.bank = None
        self.stage = 0 if cfg.stage0.steps > 0 else 1
        self.step = 0
        # What the current stage trains, set up by _make_optimizer: the trained parameters (and
        # their names), the optimiser and the stage it was made for, stage 2's alignment groups
        # (indices into params), the fraction of values inside one and the GradientAligner.
        self.params: list[torch.nn.Parameter] = []
        self.param_names: list[str] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self._optim_stage: int | None = None
        self.align_groups: str | list[list[int]] | None = None
        self.aligned_fraction: float | None = None
        self.aligner: GradientAligner | None = None
        self.ddp = None  # DistributedDataParallel over what the stage trains (world > 1)
        self.generator = self._new_generator(self.stage)
        self.timer = Timer(self.device)
        self.stage_seconds: dict[int, float] = {}
        self.history: list[dict] = []
        self._stop_signal: int | None = None
        self._stop_agreed = False  # world > 1: the stop flag as all ranks last agreed on it
        self.bad_steps = 0  # steps skipped for a non-finite loss or gradient, whole run
        self.bad_streak = 0  # ... consecutive, up to the last step
        self._step_ok = True
        # The dataset whose class ids were range-checked once (_check_labels); None: check per batch.
        self._labels_checked = None
        self._step_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        # stage 2: the alignment's per-group sums of each step since the last log record
        self._align_sums: list[torch.Tensor] = []
        # fixed (x, y) subsets the teacher's top-1 is logged on at each bank refresh (first refresh)
        self._teacher_probes: dict | None = None
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

    def _init_distributed(self) -> tuple[int, int, torch.device]:
        """``(world size, rank, device of the collectives)`` of ``torchrun``'s environment; with
        world > 1 the process group is initialised (and the rank's GPU selected)."""
        world = int(os.environ.get("WORLD_SIZE", 1))
        rank = int(os.environ.get("RANK", 0))
        dist_device = torch.device("cpu")
        if world > 1:
            if not dist.is_initialized():
                use_cuda = torch.cuda.is_available() and self.cfg.runtime.device != "cpu"
                dist.init_process_group("nccl" if use_cuda else "gloo")
            if torch.cuda.is_available() and self.cfg.runtime.device != "cpu":
                local = int(os.environ.get("LOCAL_RANK", 0))
                torch.cuda.set_device(local)
                dist_device = torch.device("cuda", local)
        return world, rank, dist_device

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
        scale = st.backbone_lr_scale
        if stage == 1 and self.cfg.loss.stage1_teacher == "freeze":
            scale = 0.0  # the bank depends on the backbone only: frozen, the teacher stays
        out = [(f"backbone.{n}", p, scale) for n, p in self.net.backbone.named_parameters()]
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
        self._optim_stage = stage
        self.align_groups = self._alignment_groups() if stage == 2 else None
        self.aligned_fraction = self._aligned_fraction() if stage == 2 else None
        self.aligner = self._make_aligner() if stage == 2 and self.params else None
        self._wrap_ddp()

    def _make_aligner(self) -> GradientAligner:
        """Stage 2's ``GradientAligner`` over ``self.params``: ``align`` turns the step's two
        gradient sums into the update, written into the perception sum's buffers."""
        a = self.cfg.align
        return GradientAligner(
            self.params,
            self.align_groups,
            k=a.k,
            w_p=a.w_p,
            w_g=a.w_g,
            mode=a.mode,
            backend=self.backend,
        )

    def _wrap_ddp(self) -> None:
        """``self.ddp``: DistributedDataParallel over the parameters the stage trains (world > 1
        and something trained), else None. ``broadcast_buffers=False``: the replicas start equal
        and hold no running statistics, so no per-forward buffer broadcast;
        ``find_unused_parameters``: each task loss reaches only part of the trained parameters
        (the perception loss not the modulation, stage 1's CE not the backbone's upsampling path)."""
        self.ddp = None
        if self.world > 1 and self.params:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                _LossOf(self.net), broadcast_buffers=False, find_unused_parameters=True
            )

    def _alignment_groups(self):
        """The alignment groups (``GradientAligner``'s, indices into ``self.params``) of
        ``align.groups`` (docs/METHOD.md section 3)."""
        mode = self.cfg.align.groups
        if mode == "per_tensor":
            return None
        if mode == "global":
            return "global"
        # the attention blocks, as the adapter finds them (their trained parameters; a
        # parameter shared by two blocks belongs to the first)
        index = {id(p): i for i, p in enumerate(self.params)}
        groups = []
        for block_params in self.net.adapter.parameter_groups().values():
            members = [index.pop(id(p)) for p in block_params if id(p) in index]
            if members:
                groups.append(members)
        if mode == "all_blocks":
            # every other parameter: one group per top-level module (head.classifier,
            # modulation.time_embedding, backbone.conv_in) or numbered block of the backbone
            # (backbone.down_blocks.1, less its attention blocks, which are groups of their own)
            rest: dict[str, list[int]] = {}
            for i in index.values():
                parts = self.param_names[i].split(".")
                depth = 3 if parts[0] == "backbone" and len(parts) > 3 and parts[2].isdigit() else 2
                rest.setdefault(".".join(parts[:depth]), []).append(i)
            groups += list(rest.values())
        return groups

    def _aligned_fraction(self) -> float:
        """The fraction of the trained parameters (values, not tensors) inside an alignment group;
        the others get the fixed ``w_p p + w_g g``."""
        total = sum(p.numel() for p in self.params)
        if self.align_groups is None or self.align_groups == "global":
            return 1.0
        inside = sum(self.params[i].numel() for g in self.align_groups for i in g)
        return inside / max(1, total)

    def _set_lr(self, stage: int, step: int) -> float:
        st = self.stage_config(stage)
        f = lr_factor(step, st.warmup_steps, st.steps, st.schedule)
        for g in self.optimizer.param_groups:
            g["lr"] = st.lr * g["lr_scale"] * f
        return st.lr * f

    # ------------------------------------------------------------------ bank

    def bank_network(self) -> GenRepNet:
        """The network the bank is built from: stage 2's EMA teacher ``eps_sem`` (or the student
        ``eps_unified``, ``diffusion.bank_network``); stage 1's only network."""
        if self.stage == 2 and self.cfg.diffusion.bank_network == "ema":
            return self.teacher
        return self.net

    def refresh_bank(self) -> None:
        auto = self.cfg.diffusion.sigma_min == "auto"
        with self.timer("bank_refresh"):
            # One generator per model batch, seeded from (run seed, stage, step, batch); with
            # world > 1 each rank builds its share of the batches and all_gathers the rest: every
            # replica holds the same bank, the one a single process builds.
            bank = build_chain_bank(
                self.bank_network(),
                self.cfg,
                None,
                modulated=self.stage == 2 and self.cfg.loss.semantic,
                seed=self.cfg.seed * 31 + self.stage * 1_000_003 + self.step,
                sharded=self.world > 1,
                # auto: clamp at the smallest candidate; the chosen one is applied below
                sigma_min=min(self.cfg.diffusion.bandwidth_grid) if auto else None,
            )
            finite = bool(torch.isfinite(bank.mu).all() & torch.isfinite(bank.sigma).all())
            if finite and auto:
                self._choose_bandwidth(bank)
        if finite:
            self.bank = bank
            # the posterior's snapshot, taken here rather than in the next step (its sigma check
            # reads a flag back: once per refresh, not inside a step)
            bank.prepared()
            if self.rank == 0:
                self._log_teacher_accuracy()
            return
        what = "kept the previous bank" if self.bank is not None else "no bank to fall back on"
        self.log({"stage": self.stage, "step": self.step, "event": f"non-finite bank, {what}"})
        if self.bank is None:
            raise TrainingDiverged(
                f"the chain bank built from the model at stage {self.stage} step {self.step} is "
                "not finite"
            )

    def _choose_bandwidth(self, bank) -> None:
        """``diffusion.sigma_min: auto``: clamp ``bank``'s sigma at the grid value with the lowest
        posterior NLL on the validation split (training data), record it on the networks and
        log it (docs/METHOD.md section 5.1)."""
        from genrep_fast.train.bandwidth import select_bandwidth
        from genrep_fast.train.evaluation import dataset_tensors

        if self._val_tensors is None:
            self._val_tensors = self._model_inputs(*dataset_tensors(self.val_set))
        x, y = self._val_tensors
        d = self.cfg.diffusion
        choice = select_bandwidth(
            bank.mu,
            bank.sigma,
            x,
            y,
            d.bandwidth_grid,
            precision=d.precision,
            backend=self.backend,
            extend=d.bandwidth_extend,
        )
        h = choice.bandwidth
        # rounded into the bank's dtype first (as ChainBank.build does): every stored sigma is then
        # >= the recorded sigma_min exactly
        stored = float(torch.tensor(h, dtype=torch.float64).to(bank.sigma.dtype))
        bank.sigma = bank.sigma.clamp(min=stored)
        bank.sigma_min = stored
        bank.mark_changed()
        for net in (self.net, self.teacher):
            if net is not None:
                net.teacher_bandwidth.fill_(h)
        self.teacher_val = {
            "teacher_bandwidth": h,
            "teacher_val_nll": choice.val_nll,
            "teacher_val_top1": choice.val_top1,
            "val_images": int(x.shape[0]),
        }
        self.log(
            {
                "stage": self.stage,
                "step": self.step,
                "event": "bandwidth",
                **self.teacher_val,
                "bandwidth_grid": choice.grid,
                "bandwidth_val_nll": choice.nll,
            }
        )

    def _model_inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dataset images as the model sees them, on the device: encoded with ``model.vae`` when
        the data are pixels (the bank and the posterior live in latent space)."""
        x, y = x.to(self.device), y.to(self.device)
        if self.latent_space is not None and self.latent_space.encodes:
            x = self.latent_space.encode(x, batch_size=256)
        return x, y

    def _log_teacher_accuracy(self) -> None:
        """The new bank's posterior top-1 on fixed training and validation images (a validation
        split when the trainer holds one, else the held-out set), logged as a bank_refresh
        event (docs/TRAINING.md, "Diagnostics")."""
        from genrep_fast.train import diagnostics

        if self._teacher_probes is None:
            val = getattr(self, "val_set", None)
            probes = {"train": self.train_set}
            probes["val" if val is not None else "heldout"] = (
                val if val is not None else self.test_set
            )
            self._teacher_probes = {
                name: self._model_inputs(*diagnostics.probe_subset(ds, seed=self.cfg.seed))
                for name, ds in probes.items()
                if ds is not None and len(ds)
            }
        rec = {"stage": self.stage, "step": self.step, "event": "bank_refresh"}
        d = self.cfg.diffusion
        for name, (x, y) in self._teacher_probes.items():
            rec[f"teacher_top1_{name}"] = diagnostics.teacher_top1(
                self.bank, x, y, d.precision, self.backend
            )
        self.log(rec)

    def _keep_align_sums(self, sums: torch.Tensor) -> torch.Tensor:
        # the alignment's [G, 3] sums, kept on the device for the next log record (no read here)
        self._align_sums.append(sums.detach())
        return sums

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
            self._split_teacher()
        if self.stage != stage:
            self.stage, self.step = stage, 0
            self.generator = self._new_generator(stage)
        if self.optimizer is None or self._optim_stage != stage:
            self._make_optimizer(stage)

    def _split_teacher(self) -> None:
        """Stage 2's two networks from the one trained so far: it becomes the EMA teacher
        ``eps_sem`` (frozen, updated only by ``ema_update`` from now on), its copy the student
        ``eps_unified`` that the optimiser trains."""
        self.teacher = self.net
        self.net = self.teacher.copy()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        # every parameter, the modulation included: the EMA network builds the stage-2 bank
        # (diffusion.bank_network: ema), modulated with its own modulation
        t = dict(self.teacher.named_parameters())
        s = dict(self.net.named_parameters())
        self._ema_teacher = [t[n].data for n in t]
        self._ema_student = [s[n].data for n in t]

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
        if (
            stage >= 1
            and not cfg.loss.gen_distil
            and cfg.diffusion.sigma_min == "auto"
            and not float(self.net.teacher_bandwidth) > 0
        ):
            # no bank in training, but evaluation builds one: choose its bandwidth once, here
            self.refresh_bank()
            self.net.train()
        while self.step < st.steps:
            if cfg.loss.teacher == "diffusion_classifier":
                pass  # no bank: the Diffusion Classifier teacher is computed per batch
            elif (
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
                    if stage == 2:
                        rec["aligned_fraction"] = self.aligned_fraction
                    if stage == 2 and self._align_sums:
                        from genrep_fast.train.diagnostics import alignment_record

                        rec.update(alignment_record(self._align_sums, cfg.align.k))
                    self._align_sums = []
                    if self.bad_steps:
                        rec["bad_steps"] = self.bad_steps
                    bar.set_postfix({k: f"{v:.3g}" for k, v in parts.items()})
                    self.log(rec)
            ckpt_step = bool(cfg.runtime.ckpt_every) and self.step % cfg.runtime.ckpt_every == 0
            if ckpt_step and self.step < st.steps:
                self.save()
            agree = ckpt_step or self.step % cfg.runtime.log_every == 0 or self.step == st.steps
            if self._should_stop(agree):
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

    def _should_stop(self, agree: bool) -> bool:
        """Whether to checkpoint and stop after this step. One process: as soon as a signal came.
        world > 1: only at ``agree`` steps (log, checkpoint and a stage's last step, the same on
        every rank), where one all-reduce of the flag lets all ranks stop together; no per-step
        collective (torchrun sends the signal to every process; one rank's is enough)."""
        if self.world == 1:
            return self._stop_signal is not None
        if agree:
            flag = torch.tensor(float(self._stop_signal is not None), device=self._dist_device)
            dist.all_reduce(flag)
            self._stop_agreed = bool(flag > 0)
        return self._stop_agreed

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
        detached 0-d tensors (no host sync).

        Per micro-batch: ``_micro_batch`` (data), ``_task_losses`` (the stage's losses, each
        forward followed by its backward into the step's gradient sums); then ``_update`` (the
        task's gradient, or stage 2's aligned one), ``_optimizer_step`` (skipped when not finite)
        and stage 2's EMA of the teacher."""
        grads = _TaskGradients(len(self.params))
        totals: dict[str, torch.Tensor] = {}
        self._step_inputs = []  # (sample indices, x0) per micro-batch, reported if skipped
        for micro in range(accum):
            # Stage 2 reduces every micro-batch (each loss's .grad already holds its running sum,
            # identical on the ranks, so the average only adds the mean of the new part): its two
            # losses share DDP's reducer, whose record of used parameters would carry one loss's
            # no_sync backward into the other's synchronised one (a DDP error).
            sync = micro == accum - 1 or stage == 2
            x0, y = self._micro_batch(batches)
            for k, v in self._task_losses(stage, x0, y, grads, accum, sync).items():
                totals[k] = totals.get(k, 0.0) + v / accum
        with self.timer("alignment"):
            update = self._update(stage, grads)
        with self.timer("optimizer"):
            self._step_ok = self._optimizer_step(stage, update, totals)
        if stage == 2 and self._step_ok:
            with self.timer("ema"):
                ema_update(
                    self._ema_teacher, self._ema_student, self.cfg.ema_decay, fused=self.fast
                )
        return totals

    def _micro_batch(self, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x0, y)`` on the device (encoded by ``model.vae`` for pixel data)."""
        with self.timer("data"):
            x0, y = next(batches)
            if self._labels_checked is not batches.dataset:
                self._check_batch_labels(y)
            x0 = x0.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.latent_space is not None and self.latent_space.encodes:
                x0 = self.latent_space.encode(x0)
            self._step_inputs.append((batches.last_indices, x0))
        return x0, y

    def _task_losses(
        self,
        stage: int,
        x0: torch.Tensor,
        y: torch.Tensor,
        grads: _TaskGradients,
        accum: int,
        sync: bool,
    ) -> dict[str, torch.Tensor]:
        """A micro-batch's losses of ``stage``, each forward followed by its backward (DDP
        prepares one backward per forward): stage 0 the generation loss (plain DDPM), stage 1
        the perception loss, stage 2 both, the generation loss with ``x_sem`` of the EMA teacher
        (the generation forward does not depend on the perception backward). Returns the parts."""
        if stage == 0:
            with self._autocast():
                loss_g, parts = self._generation_forward(x0, y, None, sync)
            self._backward(grads.generation, loss_g, accum, "backward_g")
            return parts
        parts = self._perception_pass(stage, x0, y, grads.perception, accum, sync)
        if stage == 2:
            with self.timer("generation"):
                x_sem = self._semantic_target(x0)
                with self._autocast():
                    loss_g, gparts = self._generation_forward(x0, y, x_sem, sync)
            parts.update(gparts)
            self._backward(grads.generation, loss_g, accum, "backward_g")
        return parts

    def _perception_pass(self, stage, x0, y, acc, accum, sync) -> dict[str, torch.Tensor]:
        """L_percept's forward (with the diffusion loss in stage 1's ``keep_diffusion``) and its
        backward into ``acc``; returns its parts."""
        cfg = self.cfg
        keep_diffusion = stage == 1 and cfg.loss.stage1_teacher == "keep_diffusion"
        with self.timer("features"), self._autocast():
            loss_p, _, parts = self._loss(
                _perception_and_diffusion if keep_diffusion else perception_loss,
                x0,
                y,
                self.bank,
                cfg,
                self.backend,
                self.timer,
                check_values=False,
                sync=sync,
                dc_teacher=self._dc_teacher(stage),
                **({"generator": self.generator} if keep_diffusion else {}),
            )
        self._backward(acc, loss_p, accum, "backward_p")
        return parts

    def _generation_forward(self, x0, y, x_sem, sync) -> tuple[torch.Tensor, dict]:
        """L_genera of a micro-batch (``x_sem=None``: the plain DDPM loss), noise from the
        stage's generator."""
        return self._loss(
            generation_loss, x0, y, self.generator, self.cfg, x_sem, check_values=False, sync=sync
        )

    def _semantic_target(self, x0: torch.Tensor) -> torch.Tensor | None:
        """Stage 2's ``x_sem`` of the EMA teacher (no gradient), or None without
        ``loss.semantic``."""
        if not self.cfg.loss.semantic:
            return None
        with torch.no_grad(), self._autocast():
            return self.teacher.perceive(x0, check_values=False)[1]

    def _loss(self, fn, *args, sync: bool, **kw):
        """``fn(self.net, *args, **kw)``, a task loss; with world > 1 through DDP, which readies
        its reducer for this loss's backward (``sync=False``: under ``no_sync``, the earlier
        micro-batches of an accumulated step only accumulate)."""
        if self.ddp is None:
            return fn(self.net, *args, **kw)
        with nullcontext() if sync else self.ddp.no_sync():
            return self.ddp(fn, *args, **kw)

    def _backward(
        self, acc: list[torch.Tensor | None], loss: torch.Tensor, accum: int, section: str
    ) -> None:
        """Add the gradient of ``loss / accum`` (a micro-batch's share) of ``self.params`` to the
        running sums ``acc``, timed as ``section``."""
        with self.timer(section):
            loss = loss / accum
            if not loss.requires_grad:  # no trained parameter feeds it (e.g. a frozen backbone)
                return
            if self.ddp is None:
                for i, gr in enumerate(torch.autograd.grad(loss, self.params, allow_unused=True)):
                    if gr is None:
                        continue
                    acc[i] = gr if acc[i] is None else acc[i].add_(gr)
                return
            # DDP reduces what backward() accumulates into .grad: this loss's running sum goes in,
            # the (on the last micro-batch: averaged over the ranks) sum comes out. A non-finite
            # local loss poisons the gradient (x NaN), so every rank sees a NaN update and skips.
            ok = torch.isfinite(loss.detach())
            loss = loss * torch.where(ok, 1.0, float("nan")).to(loss.dtype)
            for p, a in zip(self.params, acc):
                p.grad = a
            loss.backward()
            for i, p in enumerate(self.params):
                acc[i], p.grad = p.grad, None

    def _update(self, stage: int, grads: _TaskGradients) -> list[torch.Tensor | None]:
        """The step's update of ``self.params``: stage 0's generation gradient, stage 1's
        perception gradient, stage 2's two aligned per group by ``self.aligner`` (written into
        the perception sums' buffers)."""
        if stage == 0:
            return grads.generation
        if stage == 1:
            return grads.perception
        if self.aligner is None:  # nothing trained
            return grads.perception
        # fast ops only: a reduce_sums routes the reference through the two-pass path
        return self.aligner.align(
            grads.perception,
            grads.generation,
            reduce_sums=self._keep_align_sums if self.fast else None,
        )

    def _optimizer_step(
        self, stage: int, update: list[torch.Tensor | None], losses: dict[str, torch.Tensor]
    ) -> bool:
        """Hand ``update`` to the parameters' ``.grad``, clip (``grad_clip``) and step, unless
        the update norm or a loss is not finite (``_finite_step``); returns whether it stepped."""
        grads = [u for u in update if u is not None]
        norm = (
            torch.nn.utils.get_total_norm(grads, foreach=self.fast)
            if grads
            else torch.zeros((), device=self.device)
        )
        if not self._finite_step(norm, losses):
            return False
        for p, u in zip(self.params, update):
            p.grad = u
        st = self.stage_config(stage)
        if st.grad_clip > 0:
            with_grad = [p for p in self.params if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(with_grad, st.grad_clip, norm, foreach=self.fast)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _finite_step(self, grad_norm: torch.Tensor, losses: dict[str, torch.Tensor]) -> bool:
        """Whether the step's update norm and every loss part are finite: one flag computed on
        the device and read once, the step's only host sync. With world > 1 no collective: the
        update is computed from DDP-averaged gradients, identical on every rank, and a rank with
        a non-finite loss made its gradient NaN (``_backward``), so every rank decides alike.
        Only without a DDP wrapper (nothing trained) is the flag all-reduced."""
        vals = [grad_norm.float().reshape(1)] + [v.float().reshape(1) for v in losses.values()]
        bad = (~torch.isfinite(torch.cat(vals))).any().float()
        if self.world > 1 and self.ddp is None:
            bad = bad.to(self._dist_device)
            dist.all_reduce(bad)
        return not bool(bad)

    def _dc_teacher(self, stage: int):
        """``loss.teacher: diffusion_classifier``: ``x0 -> [B, C]`` teacher logits of the EMA
        network (stage 2) or the network in training (stage 1), trials seeded by (seed, stage,
        step, micro-batch) so a resumed run draws the same ones; None for the bank teacher."""
        if self.cfg.loss.teacher != "diffusion_classifier":
            return None
        from genrep_fast.train.dc import dc_teacher_log_probs, teacher_seed

        net = self.teacher if self.teacher is not None else self.net
        seed = teacher_seed(self.cfg.seed, stage, self.step, len(self._step_inputs))
        return lambda x0: dc_teacher_log_probs(net, x0, self.cfg, seed)

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
            "class_names": list(self.net.class_names),
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
        if self.teacher_val:
            meta["teacher_val"] = self.teacher_val
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
            self._split_teacher()
            _load_module(self.teacher, ckpt.unprefixed("teacher", tensors), "teacher")
        _load_module(self.net, ckpt.unprefixed("net", tensors), "net")
        self.stage, self.step = stage, step
        self.stage_seconds = {int(k): v for k, v in meta.get("stage_seconds", {}).items()}
        self.timer.seconds = dict(meta.get("timing", {}))
        self.bad_steps = int(meta.get("bad_steps", 0))
        self.bad_streak = int(meta.get("bad_streak", 0))
        self.teacher_val = dict(meta.get("teacher_val", {}))
        if "optimizer" in meta:
            self._make_optimizer(int(meta["optimizer_stage"]))
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


class _TaskGradients:
    """The two task gradients of a step, each summed over its micro-batches: one entry per
    trained parameter (``Trainer.params``), None until a loss reaches it."""

    def __init__(self, n: int):
        self.perception: list[torch.Tensor | None] = [None] * n
        self.generation: list[torch.Tensor | None] = [None] * n


class _LossOf(torch.nn.Module):
    """The module DDP wraps: ``forward(fn, *args, **kw)`` is ``fn(net, *args, **kw)``, a task
    loss of ``net`` (DDP needs the loss's forward to go through its own ``forward``)."""

    def __init__(self, net: GenRepNet):
        super().__init__()
        self.net = net

    def forward(self, fn, *args, **kw):
        return fn(self.net, *args, **kw)


def _perception_and_diffusion(net, x0, y, bank, cfg, backend, timer, **kw):
    """Stage 1's ``keep_diffusion`` loss: the perception loss plus the diffusion loss, which keeps
    the backbone (and so the bank) generative; one forward, so DDP reduces both in one backward.
    The generation loss draws its noise from the trainer's generator (``kw["generator"]``)."""
    generator = kw.pop("generator")
    loss_p, logits, parts = perception_loss(net, x0, y, bank, cfg, backend, timer, **kw)
    loss_d, dparts = generation_loss(net, x0, y, generator, cfg, check_values=False)
    parts.update(dparts)
    return loss_p + cfg.loss.stage1_diffusion_weight * loss_d, logits, parts


def load_for_inference(
    path: str | Path, overrides: list[str] = ()
) -> tuple[TrainConfig, GenRepNet, Path]:
    """``(config, network, checkpoint folder)`` of a checkpoint (or a run folder's latest intact
    one) for evaluation, sampling or classification: reads only the ``net/`` tensors, builds no
    dataset and writes nothing. ``overrides`` (``key=value``) apply to the saved config; the
    network is in eval mode on ``runtime.device``, ``net.class_names`` from the checkpoint.
    ``genrep_fast.GenRep.from_pretrained`` is the public API over it."""
    from genrep_fast.train.config import apply_overrides, config_from_dict

    loaded = ckpt.open_checkpoint(path, map_location="cpu", prefixes=("net/",))
    cfg = config_from_dict(apply_overrides(loaded.meta["config"], list(overrides)))
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    net = build_network(cfg, resolve_device(cfg.runtime.device))
    _load_module(net, ckpt.unprefixed("net", loaded.tensors), "net")
    # (a checkpoint written before class names were saved: "0", "1", ...)
    net.class_names = class_names_for(loaded.meta.get("class_names"), net.num_classes)
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
