"""Latent space: a diffusers ``AutoencoderKL`` or ``VQModel`` loaded from a local directory.

Nothing here downloads: ``load_vae`` reads ``<path>/config.json`` and the weights next to it with
``local_files_only=True`` and fails with ``FileNotFoundError`` naming the path when they are
missing. Latents are scaled as diffusers pipelines do: ``z = (encode(x) - shift_factor) *
scaling_factor`` and back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, VQModel

VAE_CLASSES = {"AutoencoderKL": AutoencoderKL, "VQModel": VQModel}


def load_vae(
    path: str | os.PathLike,
    *,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> AutoencoderKL | VQModel:
    """Load the VAE saved (``save_pretrained``) in the local directory ``path``, in eval mode.

    The class (``AutoencoderKL`` or ``VQModel``) comes from ``_class_name`` in its config.json.
    """
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"load_vae: no local directory {str(p)!r} (hub downloads are disabled; save the VAE "
            "with save_pretrained(path) and pass that directory)"
        )
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(
            f"load_vae: {str(p)!r} has no config.json (not a save_pretrained dir)"
        )
    name = json.loads(cfg_file.read_text()).get("_class_name")
    if name not in VAE_CLASSES:
        raise ValueError(
            f"load_vae: {str(cfg_file)!r} describes a {name!r}; expected one of {list(VAE_CLASSES)}"
        )
    kw = {"local_files_only": True}
    if torch_dtype is not None:
        kw["torch_dtype"] = torch_dtype
    try:
        vae = VAE_CLASSES[name].from_pretrained(str(p), **kw)
    except OSError as exc:  # diffusers says "no file named diffusion_pytorch_model..." here
        raise FileNotFoundError(f"load_vae: cannot read the weights in {str(p)!r}: {exc}") from exc
    if device is not None:
        vae = vae.to(device)
    return vae.eval()


def _check_vae(vae: object) -> AutoencoderKL | VQModel:
    if not isinstance(vae, (AutoencoderKL, VQModel)):
        raise TypeError(f"vae must be an AutoencoderKL or VQModel, got {type(vae).__name__}")
    return vae


def _scale_shift(vae: AutoencoderKL | VQModel) -> tuple[float, float]:
    scale = getattr(vae.config, "scaling_factor", None)
    shift = getattr(vae.config, "shift_factor", None)
    return (1.0 if scale is None else float(scale)), (0.0 if shift is None else float(shift))


def vae_encode(
    vae: AutoencoderKL | VQModel,
    images: torch.Tensor,
    *,
    sample: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [-1, 1] -> scaled latents ``[B, latent_channels, h, w]``.

    ``AutoencoderKL``: the posterior's mode (``sample=True``: a draw with ``generator``).
    ``VQModel``: the pre-quantisation latents (quantised on decode, as diffusers does).
    """
    vae = _check_vae(vae)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be [B, C, H, W], got {getattr(images, 'shape', images)!r}")
    if images.shape[1] != vae.config.in_channels:
        raise ValueError(
            f"images have {images.shape[1]} channels, the VAE takes {vae.config.in_channels}"
        )
    p = next(vae.parameters())
    x = images.to(device=p.device, dtype=p.dtype)
    if isinstance(vae, AutoencoderKL):
        dist = vae.encode(x).latent_dist
        z = dist.sample(generator) if sample else dist.mode()
    else:
        z = vae.encode(x).latents
    scale, shift = _scale_shift(vae)
    return (z - shift) * scale


def vae_decode(vae: AutoencoderKL | VQModel, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents ``[B, latent_channels, h, w]`` -> images ``[B, out_channels, H, W]``."""
    vae = _check_vae(vae)
    lc = vae.config.latent_channels if isinstance(vae, AutoencoderKL) else vae.config.vq_embed_dim
    lc = lc if lc is not None else vae.config.latent_channels
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != lc:
        raise ValueError(
            f"latents must be [B, {lc}, h, w], got {tuple(getattr(latents, 'shape', ()))}"
        )
    scale, shift = _scale_shift(vae)
    p = next(vae.parameters())
    z = latents.to(device=p.device, dtype=p.dtype) / scale + shift
    return vae.decode(z).sample
