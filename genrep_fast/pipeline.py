"""``GenRep``: a trained GenRep model from Python (classify, sample, export to diffusers).

    model = GenRep.from_pretrained("demo_out")     # a run, a checkpoint, or a save_pretrained folder
    model.classify(images).labels                 # ["cat", "dog", ...] and .probs [B, C]
    x = model.sample(["cat", "dog"], steps=50, guidance_scale=2.0, generator=g)
    model.save_pretrained("exported")             # UNet2DModel.from_pretrained("exported") works

It wraps the trainer's network (``genrep_fast.train.network.GenRepNet``, loaded by
``genrep_fast.train.trainer.load_for_inference``): the diffusers backbone, the perception head,
the semantic modulation, the DDPM scheduler and the class names saved with the run.

A ``save_pretrained`` folder is a diffusers model folder (``config.json`` +
``diffusion_pytorch_model.safetensors`` of the backbone, ``scheduler_config.json`` of the
scheduler) with two files of its own next to it: ``genrep.safetensors`` (the head and the
modulation) and ``genrep.json`` (class names and the training config; written last, so a folder
whose export was cut short is not taken for a complete one).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

EXPORT_META = "genrep.json"
EXPORT_TENSORS = "genrep.safetensors"
EXPORT_FORMAT = "genrep_fast-pretrained"
EXPORT_VERSION = 1


@dataclasses.dataclass
class Classification:
    """The head's answer for a batch: ``probs [B, C]`` float32 (rows sum to 1, on the CPU) and
    the class names of the columns."""

    probs: torch.Tensor
    class_names: list[str]

    @property
    def indices(self) -> torch.Tensor:
        """``[B]`` int64: the most probable class id of each image."""
        return self.probs.argmax(-1)

    @property
    def labels(self) -> list[str]:
        """The most probable class name of each image."""
        return [self.class_names[int(i)] for i in self.indices]

    @property
    def scores(self) -> list[float]:
        """The probability of each image's most probable class."""
        return [float(v) for v in self.probs.max(-1).values]

    def top(self, k: int = 3) -> list[list[tuple[str, float]]]:
        """Per image, the ``k`` most probable ``(name, probability)``, best first."""
        top = self.probs.topk(min(k, self.probs.shape[-1]), dim=-1)
        return [
            [(self.class_names[int(i)], float(v)) for v, i in zip(vals, idx)]
            for vals, idx in zip(top.values, top.indices)
        ]


class GenRep:
    """A trained GenRep model for inference (see the module docstring).

    Attributes:
        net: the ``GenRepNet`` (eval mode, no gradients); ``backbone``, ``head``, ``modulation``,
            ``scheduler`` are its parts.
        config: the ``TrainConfig`` the model was trained with.
        class_names: the name of each class id (an image folder's sub-folder names; "0", "1", ...
            for a run saved without names).
    """

    def __init__(self, net, config):
        self.net = net
        self.config = config

    # ------------------------------------------------------------------ parts

    @property
    def backbone(self) -> torch.nn.Module:
        return self.net.backbone

    @property
    def head(self) -> torch.nn.Module:
        return self.net.head

    @property
    def modulation(self) -> torch.nn.Module:
        return self.net.modulation

    @property
    def scheduler(self):
        return self.net.scheduler

    @property
    def class_names(self) -> list[str]:
        return list(self.net.class_names)

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of what the backbone denoises and the head classifies."""
        return tuple(self.net.adapter.latent_shape)

    @property
    def device(self) -> torch.device:
        return self.net.adapter.device

    def __repr__(self) -> str:
        return (
            f"GenRep({type(self.backbone).__name__}, latent {self.latent_shape}, "
            f"classes {self.class_names})"
        )

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device | None = None
    ) -> GenRep:
        """Load a trained model.

        Args:
            path: a ``save_pretrained`` folder; a checkpoint folder; a run folder (its latest
                intact checkpoint); or a ``genrep-fast demo --out`` folder (its ``run``).
            device: where to put the model (default: the config's ``runtime.device``, ``auto``:
                CUDA when available).

        Raises:
            genrep_fast.train.checkpoint.CheckpointError: no checkpoint or export at ``path``, or
                a corrupted one.
        """
        p = Path(path)
        if (p / EXPORT_META).is_file():
            return cls._from_export(p, device)
        from genrep_fast.train import checkpoint as ckpt
        from genrep_fast.train.trainer import load_for_inference

        if not _holds_checkpoints(p) and _holds_checkpoints(p / "run"):
            p = p / "run"  # a demo folder: demo_out/run is its run
        overrides = ["runtime.progress=false"]
        if device is not None:
            overrides.append(f"runtime.device={torch.device(device)}")
        if not p.exists():
            raise ckpt.CheckpointError(f"{p}: does not exist")
        cfg, net, _ = load_for_inference(p, overrides)
        return cls(net, cfg)

    @classmethod
    def _from_export(cls, folder: Path, device) -> GenRep:
        from safetensors.torch import load_file

        from genrep_fast.train.checkpoint import CheckpointError
        from genrep_fast.train.config import config_from_dict
        from genrep_fast.train.network import build_network, class_names_for
        from genrep_fast.train.trainer import _load_module, resolve_device

        try:
            meta = json.loads((folder / EXPORT_META).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{folder / EXPORT_META}: cannot be read ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
            raise CheckpointError(f"{folder / EXPORT_META}: not a genrep_fast export")
        if meta.get("version") != EXPORT_VERSION:
            raise CheckpointError(
                f"{folder / EXPORT_META}: export version {meta.get('version')!r}, this "
                f"genrep_fast reads {EXPORT_VERSION}"
            )
        cfg_dict = dict(meta["config"])
        # the backbone comes from this folder, through diffusers' own from_pretrained
        cfg_dict["model"] = {**cfg_dict["model"], "pretrained": str(folder)}
        cfg_dict["runtime"] = {**cfg_dict.get("runtime", {}), "progress": False}
        if device is not None:
            cfg_dict["runtime"]["device"] = str(torch.device(device))
        cfg = config_from_dict(cfg_dict)
        net = build_network(cfg, resolve_device(cfg.runtime.device))
        try:
            tensors = load_file(str(folder / EXPORT_TENSORS), device=str(net.adapter.device))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{folder / EXPORT_TENSORS}: cannot be read ({exc})") from None
        for part in ("head", "modulation"):
            state = {k[len(part) + 1 :]: v for k, v in tensors.items() if k.startswith(part + ".")}
            _load_module(getattr(net, part), state, f"{folder.name} {part}")
        net.class_names = class_names_for(meta.get("class_names"), net.num_classes)
        with torch.no_grad():
            for q in net.backbone.parameters():
                # Fresh storage: diffusers leaves the weights at unaligned offsets of the file's
                # buffer, where the CPU kernels take other paths (last-bit differences from the
                # same weights loaded from a checkpoint, measured up to 6e-7).
                q.data = q.data.clone()
        for q in net.parameters():
            q.requires_grad_(False)
        return cls(net.eval(), cfg)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the model to ``folder`` (see the module docstring); returns the folder.

        The backbone is a diffusers model folder: ``UNet2DModel.from_pretrained(folder)`` (or
        ``DiTTransformer2DModel``) loads it without genrep_fast, and
        ``DDPMScheduler.from_pretrained(folder)`` the scheduler. Its class embedding has one row
        more than there are classes: the last is the null class (classifier-free guidance).
        ``GenRep.from_pretrained(folder)`` loads everything back.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / EXPORT_META).unlink(missing_ok=True)  # incomplete until rewritten last
        self.backbone.save_pretrained(folder, safe_serialization=True)
        self.scheduler.save_pretrained(folder)
        tensors = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        tensors.update({f"modulation.{k}": v for k, v in self.modulation.state_dict().items()})
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(folder / EXPORT_TENSORS),
        )
        meta = {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "backbone": type(self.backbone).__name__,
            "class_names": self.class_names,
            "null_class": self.net.null_class,
            "config": self.config.to_dict(),
        }
        (folder / EXPORT_META).write_text(json.dumps(meta, indent=1))
        return folder

    # ------------------------------------------------------------------ use

    def to_input(self, images) -> torch.Tensor:
        """``images`` as a ``[B, *latent_shape]`` float32 batch on the model's device.

        ``images``: a tensor ``[B, *latent_shape]`` or ``[*latent_shape]`` (pixels in [-1, 1], or
        latents for a latent model), or an image file path / PIL image, or a list of those (files
        and PIL images are centre-cropped and resized as in training; pixel models only).
        """
        items = images if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("images: empty")
        if isinstance(images, torch.Tensor):
            x = images if images.dim() == len(self.latent_shape) + 1 else images.unsqueeze(0)
            return self._checked_batch(x)
        return self._checked_batch(
            torch.stack([self._one_input(i, im) for i, im in enumerate(items)])
        )

    def _one_input(self, i: int, item) -> torch.Tensor:
        if isinstance(item, torch.Tensor):
            if tuple(item.shape) != self.latent_shape:
                raise ValueError(
                    f"images[{i}]: shape {tuple(item.shape)}, expected {self.latent_shape}"
                )
            return item.float().cpu()
        from PIL import Image

        from genrep_fast.train.data import image_tensor

        c, h, w = self.latent_shape
        if self.config.data.kind == "latents" or c not in (1, 3) or h != w:
            raise ValueError(
                f"images[{i}]: this model works on latents {self.latent_shape}; pass a tensor "
                "of encoded latents, not an image"
            )
        if isinstance(item, Image.Image):
            return image_tensor(item, h, grayscale=c == 1)
        if isinstance(item, (str, Path)):
            try:
                with Image.open(item) as im:
                    return image_tensor(im, h, grayscale=c == 1)
            except OSError as exc:
                raise ValueError(f"images[{i}]: cannot read {item} as an image ({exc})") from None
        raise TypeError(
            f"images[{i}]: expected a tensor, a PIL image or a file path, got {type(item).__name__}"
        )

    def _checked_batch(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != len(self.latent_shape) + 1 or tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"images: shape {tuple(x.shape)}, expected [B, {', '.join(map(str, self.latent_shape))}]"
            )
        if not x.is_floating_point():
            raise TypeError(f"images: dtype {x.dtype}, expected a floating-point tensor")
        return x.to(self.device, torch.float32)

    @torch.no_grad()
    def classify(self, images, batch_size: int = 256) -> Classification:
        """The perception head's class probabilities for ``images`` (see ``to_input``)."""
        from genrep_fast.train.evaluation import head_probabilities

        probs = head_probabilities(self.net, self.to_input(images), batch_size=batch_size)
        return Classification(probs.float(), self.class_names)

    def class_ids(self, labels) -> torch.Tensor:
        """``labels`` (class names, class ids, or a mix; one or a list; or an int tensor
        ``[B]``) as ``[B]`` int64 class ids on the model's device."""
        if isinstance(labels, torch.Tensor):
            if labels.dim() != 1 or labels.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"labels: a tensor of class ids must be 1-D int64, got shape "
                    f"{tuple(labels.shape)} {labels.dtype}"
                )
            ids = labels.to(torch.int64).cpu().tolist()
        else:
            ids = list(labels) if isinstance(labels, (list, tuple)) else [labels]
        if not ids:
            raise ValueError("labels: empty")
        names = self.class_names
        out = []
        for i, lab in enumerate(ids):
            if isinstance(lab, str):
                if lab not in names:
                    raise ValueError(f"labels[{i}]: unknown class {lab!r}; the classes are {names}")
                out.append(names.index(lab))
            elif isinstance(lab, int) and not isinstance(lab, bool):
                if not 0 <= lab < self.num_classes:
                    raise ValueError(f"labels[{i}]: class id {lab} outside [0, {self.num_classes})")
                out.append(lab)
            else:
                raise TypeError(
                    f"labels[{i}]: expected a class name or id, got {type(lab).__name__}"
                )
        return torch.tensor(out, dtype=torch.int64, device=self.device)

    @torch.no_grad()
    def sample(
        self,
        labels,
        *,
        steps: int | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        use_modulation: bool | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Class-conditional samples by ancestral DDPM sampling: ``[B, *latent_shape]`` float32
        on the model's device (pixels in about [-1, 1] for a pixel model; latents otherwise).

        Args:
            labels: class names and/or ids, one per sample (see ``class_ids``).
            steps: reverse-chain steps (default: the config's ``eval.sample_steps``, else
                ``diffusion.num_steps``), in ``[1, num_train_timesteps]``.
            guidance_scale: classifier-free guidance with the null class (trained by label
                dropout): ``eps = eps_null + s (eps_y - eps_null)``; 1.0 is none (one model
                pass per step instead of two).
            generator: the noise's torch generator (default: torch's global one).
            use_modulation: semantic modulation of each step (default: as trained,
                ``loss.semantic``).
        """
        from genrep_fast.models import DDPMSampler

        y = self.class_ids(labels)
        if steps is None:
            steps = self.config.eval.sample_steps or self.config.diffusion.num_steps
        n_train = int(self.scheduler.config.num_train_timesteps)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= n_train:
            raise ValueError(f"steps: expected an int in [1, {n_train}], got {steps!r}")
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, (int, float))
            or not math.isfinite(guidance_scale)
        ):
            raise ValueError(f"guidance_scale: expected a finite number, got {guidance_scale!r}")
        if use_modulation is None:
            use_modulation = self.config.loss.semantic
        sampler = DDPMSampler(
            self.net.adapter,
            steps,
            self.modulation if use_modulation else None,
            guidance_scale=float(guidance_scale),
        )
        return sampler.sample(y, generator=generator, progress=progress)


def _holds_checkpoints(p: Path) -> bool:
    from genrep_fast.train.checkpoint import LATEST, META_FILE

    return (p / META_FILE).exists() or (p / LATEST).exists() or (p / "checkpoints").is_dir()


__all__ = ["GenRep", "Classification"]
