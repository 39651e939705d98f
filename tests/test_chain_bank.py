"""ChainBank: layout, clamping, likelihood against the reference, persistence, refresh, errors."""

from __future__ import annotations

import pytest
import torch

import genrep_fast
from genrep_fast import reference
from genrep_fast.models import (
    ChainBank,
    DDPMSampler,
    SemanticModulation,
    make_adapter,
    min_nonzero_std,
    tiny_dit,
    tiny_scheduler,
    tiny_unet2d,
)

N, BURN, THIN = 9, 3, 2  # kept positions 3, 5, 7 -> T = 3


@pytest.fixture(scope="module")
def unet_adapter():
    torch.manual_seed(0)
    return make_adapter(tiny_unet2d(block_out_channels=(16, 32)), tiny_scheduler())


@pytest.fixture(scope="module")
def dit_adapter():
    torch.manual_seed(0)
    return make_adapter(tiny_dit(), tiny_scheduler(learned_variance=True))


@pytest.fixture(scope="module")
def iso_adapter():
    """A DiT without learned variance (isotropic sigma): the fastest tiny backbone on CPU."""
    torch.manual_seed(0)
    return make_adapter(tiny_dit(learned_variance=False), tiny_scheduler())


@pytest.fixture(scope="module")
def unet_bank(unet_adapter):
    return ChainBank.build(
        unet_adapter,
        3,
        num_steps=N,
        burn_in=BURN,
        thin=THIN,
        chains_per_class=2,
        batch_size=4,
        generator=torch.Generator().manual_seed(0),
    )


def test_bank_shapes_and_T(unet_bank, unet_adapter):
    steps = genrep_fast.thinned_steps(N, BURN, THIN)
    assert unet_bank.steps == steps == [3, 5, 7]
    assert unet_bank.num_samples == len(steps) * 2
    assert unet_bank.mu.shape == (3, 6, *unet_adapter.latent_shape)
    assert unet_bank.sigma.shape == (3, 6) and unet_bank.sigma.dtype == torch.float32
    assert not unet_bank.diagonal
    ts = DDPMSampler(unet_adapter, N).timesteps
    assert unet_bank.timesteps.tolist() == [int(ts[i]) for i in steps]


def test_bank_layout_is_class_major_chain_then_step(iso_adapter):
    """Entry s*T + j of class c is chain s of class c at kept step j (one chain per model batch, so
    the generator draws of the bank and of a plain sampler run coincide)."""
    bank = ChainBank.build(
        iso_adapter,
        2,
        num_steps=N,
        burn_in=BURN,
        thin=THIN,
        chains_per_class=2,
        batch_size=1,
        generator=torch.Generator().manual_seed(7),
    )
    sampler = DDPMSampler(iso_adapter, N)
    g = torch.Generator().manual_seed(7)
    t = len(bank.steps)
    for c in range(2):
        for s in range(2):
            _, rec = sampler.sample(torch.tensor([c]), generator=g, record_steps=bank.steps)
            assert torch.equal(bank.mu[c, s * t : (s + 1) * t], rec.mu[0])
            torch.testing.assert_close(bank.sigma[c, s * t : (s + 1) * t], rec.sigma[0])


def test_sigma_clamped_at_sigma_min(iso_adapter):
    ad = iso_adapter
    # the chain's last step (position N-1) has sigma 0: keep it with burn_in = N - 1
    bank = ChainBank.build(ad, 2, num_steps=N, burn_in=N - 1, thin=1, batch_size=8)
    smin = min_nonzero_std(ad.scheduler, N)
    assert bank.sigma_min == pytest.approx(smin, rel=1e-7)  # rounded to the float32 storage
    assert torch.equal(bank.sigma, torch.full_like(bank.sigma, bank.sigma_min))
    big = ChainBank.build(ad, 2, num_steps=N, burn_in=0, thin=4, batch_size=8, sigma_min=0.5)
    assert float(big.sigma.min()) == 0.5
    assert float(big.sigma.max()) > 0.5  # early steps are above the clamp
    with pytest.raises(ValueError, match="sigma_min"):
        ChainBank.build(ad, 2, num_steps=N, burn_in=0, sigma_min=0.0)


def test_log_likelihood_matches_reference(unet_bank):
    g = torch.Generator().manual_seed(1)
    x = unet_bank.mu[:, 0] + 0.01 * torch.randn(unet_bank.mu[:, 0].shape, generator=g)  # near means
    x = torch.cat([x, torch.randn(2, *unet_bank.latent_shape, generator=g)])
    got = unet_bank.log_likelihood(x)
    ref = reference.mixture_log_likelihood(
        x.double(), unet_bank.mu.double(), unet_bank.sigma.double()
    )
    assert got.shape == (5, 3)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-3)
    # candidate classes pass through
    idx = torch.tensor([[2, 0]] * 5)
    got_k = unet_bank.log_likelihood(x, class_index=idx)
    torch.testing.assert_close(got_k, got[:, [2, 0]])


def test_diagonal_bank_from_learned_variance(dit_adapter):
    bank = ChainBank.build(
        dit_adapter,
        2,
        num_steps=N,
        burn_in=BURN,
        thin=THIN,
        batch_size=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert bank.diagonal and bank.sigma.shape == bank.mu.shape
    assert float(bank.sigma.min()) >= bank.sigma_min
    x = torch.randn(3, *dit_adapter.latent_shape)
    ref = reference.mixture_log_likelihood(x.double(), bank.mu.double(), bank.sigma.double())
    torch.testing.assert_close(bank.log_likelihood(x).double(), ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_bit_identical(tmp_path, dit_adapter, dtype):
    bank = ChainBank.build(
        dit_adapter,
        2,
        num_steps=N,
        burn_in=BURN,
        thin=THIN,
        chains_per_class=2,
        batch_size=3,
        dtype=dtype,
        generator=torch.Generator().manual_seed(0),
    )
    assert bank.mu.dtype == dtype and bank.sigma.dtype == dtype  # diagonal sigma in dtype
    path = bank.save(tmp_path / "bank.safetensors")
    back = ChainBank.load(path)
    for name in ("mu", "sigma", "timesteps"):
        a, b = getattr(bank, name), getattr(back, name)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    assert back.metadata() == bank.metadata() and back.steps == bank.steps
    x = torch.randn(2, *dit_adapter.latent_shape)
    assert torch.equal(back.log_likelihood(x), bank.log_likelihood(x))


def test_bf16_bank_is_widened_for_fp32_x(iso_adapter):
    bank = ChainBank.build(
        iso_adapter, 2, num_steps=N, burn_in=BURN, batch_size=8, dtype=torch.bfloat16
    )
    assert bank.sigma.dtype == torch.float32  # isotropic sigma stays float32
    x = torch.randn(2, *iso_adapter.latent_shape)
    ref = reference.mixture_log_likelihood(x.double(), bank.mu.double(), bank.sigma.double())
    got = bank.log_likelihood(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-3)
    # the widened snapshot is kept until the bank's own refresh changes the bank
    prepared = bank.prepared(torch.float32)
    assert bank.prepared(torch.float32) is prepared
    assert prepared.dtype == torch.float32 and torch.equal(prepared.log_likelihood(x), got)
    bank.refresh(iso_adapter, classes=[0], generator=torch.Generator().manual_seed(9))
    after = bank.prepared(torch.float32)
    ref = reference.mixture_log_likelihood(x.double(), bank.mu.double(), bank.sigma.double())
    assert after is not prepared
    torch.testing.assert_close(after.log_likelihood(x).double(), ref, rtol=1e-5, atol=1e-3)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no chain bank"):
        ChainBank.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a ChainBank"):
        ChainBank.load(tmp_path / "other.safetensors")


def test_refresh_follows_the_model():
    torch.manual_seed(0)
    ad = make_adapter(tiny_dit(learned_variance=False), tiny_scheduler())
    bank = ChainBank.build(
        ad, 3, num_steps=N, burn_in=BURN, batch_size=8, generator=torch.Generator().manual_seed(0)
    )
    old = bank.mu.clone()
    # same weights + same generator -> same bank
    bank.refresh(ad, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bank.mu, old)
    with torch.no_grad():
        ad.model.proj_out_2.bias.add_(0.5)
    bank.refresh(ad, generator=torch.Generator().manual_seed(0), classes=[1])
    assert torch.equal(bank.mu[0], old[0]) and torch.equal(bank.mu[2], old[2])
    assert not torch.equal(bank.mu[1], old[1])
    with pytest.raises(ValueError, match="classes"):
        bank.refresh(ad, classes=[3])
    with pytest.raises(TypeError, match="adapter"):
        bank.refresh(ad.model)


def test_modulated_bank_zero_init_equals_plain(dit_adapter):
    kw = dict(burn_in=BURN, thin=THIN, batch_size=4)
    plain = ChainBank.build(
        dit_adapter, 2, num_steps=N, generator=torch.Generator().manual_seed(2), **kw
    )
    mod = ChainBank.build(
        dit_adapter,
        2,
        num_steps=N,
        generator=torch.Generator().manual_seed(2),
        modulation=SemanticModulation(4),
        **kw,
    )
    assert torch.equal(plain.mu, mod.mu) and torch.equal(plain.sigma, mod.sigma)


def test_build_restores_train_mode(unet_adapter):  # noqa: D103
    unet_adapter.model.train()
    ChainBank.build(unet_adapter, 1, num_steps=3, burn_in=1, batch_size=2)
    assert all(m.training for m in unet_adapter.model.modules())


def test_build_bad_arguments(unet_adapter):
    ad = unet_adapter
    # the ints after num_classes travel by name only: (N, burn-in, thin, S) cannot be swapped
    with pytest.raises(TypeError, match="positional argument"):
        ChainBank.build(ad, 2, 10, 2)
    with pytest.raises(ValueError, match="burn_in must be < num_steps"):
        ChainBank.build(ad, 2, num_steps=10, burn_in=10)
    with pytest.raises(ValueError, match="thin"):
        ChainBank.build(ad, 2, num_steps=10, burn_in=2, thin=0)
    with pytest.raises(ValueError, match="num_train_timesteps=1000"):
        ChainBank.build(ad, 2, num_steps=1001, burn_in=2)
    with pytest.raises(ValueError, match="num_classes=11 exceeds"):
        ChainBank.build(ad, 11, num_steps=10, burn_in=2)
    with pytest.raises(ValueError, match="chains_per_class"):
        ChainBank.build(ad, 2, num_steps=10, burn_in=2, chains_per_class=0)
    with pytest.raises(TypeError, match="dtype"):
        ChainBank.build(ad, 2, num_steps=10, burn_in=2, dtype=torch.int8)
    with pytest.raises(TypeError, match="adapter"):
        ChainBank.build(ad.model, 2, num_steps=10, burn_in=2)
    with pytest.raises(ValueError, match="guidance_scale"):
        ChainBank.build(ad, 2, num_steps=10, burn_in=2, guidance_scale=2.0)


def test_seeded_build_draws_each_model_batch_from_its_own_generator(iso_adapter):
    """With ``seed``, model batch b (class-major chains, ``batch_size`` of them) is exactly a
    sampler run seeded ``batch_seed(seed, b)``: what a rank computes for a batch does not depend on
    the batches before it (the sharded build relies on this; tests/test_train_ddp.py runs it)."""
    from genrep_fast.models.chain_bank import batch_seed

    bank = ChainBank.build(
        iso_adapter,
        3,
        num_steps=N,
        burn_in=BURN,
        thin=THIN,
        chains_per_class=2,
        batch_size=4,
        seed=11,
    )  # 6 chains: batches of 4 and 2
    sampler = DDPMSampler(iso_adapter, N)
    t = len(bank.steps)
    rows_mu = bank.mu.view(6, t, *bank.latent_shape)
    for b, labels in enumerate(([0, 0, 1, 1], [2, 2])):
        g = torch.Generator().manual_seed(batch_seed(11, b))
        _, rec = sampler.sample(torch.tensor(labels), generator=g, record_steps=bank.steps)
        assert torch.equal(rows_mu[4 * b : 4 * b + len(labels)], rec.mu)
    old = bank.mu.clone()
    bank.refresh(iso_adapter, seed=11)
    assert torch.equal(bank.mu, old)


def test_seeded_and_sharded_bad_arguments(iso_adapter):
    kw = dict(burn_in=BURN, thin=THIN, batch_size=4)
    with pytest.raises(ValueError, match="generator or seed"):
        ChainBank.build(iso_adapter, 2, num_steps=N, generator=torch.Generator(), seed=1, **kw)
    with pytest.raises(TypeError, match="seed must be an int"):
        ChainBank.build(iso_adapter, 2, num_steps=N, seed=1.5, **kw)
    with pytest.raises(ValueError, match="sharded=True needs seed"):
        ChainBank.build(iso_adapter, 2, num_steps=N, sharded=True, **kw)
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        ChainBank.build(iso_adapter, 2, num_steps=N, seed=1, sharded=True, **kw)
