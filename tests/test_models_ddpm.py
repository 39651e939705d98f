"""The DDPM transition (mu, sigma) against the scheduler's own formulas and DDPMScheduler.step."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from genrep_fast.models import (
    DDPMSampler,
    make_adapter,
    tiny_dit,
    tiny_scheduler,
    tiny_unet2d,
)
from genrep_fast.models.ddpm import (
    ddpm_transition,
    inference_timesteps,
    min_nonzero_std,
    posterior_coefficients,
    previous_timesteps,
)


def hand_step(sched: DDPMScheduler, x, t: int, prev: int, out, pred_var=None):
    """DDPM eq. 7 written out in float64 from the scheduler's alphas_cumprod (one timestep)."""
    ac = sched.alphas_cumprod.double()
    a_t = ac[t]
    a_p = ac[prev] if prev >= 0 else torch.tensor(1.0, dtype=torch.float64)
    beta_t = 1 - a_t / a_p
    x, out = x.double(), out.double()
    ptype = sched.config.prediction_type
    if ptype == "epsilon":
        x0 = (x - (1 - a_t).sqrt() * out) / a_t.sqrt()
    elif ptype == "v_prediction":
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
    else:
        x0 = out
    if sched.config.clip_sample:
        x0 = x0.clamp(-sched.config.clip_sample_range, sched.config.clip_sample_range)
    mu = a_p.sqrt() * beta_t / (1 - a_t) * x0 + (1 - beta_t).sqrt() * (1 - a_p) / (1 - a_t) * x
    post_var = (1 - a_p) / (1 - a_t) * beta_t
    vtype = sched.config.variance_type
    if t == 0:
        sigma = torch.zeros(()) if pred_var is None else torch.zeros_like(mu)
    elif vtype == "learned_range":
        frac = (pred_var.double() + 1) / 2
        sigma = torch.exp(0.5 * (frac * beta_t.log() + (1 - frac) * post_var.log()))
    elif vtype == "fixed_large":
        sigma = beta_t.sqrt()
    else:
        sigma = post_var.sqrt()
    return mu, sigma


def test_alphas_cumprod_is_the_product_of_betas():
    s = tiny_scheduler()
    torch.testing.assert_close(
        s.alphas_cumprod.double(), torch.cumprod(1 - s.betas.double(), 0), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize(
    "vtype,ptype,clip",
    [
        ("fixed_small", "epsilon", False),
        ("fixed_small", "epsilon", True),
        ("fixed_large", "v_prediction", False),
        ("fixed_small_log", "sample", False),
        ("learned_range", "epsilon", False),
    ],
)
@pytest.mark.parametrize("t,prev", [(999, 994), (503, 498), (7, 2), (3, 0), (0, -1)])
def test_transition_matches_hand_formula_float64(vtype, ptype, clip, t, prev):
    sched = DDPMScheduler(variance_type=vtype, prediction_type=ptype, clip_sample=clip)
    g = torch.Generator().manual_seed(t)
    b, c = 3, 2
    x = torch.randn(b, c, 5, 3, generator=g, dtype=torch.float64)  # odd spatial sizes
    learned = vtype == "learned_range"
    out = torch.randn(b, 2 * c if learned else c, 5, 3, generator=g, dtype=torch.float64)
    if learned:
        out[:, c:] = out[:, c:].tanh()
    tt = torch.full((b,), t)
    mu, sigma = ddpm_transition(sched, x, tt, out, torch.full((b,), prev), learned_variance=learned)
    assert mu.dtype == torch.float64 and mu.shape == x.shape
    assert sigma.shape == ((b, c, 5, 3) if learned else (b,))
    ref_mu, ref_sigma = hand_step(sched, x, t, prev, out[:, :c], out[:, c:] if learned else None)
    torch.testing.assert_close(mu, ref_mu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sigma, ref_sigma.expand_as(sigma).double(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("vtype", ["fixed_small", "fixed_large", "learned_range"])
def test_transition_equals_scheduler_step_with_same_noise(vtype):
    sched = DDPMScheduler(variance_type=vtype, clip_sample=True)
    sched.set_timesteps(50)
    learned = vtype == "learned_range"
    b, c = 2, 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, 6, 6, generator=g)
    out = torch.randn(b, 2 * c if learned else c, 6, 6, generator=g)
    for t in (int(sched.timesteps[0]), int(sched.timesteps[25]), int(sched.timesteps[-1])):
        step = sched.step(out, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
        mu, sigma = ddpm_transition(sched, x, torch.full((b,), t), out, learned_variance=learned)
        noise = randn_tensor((b, c, 6, 6), generator=torch.Generator().manual_seed(1))
        s = sigma if sigma.dim() > 1 else sigma.view(b, 1, 1, 1)
        expected = mu + s * noise if t > 0 else mu
        torch.testing.assert_close(expected, step, rtol=1e-5, atol=1e-5)


def test_eps_scale_converts_a_noise_error_into_the_mean_error():
    """``mu(eps_a) - mu(eps_b) = eps_scale * (eps_b - eps_a)`` for an epsilon model (the
    generation loss's mean correction in noise units), per sample, the last step included."""
    sched = DDPMScheduler(clip_sample=False)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([999, 503, 7, 3, 0])
    prev = torch.tensor([979, 498, 2, 0, -1])
    x = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    eps_a, eps_b = torch.randn(2, 5, 2, 3, 3, generator=g, dtype=torch.float64)
    mu_a, _ = ddpm_transition(sched, x, t, eps_a, prev)
    mu_b, _ = ddpm_transition(sched, x, t, eps_b, prev)
    scale = posterior_coefficients(sched, t, prev, torch.float64).eps_scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(mu_a - mu_b, scale * (eps_b - eps_a), rtol=1e-9, atol=1e-12)


def test_previous_timesteps_follows_scheduler_state():
    sched = tiny_scheduler()
    t = torch.tensor([999, 500, 0])
    assert previous_timesteps(sched, t).tolist() == [998, 499, -1]
    sched.set_timesteps(10)
    ts = sched.timesteps
    got = previous_timesteps(sched, ts)
    assert got.tolist() == [int(sched.previous_timestep(int(v))) for v in ts]
    with pytest.raises(ValueError, match="inference timesteps"):
        previous_timesteps(sched, torch.tensor([3]))


def test_min_nonzero_std_is_smallest_noisy_step_std():
    sched = tiny_scheduler()
    ts = inference_timesteps(sched, 20)
    assert len(ts) == 20 and sched.num_inference_steps is None  # the scheduler is untouched
    stds = []
    for i, t in enumerate(ts.tolist()):
        prev = ts[i + 1].item() if i + 1 < len(ts) else -1
        if t > 0:
            stds.append(float(hand_step(sched, torch.zeros(1), t, prev, torch.zeros(1))[1]))
    assert min_nonzero_std(sched, 20) == pytest.approx(min(stds), rel=1e-12)


def test_step_count_the_scheduler_cannot_serve():
    sched = tiny_scheduler(num_train_timesteps=100)
    with pytest.raises(ValueError, match="num_train_timesteps=100"):
        inference_timesteps(sched, 101)
    with pytest.raises(ValueError, match="num_steps"):
        inference_timesteps(sched, 0)
    with pytest.raises(TypeError, match="num_steps"):
        inference_timesteps(sched, 10.0)


def test_unsupported_scheduler_is_rejected():
    from diffusers import DDIMScheduler

    model = tiny_unet2d(block_out_channels=(16, 32))
    with pytest.raises(TypeError, match="DDPMScheduler"):
        make_adapter(model, DDIMScheduler())
    with pytest.raises(ValueError, match="variance_type"):
        make_adapter(model, DDPMScheduler(variance_type="fixed_large_log"))
    with pytest.raises(ValueError, match="learned_range"):
        make_adapter(model, tiny_scheduler(learned_variance=True))


@pytest.mark.parametrize("kind", ["unet2d", "dit"])
def test_sampler_reproduces_scheduler_loop(kind):
    """Without modulation the sampler is DDPMScheduler.step's chain (same generator, same draws)."""
    torch.manual_seed(0)
    if kind == "unet2d":
        ad = make_adapter(tiny_unet2d(block_out_channels=(16, 32)), DDPMScheduler(clip_sample=True))
    else:
        ad = make_adapter(tiny_dit(), tiny_scheduler(learned_variance=True))
    ad.model.eval()  # the reference loop must not drop labels (DiT CFG dropout in train mode)
    y = torch.tensor([1, 4, 7])
    n = 8
    sampler = DDPMSampler(ad, n)
    x0, rec = sampler.sample(y, generator=torch.Generator().manual_seed(3), record_steps=[0, 5, 7])

    sched = DDPMScheduler.from_config(ad.scheduler.config)
    sched.set_timesteps(n)
    g = torch.Generator().manual_seed(3)
    x = randn_tensor((3, *ad.latent_shape), generator=g)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(ad.predict(x, int(t), y), t, x, generator=g).prev_sample
    torch.testing.assert_close(x0, x, rtol=1e-4, atol=1e-4)
    assert rec.mu.shape == (3, 3, *ad.latent_shape)
    assert rec.timesteps.tolist() == [int(sched.timesteps[i]) for i in (0, 5, 7)]
    assert float(rec.sigma[:, -1].abs().max()) == 0.0  # the last DDPM step is deterministic
    assert ad.scheduler.num_inference_steps is None  # the adapter's scheduler is untouched


def test_sampler_bad_arguments():
    ad = make_adapter(
        tiny_unet2d(block_out_channels=(16, 32)), tiny_scheduler(num_train_timesteps=50)
    )
    with pytest.raises(ValueError, match="num_train_timesteps=50"):
        DDPMSampler(ad, 51)
    with pytest.raises(ValueError, match="guidance_scale"):
        DDPMSampler(ad, 5, guidance_scale=4.0)  # no null class in a UNet2DModel table
    s = DDPMSampler(ad, 5)
    with pytest.raises(ValueError, match="record_steps"):
        s.sample(torch.tensor([0]), record_steps=[5])
    with pytest.raises(ValueError, match="record_steps"):
        s.sample(torch.tensor([0]), record_steps=[3, 1])
    with pytest.raises(ValueError, match="class ids"):
        s.sample(torch.tensor([10]))
    with pytest.raises(TypeError, match="y"):
        s.sample([0, 1])
