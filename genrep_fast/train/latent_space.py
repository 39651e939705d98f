"""Latent space from the config: ``model.vae`` (a local diffusers ``AutoencoderKL`` / ``VQModel``
folder saved with ``save_pretrained``; nothing downloads).

* Pixel data (``data.kind`` ``digits`` / ``image_folder``): every training batch is encoded on the
  fly (``LatentSpace.encode``: no grad, float32, the posterior's mode, times the VAE's
  ``scaling_factor``), so the backbone, the chain bank and the head all live in latent space;
  evaluation encodes the held-out images the same way.
* ``data.kind: latents``: the shards already hold latents (e.g. written by ``genrep-fast encode``,
  ``encode_dataset`` below); the VAE only decodes.
* Samples (``genrep-fast sample``, the evaluation's grid) are decoded to pixels in [-1, 1].

``LatentSpace.from_config`` loads the VAE and checks it against the config before any data is read
or any step runs: a missing or invalid folder, or latents that do not fit the model, is a
``ConfigError`` naming the key (exit code 2 of the CLI).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from genrep_fast.train.config import ConfigError, TrainConfig

PIXEL_KINDS = ("digits", "image_folder")
DIGITS_SIZE = 8  # sklearn's digits are 1x8x8


class LatentSpace:
    """The config's VAE on ``device`` (eval mode, float32, no gradients).

    Attributes:
        vae: the diffusers model.
        encodes: whether training batches are images that ``encode`` turns into latents (pixel
            data); False for ``data.kind: latents``.
        downsample: pixels per latent cell along each side (``2 ** (len(block_out_channels)-1)``).
    """

    def __init__(self, vae, path: str, encodes: bool):
        self.vae = vae
        self.path = path
        self.encodes = encodes
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_channels = int(vae.config.in_channels)
        self.latent_channels = int(_latent_channels(vae))

    @classmethod
    def from_config(cls, cfg: TrainConfig, device: torch.device | str) -> LatentSpace | None:
        """The VAE of ``cfg.model.vae`` checked against the config; None when it is not set."""
        from genrep_fast.models.vae import load_vae

        path = cfg.model.vae
        if not path:
            return None
        try:
            vae = load_vae(path, device=device)
        except (OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(
                f"model.vae: cannot load a diffusers AutoencoderKL or VQModel from {path!r} "
                f"(expected a local save_pretrained folder): {reason}"
            ) from None
        vae.requires_grad_(False)
        space = cls(vae, path, encodes=cfg.data.kind in PIXEL_KINDS)
        space.check(cfg)
        return space

    def check(self, cfg: TrainConfig) -> None:
        """``ConfigError`` naming the key when the VAE's latents do not fit ``cfg``."""
        m, d = cfg.model, cfg.data
        what = f"the VAE in model.vae ({self.path})"
        if m.in_channels != self.latent_channels:
            raise ConfigError(
                f"model.in_channels: must be {self.latent_channels}, the latent channels of "
                f"{what}, got {m.in_channels}"
            )
        if d.kind == "digits":
            if self.image_channels != 1:
                raise ConfigError(
                    f"model.vae: the digits are 1-channel images, {what} takes "
                    f"{self.image_channels} channels"
                )
            if m.sample_size * self.downsample != DIGITS_SIZE:
                raise ConfigError(
                    f"model.sample_size: must be {DIGITS_SIZE // self.downsample} (8x8 digits, "
                    f"{what} downsamples by {self.downsample}), got {m.sample_size}"
                )
        elif d.kind == "image_folder":
            channels = 1 if d.grayscale else 3
            if channels != self.image_channels:
                raise ConfigError(
                    f"data.grayscale: must be {str(self.image_channels == 1).lower()}, {what} "
                    f"takes {self.image_channels}-channel images, got {str(d.grayscale).lower()}"
                )
            if d.image_size != m.sample_size * self.downsample:
                raise ConfigError(
                    f"data.image_size: must be model.sample_size x {self.downsample} = "
                    f"{m.sample_size * self.downsample} ({what} downsamples by "
                    f"{self.downsample}), got {d.image_size}"
                )

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 0) -> torch.Tensor:
        """Images ``[B, C, H, W]`` in [-1, 1] -> scaled latents ``[B, c, H/f, W/f]`` float32 on
        the VAE's device (``batch_size`` > 0: that many images per VAE call)."""
        from genrep_fast.models.vae import vae_encode

        if batch_size <= 0 or images.shape[0] <= batch_size:
            return vae_encode(self.vae, images).float()
        return torch.cat(
            [
                vae_encode(self.vae, images[lo : lo + batch_size]).float()
                for lo in range(0, images.shape[0], batch_size)
            ]
        )

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Scaled latents ``[B, c, h, w]`` -> images ``[B, C, h*f, w*f]`` float32 in [-1, 1]
        (clamped, as diffusers' image processor does before saving)."""
        from genrep_fast.models.vae import vae_decode

        out = [
            vae_decode(self.vae, latents[lo : lo + batch_size]).float().clamp(-1, 1)
            for lo in range(0, latents.shape[0], batch_size)
        ]
        return torch.cat(out)


def _latent_channels(vae) -> int:
    lc = getattr(vae.config, "vq_embed_dim", None)
    return lc if lc is not None else vae.config.latent_channels


def encode_dataset(
    space: LatentSpace,
    dataset,
    out_dir: str | Path,
    *,
    shard_size: int = 4096,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = False,
) -> list[Path]:
    """Encode ``dataset`` (``(image, label)`` items, in order) into ``out_dir/shard-NNNNN.safetensors``
    files in the ``latents`` data format (``latents [n, c, h, w]`` float32, scaled: train them
    with ``data.latent_scale: 1``; ``labels [n]`` int64). Row ``i`` of the shards is item ``i`` of
    the dataset. Each shard is written to a temporary name and renamed. Returns the shard paths."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    meta = {
        "format": "genrep_fast latents",
        "vae": str(space.path),
        "scaling_factor": json.dumps(getattr(space.vae.config, "scaling_factor", None)),
        "shift_factor": json.dumps(getattr(space.vae.config, "shift_factor", None)),
        "latent_scale": "1.0",  # stored scaled: train with data.latent_scale: 1
    }
    paths: list[Path] = []
    zs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    held = 0

    def flush() -> None:
        nonlocal zs, ys, held
        if not held:
            return
        z, y = torch.cat(zs), torch.cat(ys)
        path = out_dir / f"shard-{len(paths):05d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file({"latents": z.contiguous(), "labels": y.long().contiguous()}, str(tmp), meta)
        tmp.replace(path)
        paths.append(path)
        zs, ys, held = [], [], 0

    for x, y in tqdm(loader, desc="encode", disable=not progress):
        z = space.encode(x.to(space.device)).cpu()
        y = torch.as_tensor(y)
        while z.shape[0]:
            take = min(shard_size - held, z.shape[0])
            zs.append(z[:take])
            ys.append(y[:take])
            held += take
            z, y = z[take:], y[take:]
            if held == shard_size:
                flush()
    flush()
    return paths
