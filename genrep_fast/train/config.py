"""Training configuration: dataclasses, loaded from YAML (configs/*.yaml) and overridden by
``key.sub=value`` strings from the command line.

Every field is checked when a config is built: an unknown key, a value of the wrong type or a
value out of range raises ``ConfigError`` (a ``ValueError``) naming the dotted key, e.g.
``stage2.ema_decay: must be in [0, 1), got 1.5``.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

# A wheel install ships the configs as genrep_fast/configs/ (package data); an editable install
# reads them from the repository's configs/.
_PACKAGED_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CONFIG_DIR = (
    _PACKAGED_CONFIGS
    if _PACKAGED_CONFIGS.is_dir()
    else Path(__file__).resolve().parents[2] / "configs"
)
DEFAULT_CONFIG = "tiny_digits"


class ConfigError(ValueError):
    """A bad configuration key or value; the message starts with the dotted key."""


@dataclasses.dataclass
class ModelConfig:
    """The diffusion backbone and the perception/modulation modules on top of it."""

    kind: str = "unet2d"  # "unet2d" (diffusers UNet2DModel) | "dit" (DiTTransformer2DModel)
    sample_size: int = 8  # latent (or pixel) height = width
    in_channels: int = 1  # latent (or pixel) channels: 1 grayscale, 3 RGB, 4 an SD-VAE latent
    num_classes: int = 10  # classes of the data (the backbone gets one more row: the null class)
    # Extra keyword arguments of the tiny factory (tiny_unet2d / tiny_dit), e.g. block widths.
    factory_kwargs: dict = dataclasses.field(default_factory=dict)
    # A diffusers model directory (from_pretrained, local only) replacing the factory model.
    pretrained: str | None = None
    # A local diffusers AutoencoderKL / VQModel folder (save_pretrained): pixel data are encoded
    # to latents on the fly, samples are decoded through it (sample_size, in_channels: the latents).
    vae: str | None = None
    head_kwargs: dict = dataclasses.field(default_factory=dict)  # PerceptionHead options
    modulation_kwargs: dict = dataclasses.field(default_factory=dict)  # SemanticModulation options


@dataclasses.dataclass
class DiffusionConfig:
    """DDPM schedule, the reverse chain and the chain bank (docs/METHOD.md section 1)."""

    num_train_timesteps: int = 1000  # T of the DDPM noise schedule
    beta_schedule: str = "linear"  # "linear" | "scaled_linear" | "squaredcos_cap_v2"
    num_steps: int = 200  # reverse-chain (sampling) steps N
    burn_in: int = 50  # first reverse-chain steps left out of the bank
    thin: int = 2  # keep every thin-th step after the burn-in
    chains_per_class: int = 1  # S: reverse chains per class in the bank
    bank_batch_size: int = 256  # chains advanced together while building the bank
    bank_dtype: str = "float32"  # "float32" | "bfloat16"
    bank_refresh_every: int = 500  # R, training steps between bank refreshes (0: never)
    precision: str = "ieee"  # mixture-likelihood arithmetic (see posterior.PRECISIONS)
    candidate_classes: int = 0  # K > 0: posterior over the head's top-K plus the label
    # Lower clamp of the bank's sigma, the teacher's bandwidth (docs/METHOD.md sections 1, 5.1):
    # a number; null: the scheduler's smallest non-zero std of the N-step chain; "auto": the
    # bandwidth_grid value with the lowest posterior NLL on a validation split carved from the
    # training set (bandwidth_val_fraction of it, at most bandwidth_val_max images; training then
    # uses the rest), chosen again at every bank build and logged (teacher_bandwidth,
    # teacher_val_nll).
    sigma_min: float | str | None = None
    bandwidth_grid: list = dataclasses.field(  # sigma_min: auto's candidate bandwidths
        default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5]
    )
    # sigma_min: auto tries up to this many values past the grid's top (each 1.5x the last) while
    # the NLL is still falling there (14x14 MNIST chose the default grid's top, 1.5)
    bandwidth_extend: int = 6
    bandwidth_val_fraction: float = 0.1  # sigma_min: auto's share of the training set held out
    bandwidth_val_max: int = 1000  # sigma_min: auto's validation images, at most
    # The network the stage-2 bank is built from: "ema" (eps_sem, the slowly moving teacher) or
    # "student" (eps_unified, the network being trained). Stage 1 has one network.
    bank_network: str = "ema"


@dataclasses.dataclass
class StageConfig:
    """One training stage: its length and optimiser settings."""

    steps: int = 0  # optimiser steps of the stage (0: skip it)
    lr: float = 1e-4  # AdamW learning rate (the head's and modulation's; see backbone_lr_scale)
    backbone_lr_scale: float = 1.0  # lr of the diffusion backbone relative to ``lr``
    weight_decay: float = 0.0  # AdamW weight decay
    betas: tuple = (0.9, 0.999)  # AdamW betas
    warmup_steps: int = 0  # linear warm-up steps from 0 to lr
    schedule: str = "constant"  # "constant" | "cosine" (after warm-up)
    grad_clip: float = 0.0  # 0: no clipping


@dataclasses.dataclass
class LossConfig:
    """Which GenRep terms are on (the paper's ablation rows switch these)."""

    gen_distil: bool = True  # L_gen_distil = KL(posterior || head) in L_percept
    gen_distil_weight: float = 1.0  # weight of L_gen_distil
    semantic: bool = True  # x_sem modulation + L_rep_align in L_genera
    # The modulation's semantic input while training: "xt" (the noisy sample itself, what the
    # sampler feeds it) or "x0" (x_sem of the clean image from eps_sem: the target leaks into the
    # mean correction, and the sampler cannot compute it). L_rep_align always targets x_sem.
    sem_input: str = "xt"
    # What keeps the stage-1 teacher (the bank) a generative model: "keep_diffusion" (stage 1 adds
    # stage1_diffusion_weight * L_DDPM to L_percept), "freeze" (the backbone is frozen in stage 1;
    # only the head learns) or "none" (the backbone learns L_percept alone and the bank drifts).
    stage1_teacher: str = "keep_diffusion"
    stage1_diffusion_weight: float = 1.0  # weight of L_DDPM in stage 1 (keep_diffusion)
    rep_align_weight: float = 0.5  # weight of L_rep_align
    vlb_weight: float = 1e-3  # variance term that trains f_sigma (mean detached)
    label_dropout: float = 0.1  # generation: class -> null class (CFG-style), stages 0 and 2
    # The KL teacher p(y|x) of L_gen_distil: "bank" (the chain bank's mixture posterior) or
    # "diffusion_classifier" (Li et al. 2023, no bank: softmax(-mean noise-prediction error /
    # dc_temperature) over dc_trials trials per class, pruned by dc_prune rounds [[after_trials,
    # keep], ...]; genrep_fast.diffusion_classifier). The DC settings also serve evaluation.
    teacher: str = "bank"
    dc_trials: int = 10  # Diffusion Classifier teacher: (t, eps) trials per class
    dc_prune: tuple = ()  # Diffusion Classifier pruning rounds [[after_trials, keep], ...]
    dc_temperature: float = 1.0  # softmax temperature over the classifier's errors
    dc_batch_size: int = 2048  # model rows per forward pass of the classifier


@dataclasses.dataclass
class AlignConfig:
    """Gradient alignment of the two stage-2 gradients (docs/METHOD.md section 3)."""

    mode: str = "symmetric"  # "symmetric" | "generation" | "perception" | "none"
    k: float = 2.0  # sharpness of the alignment weights (docs/METHOD.md section 3)
    w_p: float = 0.7  # weight of the perception gradient
    w_g: float = 0.3  # weight of the generation gradient
    # "attention_blocks" (the paper), "all_blocks" (the attention blocks plus one group per
    # remaining top-level block/module: every trained parameter is aligned), "per_tensor", "global"
    groups: str = "attention_blocks"


@dataclasses.dataclass
class DataConfig:
    """The training and held-out data (genrep_fast/train/data.py)."""

    # "digits" | "mnist5k" (the extra genrep_fast[mnist]) | "image_folder" | "latents"
    kind: str = "digits"
    root: str | None = None  # folder of class sub-folders, or of latent shards
    test_root: str | None = None  # held-out set (image_folder / latents); digits: fixed split
    image_size: int = 8  # image_folder: images are centre-cropped and resized to this
    grayscale: bool = True  # image_folder: read images as 1 channel (false: RGB, 3 channels)
    latent_scale: float = 1.0  # multiplied into stored latents (0.18215 for the SD VAE)
    batch_size: int = 64  # per process, per micro-batch
    num_workers: int = 0  # DataLoader worker processes (0: load in the training process)
    augment: bool = False  # random horizontal flip (not for digits)


@dataclasses.dataclass
class RuntimeConfig:
    """Where and how the run executes: device, kernels, threads, logging, checkpoints."""

    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    ops: str = "fast"  # "fast" (package kernels) | "reference" (eager reference ops)
    autocast: str = "auto"  # "auto" (bf16 on CUDA, none on CPU) | "bf16" | "none"
    compile: bool = False  # torch.compile the backbone's forward
    grad_accum: int = 1  # micro-batches per optimiser step
    threads: int = 0  # torch CPU threads (0: leave torch's default)
    log_every: int = 20  # steps between metrics.jsonl lines
    ckpt_every: int = 0  # 0: only at the end of each stage (and on SIGTERM/SIGINT)
    keep_checkpoints: int = 2  # newest checkpoints kept in the run folder
    # Consecutive steps skipped for a non-finite loss or gradient before the run stops (exit
    # code 4); 0: never stop, keep skipping.
    max_bad_steps: int = 10
    # Nsight Systems window (nsys profile --capture-range=cudaProfilerApi): the CUDA profiler runs
    # for profile_steps steps of stage 2 from its step profile_from (0 steps: never started).
    profile_from: int = 5
    profile_steps: int = 0  # stage-2 steps under the CUDA profiler (0: never started)
    tensorboard: bool = False  # also write TensorBoard scalars to <run>/tb (needs tensorboard)
    progress: bool = True  # tqdm progress bars


@dataclasses.dataclass
class EvalConfig:
    """The evaluation after training (and of genrep-fast eval)."""

    samples_per_class: int = 10  # generated images per class (grid + head accuracy)
    sample_steps: int = 0  # 0: diffusion.num_steps
    max_test_images: int = 0  # 0: the whole held-out set
    ece_bins: int = 15  # bins of the expected calibration error and the reliability diagram
    # Diffusion Classifier trials per class on the test set, unpruned (0: not evaluated; it
    # costs num_classes x dc_trials model rows per image, so the ImageNet configs leave it off);
    # a non-empty loss.dc_prune adds a pruned run with loss.dc_trials (dc_pruned_* metrics).
    dc_trials: int = 0
    # the independent evaluation (reads the whole training set: the demo only, not train/eval):
    # a SmallCNN baseline and sample judge, the x_sem probe, noise robustness
    independent: bool = True
    cnn_steps: int = 0  # 0: stage1.steps + stage2.steps (GenRep's supervised budget)
    noise_sigmas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)  # Gaussian pixel noise std, images in [-1, 1]
    noise_timesteps: tuple = (0, 100, 250, 500, 750)  # diffusion noise: x_t = q(x_t | x_0)


@dataclasses.dataclass
class TrainConfig:
    """A whole run: every section below."""

    name: str = "tiny_digits"  # the run's name (reports)
    seed: int = 0  # seeds every random stream (weights, batches, noise, bank)
    out_dir: str = "runs/tiny_digits"  # run folder when train gets no --out
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    # Stage 0 stands in for a pretrained diffusion model when none is given (DDPM loss only).
    stage0: StageConfig = dataclasses.field(default_factory=StageConfig)
    stage1: StageConfig = dataclasses.field(default_factory=StageConfig)
    stage2: StageConfig = dataclasses.field(default_factory=StageConfig)
    ema_decay: float = 0.999  # m of theta_sem <- m theta_sem + (1 - m) theta_unified
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    align: AlignConfig = dataclasses.field(default_factory=AlignConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def validate(self) -> TrainConfig:
        _validate(self)
        return self


CHOICES = {
    "model.kind": ("unet2d", "dit"),
    "diffusion.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "diffusion.bank_dtype": ("float32", "bfloat16"),
    "diffusion.precision": ("ieee", "tf32x3", "tf32", "bf16"),
    "stage0.schedule": ("constant", "cosine"),
    "stage1.schedule": ("constant", "cosine"),
    "stage2.schedule": ("constant", "cosine"),
    "align.mode": ("symmetric", "generation", "perception", "none"),
    "align.groups": ("attention_blocks", "all_blocks", "per_tensor", "global"),
    "diffusion.bank_network": ("ema", "student"),
    "loss.sem_input": ("xt", "x0"),
    "loss.stage1_teacher": ("keep_diffusion", "freeze", "none"),
    "data.kind": ("digits", "mnist5k", "image_folder", "latents"),
    "runtime.ops": ("fast", "reference"),
    "runtime.autocast": ("auto", "bf16", "none"),
    "loss.teacher": ("bank", "diffusion_classifier"),
}


def _to_plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _to_plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_to_plain(x) for x in v]
    return v


def _fail(key: str, msg: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {msg}")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation (str form, from ``from __future__``)."""
    ann = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    optional = "None" in ann
    base = ann.replace("| None", "").replace("None |", "").strip()
    if value is None:
        if optional:
            return None
        _fail(key, f"must not be null (expected {base})")
    if base == "bool":
        if not isinstance(value, bool):
            _fail(key, f"must be true or false, got {value!r}")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, f"must be an integer, got {value!r}")
        return value
    if base == "float":
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept what float() accepts.
            try:
                value = float(value)
            except ValueError:
                _fail(key, f"must be a number, got {value!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, f"must be a number, got {value!r}")
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            _fail(key, f"must be a string, got {value!r}")
        return value
    if base == "dict":
        if not isinstance(value, dict):
            _fail(key, f"must be a mapping, got {value!r}")
        return dict(value)
    if base == "float | str":  # a number or a keyword (diffusion.sigma_min: "auto")
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "3e-4" as a string
            except ValueError:
                return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, f"must be a number or a string, got {value!r}")
        return float(value)
    if base == "list":
        if not isinstance(value, (list, tuple)):
            _fail(key, f"must be a list, got {value!r}")
        return list(value)
    if base == "tuple":
        if not isinstance(value, (list, tuple)):
            _fail(key, f"must be a list, got {value!r}")
        return tuple(value)
    return value


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping; unknown keys are errors naming the key."""
    if not isinstance(data, dict):
        _fail(prefix.rstrip(".") or "<root>", f"must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in fields:
            _fail(key, f"unknown key (valid keys here: {', '.join(sorted(fields))})")
        hint = hints[k]
        if dataclasses.is_dataclass(hint):
            kwargs[k] = from_dict(hint, v, key + ".")
        else:
            kwargs[k] = _coerce(key, v, fields[k].type)
    return cls(**kwargs)


def _validate(cfg: TrainConfig) -> None:
    flat = flatten(cfg.to_dict())
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            _fail(key, f"must be one of {list(choices)}, got {flat[key]!r}")

    def positive(key: str, minimum: float = 1) -> None:
        if flat[key] < minimum:
            _fail(key, f"must be >= {minimum}, got {flat[key]}")

    for key in (
        "model.sample_size",
        "model.in_channels",
        "model.num_classes",
        "diffusion.num_train_timesteps",
        "diffusion.num_steps",
        "diffusion.thin",
        "diffusion.chains_per_class",
        "diffusion.bank_batch_size",
        "data.batch_size",
        "data.image_size",
        "runtime.grad_accum",
        "runtime.log_every",
        "runtime.keep_checkpoints",
        "eval.ece_bins",
    ):
        positive(key)
    for key in (
        "diffusion.burn_in",
        "diffusion.bank_refresh_every",
        "diffusion.candidate_classes",
        "data.num_workers",
        "runtime.ckpt_every",
        "runtime.threads",
        "runtime.max_bad_steps",
        "runtime.profile_from",
        "runtime.profile_steps",
        "eval.samples_per_class",
        "eval.sample_steps",
        "eval.max_test_images",
        "eval.cnn_steps",
    ):
        positive(key, 0)
    e = cfg.eval
    if not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in e.noise_sigmas
    ):
        _fail("eval.noise_sigmas", f"must be a list of numbers >= 0, got {list(e.noise_sigmas)}")
    n_train = cfg.diffusion.num_train_timesteps
    if not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n_train
        for v in e.noise_timesteps
    ):
        _fail(
            "eval.noise_timesteps",
            f"must be a list of integers in [0, {n_train}), got {list(e.noise_timesteps)}",
        )
    d = cfg.diffusion
    if d.num_steps > d.num_train_timesteps:
        _fail("diffusion.num_steps", f"must be <= num_train_timesteps={d.num_train_timesteps}")
    if d.burn_in >= d.num_steps:
        _fail("diffusion.burn_in", f"must be < diffusion.num_steps={d.num_steps}, got {d.burn_in}")
    if isinstance(d.sigma_min, str):
        if d.sigma_min != "auto":
            _fail(
                "diffusion.sigma_min", f'must be a number > 0, null or "auto", got {d.sigma_min!r}'
            )
    elif d.sigma_min is not None and not d.sigma_min > 0:
        _fail("diffusion.sigma_min", f'must be > 0 (or null, or "auto"), got {d.sigma_min}')
    grid = d.bandwidth_grid
    if not grid or any(
        isinstance(h, bool) or not isinstance(h, (int, float)) or not h > 0 for h in grid
    ):
        _fail("diffusion.bandwidth_grid", f"must be a non-empty list of numbers > 0, got {grid!r}")
    if (
        isinstance(d.bandwidth_extend, bool)
        or not isinstance(d.bandwidth_extend, int)
        or d.bandwidth_extend < 0
    ):
        _fail("diffusion.bandwidth_extend", f"must be an int >= 0, got {d.bandwidth_extend!r}")
    if not 0 < d.bandwidth_val_fraction < 1:
        _fail(
            "diffusion.bandwidth_val_fraction", f"must be in (0, 1), got {d.bandwidth_val_fraction}"
        )
    positive("diffusion.bandwidth_val_max")
    if d.candidate_classes > cfg.model.num_classes:
        _fail(
            "diffusion.candidate_classes", f"must be <= model.num_classes={cfg.model.num_classes}"
        )
    for s in ("stage0", "stage1", "stage2"):
        st: StageConfig = getattr(cfg, s)
        positive(f"{s}.steps", 0)
        positive(f"{s}.warmup_steps", 0)
        if not st.lr > 0:
            _fail(f"{s}.lr", f"must be > 0, got {st.lr}")
        if st.backbone_lr_scale < 0:
            _fail(f"{s}.backbone_lr_scale", f"must be >= 0, got {st.backbone_lr_scale}")
        if s == "stage0" and st.steps and st.backbone_lr_scale == 0:
            _fail(
                "stage0.backbone_lr_scale",
                "must be > 0 when stage0.steps > 0 (stage 0 trains only the backbone; 0 freezes it)",
            )
        if st.weight_decay < 0 or st.grad_clip < 0:
            key = f"{s}.weight_decay" if st.weight_decay < 0 else f"{s}.grad_clip"
            _fail(key, "must be >= 0")
        if len(st.betas) != 2 or not all(0 <= float(b) < 1 for b in st.betas):
            _fail(f"{s}.betas", f"must be two numbers in [0, 1), got {list(st.betas)}")
    if not 0 <= cfg.ema_decay < 1:
        _fail("ema_decay", f"must be in [0, 1), got {cfg.ema_decay}")
    if cfg.align.k < 0:
        _fail("align.k", f"must be >= 0, got {cfg.align.k}")
    for key in (
        "loss.gen_distil_weight",
        "loss.rep_align_weight",
        "loss.vlb_weight",
        "loss.stage1_diffusion_weight",
    ):
        positive(key, 0)
    # the Diffusion Classifier (teacher and evaluation)
    positive("loss.dc_trials")
    positive("loss.dc_batch_size")
    positive("eval.dc_trials", 0)
    if not cfg.loss.dc_temperature > 0:
        _fail("loss.dc_temperature", f"must be > 0, got {cfg.loss.dc_temperature}")
    from genrep_fast.diffusion_classifier import check_prune_schedule

    try:
        check_prune_schedule(cfg.loss.dc_prune, cfg.loss.dc_trials, cfg.model.num_classes)
    except (TypeError, ValueError) as exc:
        _fail("loss.dc_prune", f"{exc} (loss.dc_trials={cfg.loss.dc_trials})")
    if not 0 <= cfg.loss.label_dropout < 1:
        _fail("loss.label_dropout", f"must be in [0, 1), got {cfg.loss.label_dropout}")
    if cfg.data.kind not in ("digits", "mnist5k") and not cfg.data.root:
        _fail("data.root", f"is required for data.kind={cfg.data.kind!r}")
    if (
        cfg.data.kind == "digits"
        and not cfg.model.vae  # with a VAE the latent shape is checked against it (latent_space)
        and (cfg.model.sample_size != 8 or cfg.model.in_channels != 1)
    ):
        _fail("model.sample_size", "the digits data are 1x8x8: set sample_size=8, in_channels=1")
    if cfg.data.kind == "mnist5k" and (
        cfg.model.sample_size != cfg.data.image_size or cfg.model.in_channels != 1
    ):
        _fail(
            "model.sample_size",
            f"the mnist5k data are 1 x data.image_size x data.image_size = 1x{cfg.data.image_size}"
            f"x{cfg.data.image_size}: set sample_size={cfg.data.image_size}, in_channels=1",
        )


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("factory_kwargs", "head_kwargs", "modulation_kwargs"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Keys whose change makes a resumed run a different run: the saved weights, bank and data position
# were made under them. A resume that changes one is refused unless explicitly allowed.
RUN_DEFINING_KEYS = (
    "seed",
    "model.",
    "diffusion.",
    "data.kind",
    "data.batch_size",
    "data.image_size",
    "data.grayscale",
    "data.latent_scale",
    "runtime.grad_accum",
)


def run_defining_changes(saved: dict, current: dict) -> list[str]:
    """``"key: old -> new"`` for every run-defining key (``RUN_DEFINING_KEYS``) that differs
    between two ``TrainConfig.to_dict()`` mappings, sorted by key. A key the saved mapping lacks
    (written before the key existed) counts as its default."""
    try:
        saved = from_dict(TrainConfig, saved).to_dict()
    except ConfigError:
        pass  # compare what is there
    a, b = flatten(saved), flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in RUN_DEFINING_KEYS):
            continue
        if a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"stage2.steps=300"`` -> (["stage2", "steps"], 300); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"{text}: an override must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{text}: an override must look like key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = _to_plain(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(path[: i + 1])}: is not a section, cannot set {text}")
            node = nxt
        node[path[-1]] = value
    return data


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a bundled config (``tiny_digits`` -> configs/tiny_digits.yaml)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = CONFIG_DIR / f"{name_or_path}.yaml"
    if cand.exists():
        return cand
    raise ConfigError(
        f"config: no file {str(name_or_path)!r} and no bundled config of that name "
        f"(bundled: {', '.join(bundled_configs())})"
    )


def bundled_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(
    name_or_path: str | Path = DEFAULT_CONFIG, overrides: list[str] = ()
) -> TrainConfig:
    """Read a YAML config (path or bundled name), apply ``key=value`` overrides, validate."""
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {exc}") from None
    return config_from_dict(apply_overrides(data, list(overrides)))


def config_from_dict(data: dict) -> TrainConfig:
    return from_dict(TrainConfig, data).validate()
