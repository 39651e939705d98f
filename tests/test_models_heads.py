"""Perception head, semantic modulation and the representation-alignment loss."""

from __future__ import annotations

import pytest
import torch

from genrep_fast.models import (
    DDPMSampler,
    PerceptionHead,
    SemanticModulation,
    make_adapter,
    rep_align_loss,
    tiny_dit,
    tiny_scheduler,
)

# ----------------------------------------------------------------------------- head


def test_perception_head_shapes_and_gradients():
    torch.manual_seed(0)
    feats = [
        torch.randn(3, 16, 8, 8, requires_grad=True),
        torch.randn(3, 32, 4, 4, requires_grad=True),
        torch.randn(3, 24, 3, 5, requires_grad=True),  # odd, non-square
    ]
    head = PerceptionHead([16, 32, 24], num_classes=7, latent_shape=(4, 6, 6), hidden=32)
    logits, x_sem = head(feats)
    assert logits.shape == (3, 7) and x_sem.shape == (3, 4, 6, 6)
    assert head.aggregate(feats).shape == (3, 32, 6, 6)
    (logits.sum() + x_sem.square().sum()).backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)


def test_perception_head_is_per_sample():
    """Images do not leak into each other's logits (GroupNorm/LayerNorm are per sample)."""
    torch.manual_seed(0)
    head = PerceptionHead([8, 8], num_classes=3, latent_shape=(1, 4, 4), hidden=16).eval()
    f = [torch.randn(4, 8, 4, 4), torch.randn(4, 8, 2, 2)]
    full, _ = head(f)
    one, _ = head([v[2:3] for v in f])
    torch.testing.assert_close(full[2:3], one, rtol=1e-5, atol=1e-6)


def test_perception_head_bad_input():
    head = PerceptionHead([8, 16], num_classes=3, latent_shape=(1, 4, 4), hidden=16)
    with pytest.raises(ValueError, match="expected 2 maps"):
        head([torch.randn(2, 8, 4, 4)])
    with pytest.raises(ValueError, match=r"features\[1\] must be \[B, 16, H, W\]"):
        head([torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)])
    with pytest.raises(ValueError, match="batch"):
        head([torch.randn(2, 8, 4, 4), torch.randn(3, 16, 4, 4)])
    with pytest.raises(ValueError, match="latent_shape"):
        PerceptionHead([8], num_classes=3, latent_shape=(4, 4))
    with pytest.raises(ValueError, match="num_classes"):
        PerceptionHead([8], num_classes=0, latent_shape=(1, 4, 4))


# ----------------------------------------------------------------------------- modulation


def _inputs(b=3, c=4, h=5, w=6, dtype=torch.float32, diagonal=False):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    sigma = torch.rand((b, c, h, w) if diagonal else (b,), generator=g, dtype=dtype) + 0.01
    x_t = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    x_sem = torch.randn(b, c, h, w, generator=g, dtype=dtype)
    return mu, sigma, x_t, x_sem


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("diagonal", [False, True])
def test_zero_init_modulation_changes_no_bit(dtype, diagonal):
    torch.manual_seed(0)
    mod = SemanticModulation(4)
    mu, sigma, x_t, x_sem = _inputs(dtype=dtype, diagonal=diagonal)
    t = torch.tensor([999, 10, 0])
    mu2, sigma2 = mod(mu, sigma, x_t, x_sem, t)
    assert mu2.dtype == mu.dtype and sigma2.dtype == sigma.dtype
    assert torch.equal(mu2.view(-1).view(torch.uint8), mu.view(-1).view(torch.uint8))
    assert torch.equal(sigma2.reshape(-1).view(torch.uint8), sigma.reshape(-1).view(torch.uint8))


def test_zero_init_modulation_leaves_sampler_chain_unchanged():
    torch.manual_seed(0)
    ad = make_adapter(tiny_dit(), tiny_scheduler(learned_variance=True))
    y = torch.tensor([0, 3])
    plain = DDPMSampler(ad, 6).sample(y, generator=torch.Generator().manual_seed(5))
    mod = DDPMSampler(ad, 6, modulation=SemanticModulation(4)).sample(
        y, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(plain, mod)


def test_trained_modulation_formula_and_bound():
    torch.manual_seed(0)
    mod = SemanticModulation(2, hidden=8, sigma_bound=0.5)
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 3.0)  # large weights: tanh saturates, factor must stay inside the bound
    mu, sigma, x_t, x_sem = _inputs(b=4, c=2, dtype=torch.float64)
    t = torch.tensor([1, 50, 500, 999])
    mu2, sigma2 = mod.double()(mu, sigma, x_t, x_sem, t)
    # mean: mu + W_t [x_t; x_sem] + b_t, with (W_t, b_t) from the time embedding
    w_t, b_t = mod.projection(t, torch.float64)
    z = torch.cat([x_t, x_sem], 1)
    ref = mu + torch.einsum("boi,bihw->bohw", w_t, z) + b_t[:, :, None, None]
    torch.testing.assert_close(mu2, ref)
    factor = sigma2 / sigma
    # tanh saturates to exactly -1/1 in floating point: the closed bound, still > 0
    assert (factor >= 0.5).all() and (factor <= 1.5).all()
    assert not torch.allclose(factor, torch.ones_like(factor))
    # W_t depends on t
    assert not torch.allclose(w_t[0], w_t[3])


def test_zero_layers_receive_gradients():
    mod = SemanticModulation(3)
    mu, sigma, x_t, x_sem = _inputs(c=3)
    mu2, sigma2 = mod(mu, sigma, x_t, x_sem, 100)
    (mu2.sum() + sigma2.sum()).backward()
    assert mod.to_projection.weight.grad.abs().sum() > 0
    assert mod.sigma_out.weight.grad.abs().sum() > 0


def test_modulation_bad_input():
    mod = SemanticModulation(4)
    mu, sigma, x_t, x_sem = _inputs()
    with pytest.raises(ValueError, match="x_sem must have shape"):
        mod(mu, sigma, x_t, x_sem[:, :2], 0)
    with pytest.raises(ValueError, match="sigma must be"):
        mod(mu, sigma[:2], x_t, x_sem, 0)
    with pytest.raises(ValueError, match="built for 4"):
        mod(mu[:, :3], sigma, x_t[:, :3], x_sem[:, :3], 0)
    with pytest.raises(ValueError, match="t must be"):
        mod(mu, sigma, x_t, x_sem, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="sigma_bound"):
        SemanticModulation(4, sigma_bound=1.0)


def test_rep_align_loss_against_float64():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 4, 3, 3, generator=g)
    s = torch.randn(5, 36, generator=g)  # same values per sample, other layout
    loss = rep_align_loss(h, s)
    hd, sd = h.double().reshape(5, -1), s.double()
    ref = (1 - (hd * sd).sum(1) / (hd.norm(dim=1) * sd.norm(dim=1))).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-7)
    assert float(rep_align_loss(h, h.reshape(5, -1))) == pytest.approx(0.0, abs=1e-6)
    assert float(rep_align_loss(h, -h)) == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(ValueError, match="same batch size"):
        rep_align_loss(h, s[:, :35])
    with pytest.raises(TypeError, match="h must be"):
        rep_align_loss(h.long(), s)
