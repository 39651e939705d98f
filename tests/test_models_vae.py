"""Latent space through a tiny random VAE saved with save_pretrained (nothing downloaded)."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL, VQModel

from genrep_fast.models import load_vae, tiny_vae, vae_decode, vae_encode


@pytest.mark.parametrize("kind,cls", [("kl", AutoencoderKL), ("vq", VQModel)])
def test_save_load_encode_decode(tmp_path, kind, cls):
    torch.manual_seed(0)
    vae = tiny_vae(kind).eval()
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae")
    assert type(loaded) is cls and not loaded.training
    for a, b in zip(vae.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)

    images = torch.rand(2, 3, 16, 12) * 2 - 1  # odd aspect
    with torch.no_grad():
        z = vae_encode(loaded, images)
        rec = vae_decode(loaded, z)
    assert z.shape == (2, 4, 8, 6) and rec.shape == images.shape
    # scaling: z = raw * scaling_factor
    with torch.no_grad():
        raw = vae.encode(images)
        raw = raw.latent_dist.mode() if kind == "kl" else raw.latents
    torch.testing.assert_close(z, raw * vae.config.scaling_factor)


def test_kl_sampling_uses_generator(tmp_path):
    vae = tiny_vae("kl").eval()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        a = vae_encode(vae, x, sample=True, generator=torch.Generator().manual_seed(0))
        b = vae_encode(vae, x, sample=True, generator=torch.Generator().manual_seed(0))
        m = vae_encode(vae, x)
    assert torch.equal(a, b) and not torch.equal(a, m)


def test_missing_or_wrong_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no local directory"):
        load_vae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="UNet2DModel"):
        load_vae(tmp_path / "other")
    vae = tiny_vae("kl")
    vae.save_pretrained(tmp_path / "noweights")
    for f in (tmp_path / "noweights").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="weights"):
        load_vae(tmp_path / "noweights")


def test_bad_tensors():
    vae = tiny_vae("kl")
    with pytest.raises(ValueError, match="channels"):
        vae_encode(vae, torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="latents must be"):
        vae_decode(vae, torch.rand(1, 3, 4, 4))
    with pytest.raises(TypeError, match="AutoencoderKL"):
        vae_encode(torch.nn.Identity(), torch.rand(1, 3, 8, 8))
