"""Pre-flight checks: what a run needs from the machine, the data and the output folders, checked
before any model is built, any data is loaded or anything is written.

Each failed check raises ``ConfigError`` (the CLI prints it on one line, exit code 2) naming the
config key, option or path and what was expected, e.g.
``data.root: my_data/train has 3 class sub-folders (bird, cat, dog) but model.num_classes is 10``.
The checks only read: they create no folder and write no file (a writability probe is a temporary
file, removed at once).

* ``check_device``: ``runtime.device`` exists on this machine (``cuda`` on a CPU build of torch).
* ``check_packages``: optional packages a config switches on (``runtime.tensorboard``).
* ``check_data``: ``data.root`` / ``data.test_root`` exist; an ``image_folder`` has one sub-folder
  per class, as many as ``model.num_classes`` (at least 2), the same classes in the held-out set,
  and every image decodes (a corrupt file is named: fix or remove it; the scan reads every image
  once, which is what the first epoch does anyway); ``latents`` shards match the model's latent
  shape and their labels ``model.num_classes``; image size and channels match the model.
* ``check_pretrained``: ``model.pretrained`` is a local diffusers model folder whose input matches
  the data and whose class embedding has the null-class row GenRep needs (``num_class_embeds =
  model.num_classes + 1`` for a ``UNet2DModel``; docs/TRAINING.md).
* ``check_out_dir`` / ``clear_run_folder``: a run never lands in a folder holding something else
  unless asked (``--resume`` continues it, ``--overwrite`` removes the run's own files first).
* ``check_writable_dir`` / ``check_output_file``: output folders and files can be written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from genrep_fast.train.config import ConfigError, TrainConfig

# What a run (or a demo) writes into its folder: the names ``--overwrite`` removes. Anything else
# in the folder is left alone.
RUN_ENTRIES = (
    "checkpoints",
    "metrics.jsonl",
    "config.json",
    "tb",
    "eval.json",
    "reliability.png",
    "samples.png",
    "robustness.png",
)
DEMO_ENTRIES = (
    "run",
    "metrics.json",
    "report.md",
    "reliability.png",
    "samples.png",
    "robustness.png",
    "loss_curves.png",
    "alignment.png",
    "ablation",
    "ablation.json",
    "ablation.md",
    "ablation.png",
)

# At most this many bad image files are named in the one-line message (then a count).
_NAMED_BAD_FILES = 3


def check_run(cfg: TrainConfig) -> None:
    """Every check of a training run that reads no output folder (see the module docstring)."""
    check_device(cfg.runtime.device)
    check_packages(cfg)
    check_pretrained(cfg)
    check_data(cfg)


# ---------------------------------------------------------------------------------- machine


def check_device(name: str, key: str = "runtime.device") -> None:
    """``name`` (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``) can be used on this machine."""
    import torch

    if name in ("auto", "cpu"):
        return
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"{key}: {name!r} is not a device (expected auto, cpu, cuda or cuda:N)"
        ) from None
    if dev.type != "cuda":
        raise ConfigError(f"{key}: {name!r} is not supported (expected auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        why = (
            "this torch is a CPU build"
            if torch.version.cuda is None
            else "torch sees no CUDA device"
        )
        raise ConfigError(f"{key}: {name!r} asked for, but {why}; use --set {key}=cpu (or auto)")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise ConfigError(f"{key}: {name!r} asked for, but this machine has {n} CUDA device(s)")


def check_packages(cfg: TrainConfig) -> None:
    """The optional packages the config switches on are installed."""
    if cfg.runtime.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "runtime.tensorboard: true needs the tensorboard package (pip install tensorboard), "
            "or set runtime.tensorboard=false"
        )


# ------------------------------------------------------------------------------------ data


def check_data(cfg: TrainConfig) -> None:
    d = cfg.data
    if d.kind in ("digits", "mnist5k"):  # embedded: nothing on disk to check
        return
    for key in ("data.root", "data.test_root"):
        root = getattr(d, key.split(".")[1])
        if root is None:
            continue
        p = Path(root)
        if not p.exists():
            raise ConfigError(
                f"{key}: {root} does not exist (expected a folder of {_what(d.kind)})"
            )
        if not p.is_dir():
            raise ConfigError(f"{key}: {root} is a file (expected a folder of {_what(d.kind)})")
    if d.kind == "image_folder":
        _check_image_folder(cfg)
    else:
        _check_latents(cfg)


def _what(kind: str) -> str:
    return "class sub-folders of images" if kind == "image_folder" else "latent shards"


def check_test_root(cfg: TrainConfig) -> None:
    """The held-out set ``eval`` reads exists (the training data are not looked at)."""
    root = cfg.data.test_root
    if cfg.data.kind not in ("digits", "mnist5k") and root and not Path(root).is_dir():
        raise ConfigError(
            f"data.test_root: {root} is not a folder (the held-out set eval reads); point it "
            "elsewhere with --set data.test_root=PATH"
        )


def check_input_files(paths: list[str], what: str) -> None:
    """Every path is an existing file."""
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ConfigError(
            f"{what}: {', '.join(missing[:_NAMED_BAD_FILES])}"
            f"{' and more' if len(missing) > _NAMED_BAD_FILES else ''}: no such file"
        )


def _check_image_folder(cfg: TrainConfig) -> None:
    from genrep_fast.train.data import IMAGE_SUFFIXES

    d, m = cfg.data, cfg.model
    train_classes = None
    for key in ("data.root", "data.test_root"):
        root = getattr(d, key.split(".")[1])
        if root is None:
            continue
        root = Path(root)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise ConfigError(f"{key}: {root} has no class sub-folders (expected {root}/<class>/*)")
        if key == "data.root":
            train_classes = classes
            if len(classes) < 2:
                raise ConfigError(
                    f"data.root: {root} has 1 class sub-folder ({classes[0]}); GenRep learns a "
                    "classifier and needs at least 2 classes"
                )
            if len(classes) != m.num_classes:
                raise ConfigError(
                    f"data.root: {root} has {len(classes)} class sub-folders ({_names(classes)}) "
                    f"but model.num_classes is {m.num_classes}; set model.num_classes="
                    f"{len(classes)}"
                )
        elif classes != train_classes:
            raise ConfigError(
                f"data.test_root: {root} has the classes ({_names(classes)}), data.root has "
                f"({_names(train_classes)}); the held-out set needs the same class sub-folders"
            )
        files = [
            f
            for c in classes
            for f in sorted((root / c).rglob("*"))
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
        if not files:
            raise ConfigError(f"{key}: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        if key == "data.root":
            _check_batch_size(cfg, len(files), root)
        _check_images_decode(key, files)
    if not m.vae and not m.pretrained:  # pixel space: the images are the model's input
        # (a pretrained model's input is checked against the data in check_pretrained)
        channels = 1 if d.grayscale else 3
        if channels != m.in_channels:
            raise ConfigError(
                f"model.in_channels: is {m.in_channels} but data.grayscale={str(d.grayscale).lower()}"
                f" gives {channels}-channel images; set model.in_channels={channels} or "
                f"data.grayscale={str(channels != 1).lower()}"
            )
        if d.image_size != m.sample_size:
            raise ConfigError(
                f"model.sample_size: is {m.sample_size} but data.image_size is {d.image_size}; "
                "in pixel space they must be equal"
            )


def _check_batch_size(cfg: TrainConfig, n: int, root) -> None:
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.data.batch_size * world > n:
        procs = f" x {world} processes" if world > 1 else ""
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size}{procs} exceeds the {n} training examples "
            f"in {root}; lower data.batch_size or add data"
        )


def _check_images_decode(key: str, files: list[Path]) -> None:
    """Every file decodes completely (a header check misses truncated files)."""
    from PIL import Image

    bad = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
            bad.append((f, exc))
    if bad:
        shown = "; ".join(f"{f} ({type(e).__name__}: {e})" for f, e in bad[:_NAMED_BAD_FILES])
        more = f" and {len(bad) - _NAMED_BAD_FILES} more" if len(bad) > _NAMED_BAD_FILES else ""
        raise ConfigError(
            f"{key}: {len(bad)} of {len(files)} images do not decode: {shown}{more}; fix or "
            "remove them"
        )


def _names(classes: list[str]) -> str:
    return ", ".join(classes[:5]) + (f", ... ({len(classes)})" if len(classes) > 5 else "")


def _check_latents(cfg: TrainConfig) -> None:
    from genrep_fast.train.data import LatentShards

    m = cfg.model
    for key in ("data.root", "data.test_root"):
        root = getattr(cfg.data, key.split(".")[1])
        if root is None:
            continue
        try:
            shards = LatentShards(root, cfg.data.latent_scale)
        except (OSError, ValueError) as exc:
            msg = str(exc).removeprefix("data.root: ")
            raise ConfigError(f"{key}: {msg}") from None
        shape = tuple(shards[0][0].shape)
        if not m.pretrained and shape != (m.in_channels, m.sample_size, m.sample_size):
            raise ConfigError(
                f"{key}: latents of {shards.shards[0][1]} are {list(shape)}, the model takes "
                f"[{m.in_channels}, {m.sample_size}, {m.sample_size}] (model.in_channels, "
                "model.sample_size)"
            )
        if key == "data.root":
            _check_batch_size(cfg, len(shards), root)
        lo, hi = int(shards.labels.min()), int(shards.labels.max())
        if lo < 0 or hi >= m.num_classes:
            raise ConfigError(
                f"{key}: labels range over [{lo}, {hi}] but model.num_classes is {m.num_classes}"
            )


# ------------------------------------------------------------------------ pretrained model


def check_pretrained(cfg: TrainConfig) -> None:
    m, d = cfg.model, cfg.data
    if not m.pretrained:
        return
    p = Path(m.pretrained)
    if not p.is_dir():
        raise ConfigError(
            f"model.pretrained: {m.pretrained} is not a folder (expected a local diffusers model "
            "folder with config.json; nothing is downloaded)"
        )
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(
            f"model.pretrained: {m.pretrained} has no config.json (expected a diffusers model "
            "folder, as save_pretrained writes it)"
        )
    try:
        conf = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise ConfigError(f"model.pretrained: {cfg_file} is not valid JSON ({exc})") from None
    c = m.num_classes
    if m.kind == "unet2d":
        rows = conf.get("num_class_embeds")
        if rows is None:
            raise ConfigError(
                f"model.pretrained: {m.pretrained} is not class-conditional (num_class_embeds is "
                f"null); GenRep needs a UNet2DModel with num_class_embeds={c + 1}"
            )
        if rows < c + 1:
            raise ConfigError(
                f"model.pretrained: {m.pretrained} has num_class_embeds={rows}; GenRep needs "
                f"model.num_classes + 1 = {c + 1} rows (the last is the null class of the "
                "perception pass and label dropout; docs/TRAINING.md)"
            )
    else:
        rows = conf.get("num_embeds_ada_norm")
        if rows is None or rows < c:
            raise ConfigError(
                f"model.pretrained: {m.pretrained} has num_embeds_ada_norm={rows}; the DiT needs "
                f"at least model.num_classes = {c} classes (its table adds the null row)"
            )
    if d.kind == "image_folder" and not m.vae:
        channels = 1 if d.grayscale else 3
        size = conf.get("sample_size")
        if conf.get("in_channels") != channels or size != d.image_size:
            raise ConfigError(
                f"model.pretrained: {m.pretrained} takes {conf.get('in_channels')}-channel "
                f"{size}px input, the data are {channels}-channel {d.image_size}px "
                "(data.grayscale, data.image_size)"
            )


# ---------------------------------------------------------------------------- output folders


def check_writable_dir(path: str | Path, key: str) -> None:
    """``path`` is, or can be made, a folder we can write into; nothing is created."""
    p = Path(path)
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}: {probe} is a file, so {p} cannot be a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: cannot write into {probe} ({exc.strerror or exc})") from None


def check_output_file(path: str | Path, key: str) -> None:
    """``path`` is an image file name PIL can write, in an existing, writable folder."""
    from PIL import Image

    p = Path(path)
    exts = Image.registered_extensions()
    if p.suffix.lower() not in exts or exts[p.suffix.lower()] not in Image.SAVE:
        raise ConfigError(f"{key}: {path} needs an image suffix such as .png or .jpg")
    parent = p.parent
    if not parent.exists():
        raise ConfigError(f"{key}: the folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise ConfigError(f"{key}: {parent} is a file, not a folder")
    if p.is_dir():
        raise ConfigError(f"{key}: {path} is a folder; give a file name such as {p / 'x.png'}")
    check_writable_dir(parent, key)


def check_out_dir(
    path: str | Path, *, resume: bool, overwrite: bool, demo: bool = False, key: str = "--out"
) -> None:
    """Refuse a non-empty output folder unless the run continues it (``resume``) or starts over
    in it (``overwrite``: the folder must hold a run, see ``clear_run_folder``)."""
    p = Path(path)
    check_writable_dir(p, key)
    if not p.is_dir() or resume or (overwrite and int(os.environ.get("RANK", 0)) != 0):
        return  # (with --overwrite, rank 0 judges and clears the folder)
    entries = sorted(e.name for e in p.iterdir())
    if not entries:
        return
    known = set(DEMO_ENTRIES if demo else RUN_ENTRIES)
    if overwrite:
        if not known & set(entries):
            raise ConfigError(
                f"{key}: {p} is not empty ({_names(entries)}) and holds no "
                f"{'demo' if demo else 'run'}; --overwrite only clears a run folder: choose an "
                "empty or new folder"
            )
        return
    resume_hint = "" if demo else f"--resume {p} to continue it, "
    raise ConfigError(
        f"{key}: {p} is not empty ({_names(entries)}); pass {resume_hint}--overwrite to delete "
        "its run files and start over, or choose another folder"
    )


def clear_run_folder(path: str | Path, *, demo: bool = False) -> list[str]:
    """Remove the entries a run (``demo``: a demo) writes from ``path``; returns their names.
    Anything else in the folder stays. Only rank 0 of a multi-process run removes."""
    p = Path(path)
    if int(os.environ.get("RANK", 0)) != 0 or not p.is_dir():
        return []
    removed = []
    for name in DEMO_ENTRIES if demo else RUN_ENTRIES:
        e = p / name
        if e.is_symlink() or e.is_file():
            e.unlink()
        elif e.is_dir():
            shutil.rmtree(e)
        else:
            continue
        removed.append(name)
    return removed
