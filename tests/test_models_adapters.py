"""Backbone adapters over real diffusers models: blocks, features, hooks, step Gaussians, errors."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DDPMScheduler

from genrep_fast.models import (
    BackboneAdapter,
    configure_attention,
    make_adapter,
    tiny_dit,
    tiny_scheduler,
    tiny_unet2d,
    tiny_unet2d_condition,
)
from genrep_fast.models.ddpm import ddpm_transition

EXPECTED_BLOCKS = {
    "unet2d": [
        "down_blocks.1.attentions.0",
        "up_blocks.0.attentions.0",
        "up_blocks.0.attentions.1",
        "mid_block.attentions.0",
    ],
    "unet2d_condition": [
        "down_blocks.0.attentions.0",
        "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1",
        "mid_block.attentions.0",
    ],
    "dit": ["transformer_blocks.0", "transformer_blocks.1"],
}


def build(kind: str, **kw) -> BackboneAdapter:
    torch.manual_seed(0)
    if kind == "unet2d":  # the 16x16 pixel-space UNet of the issue
        model = tiny_unet2d(sample_size=16, in_channels=3, block_out_channels=(16, 32))
        return BackboneAdapter.unet2d(model, tiny_scheduler(), **kw)
    if kind == "unet2d_condition":
        model = tiny_unet2d_condition(block_out_channels=(16, 32))
        return BackboneAdapter.unet2d_condition(model, tiny_scheduler(), **kw)
    return BackboneAdapter.dit(tiny_dit(), tiny_scheduler(learned_variance=True), **kw)


@pytest.fixture(scope="module", params=["unet2d", "unet2d_condition", "dit"])
def adapter(request) -> BackboneAdapter:
    return build(request.param)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


def test_attention_blocks_found_by_name(adapter):
    assert adapter.attention_block_names == EXPECTED_BLOCKS[adapter.kind]
    blocks = adapter.attention_blocks()
    names = {type(m).__name__ for m in blocks.values()}
    expected = {
        "unet2d": "Attention",
        "unet2d_condition": "Transformer2DModel",
        "dit": "BasicTransformerBlock",
    }
    assert names == {expected[adapter.kind]}
    groups = adapter.parameter_groups()
    assert all(len(p) > 0 for p in groups.values())
    # groups are disjoint
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))


def test_make_adapter_detects_kind(adapter):
    again = make_adapter(adapter.model, adapter.scheduler)
    assert again.kind == adapter.kind and again.latent_shape == adapter.latent_shape
    with pytest.raises(TypeError, match="UNet2DModel"):
        make_adapter(torch.nn.Linear(2, 2), adapter.scheduler)
    with pytest.raises(TypeError, match="kind='dit'"):
        BackboneAdapter.dit(tiny_unet2d(block_out_channels=(16, 32)), tiny_scheduler())


def test_features_shapes_and_no_hook_residue(adapter):
    b = 3
    x = torch.randn(b, *adapter.latent_shape)
    y = torch.tensor([0, 5, 9])
    before = _hook_count(adapter.model)
    feats, out = adapter.features(x, y, return_output=True)
    assert _hook_count(adapter.model) == before == 0
    assert len(feats) == len(adapter.attention_block_names)
    assert [f.shape[1] for f in feats] == adapter.feature_channels
    assert all(f.dim() == 4 and f.shape[0] == b for f in feats)
    # the captured pass is the model's t=0 pass
    with torch.no_grad():
        ref = adapter.predict(x, 0, y) if adapter.kind != "dit" else None
    if ref is not None:
        torch.testing.assert_close(out.detach(), ref)
    with torch.no_grad():  # the unchecked fast path computes the same thing
        fast = adapter.features(x, y, validate=False)
        pred = adapter.predict(x, 0, y, validate=False)
    for a, f in zip(feats, fast):
        torch.testing.assert_close(a.detach(), f)
    if ref is not None:
        torch.testing.assert_close(pred, ref)
    # gradients flow into the blocks through the features
    sum(f.float().square().mean() for f in feats).backward()
    block = next(iter(adapter.attention_blocks().values()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    adapter.model.zero_grad(set_to_none=True)


def test_hooks_removed_when_forward_raises(adapter, monkeypatch):
    x = torch.randn(2, *adapter.latent_shape)
    y = torch.tensor([0, 1])

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(adapter, "_forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        adapter.features(x, y)
    assert _hook_count(adapter.model) == 0


def test_dit_features_keep_labels_and_restore_train_mode():
    ad = build("dit")
    ad.model.train()
    x = torch.randn(64, *ad.latent_shape)
    y = torch.arange(64) % 10
    with torch.no_grad():
        f1 = ad.features(x, y)
        f2 = ad.features(x, y)
    # with 10% label dropout active, two passes differ; the features pass never drops
    for a, b in zip(f1, f2):
        assert torch.equal(a, b)
    torch.manual_seed(1)
    with torch.no_grad():
        p1, p2 = ad.predict(x, 0, y), ad.predict(x, 0, y)
    assert not torch.equal(p1, p2)  # the control: predict() in train mode does drop labels
    with torch.no_grad():
        ad.model.eval()
        ref = ad.predict(x, 0, y)
        ad.model.train()
        _, out = ad.features(x, y, return_output=True)
    torch.testing.assert_close(out, ref)
    assert all(m.training for m in ad.model.modules())


def test_dit_tokens_reshaped_row_major():
    ad = build("dit")
    ad.model.eval()
    x = torch.randn(2, *ad.latent_shape)
    y = torch.tensor([3, 4])
    captured = {}
    block = ad.model.transformer_blocks[1]
    h = block.register_forward_hook(lambda m, a, o: captured.setdefault("tok", o))
    try:
        with torch.no_grad():
            feats = ad.features(x, y)
    finally:
        h.remove()
    tok = captured["tok"]  # [B, N, D]
    p = ad.model.config.patch_size
    gw = ad.latent_shape[2] // p
    # token (i, j) of the patch grid is index i * gw + j
    torch.testing.assert_close(feats[1][:, :, 1, 2], tok[:, 1 * gw + 2, :])


def test_step_distribution_matches_transition_of_model_output(adapter):
    adapter.model.eval()
    b = 2
    x = torch.randn(b, *adapter.latent_shape)
    y = torch.tensor([2, 7])
    with torch.no_grad():
        mu, sigma = adapter.step_distribution(x, 600, y, prev_t=595)
        out = adapter.predict(x, 600, y)
    ref_mu, ref_sigma = ddpm_transition(
        adapter.scheduler,
        x,
        torch.full((b,), 600),
        out,
        torch.full((b,), 595),
        learned_variance=adapter.learned_variance,
    )
    assert mu.shape == x.shape
    assert sigma.shape == (x.shape if adapter.diagonal_sigma else (b,))
    torch.testing.assert_close(mu, ref_mu)
    torch.testing.assert_close(sigma, ref_sigma)
    # default prev_t: the scheduler's previous_timestep (t - 1 before set_timesteps)
    with torch.no_grad():
        mu1, _ = adapter.step_distribution(x, 600, y)
        mu2, _ = adapter.step_distribution(x, 600, y, prev_t=599)
    torch.testing.assert_close(mu1, mu2)
    adapter.model.train()


def test_classifier_free_guidance_on_dit():
    ad = build("dit")
    ad.model.eval()
    assert ad.null_class == 10
    x = torch.randn(2, *ad.latent_shape)
    y = torch.tensor([1, 2])
    t = torch.full((2,), 400)
    with torch.no_grad():
        cond = ad.predict(x, t, y)
        unc = ad.predict(x, t, torch.full((2,), 10))
        guided = ad._guided(x, t, y, 3.0)
    c = ad.latent_shape[0]
    torch.testing.assert_close(guided[:, :c], unc[:, :c] + 3.0 * (cond[:, :c] - unc[:, :c]))
    torch.testing.assert_close(guided[:, c:], cond[:, c:])
    with torch.no_grad():
        mu, sigma = ad.step_distribution(x, 400, y, guidance_scale=3.0)
    assert torch.isfinite(mu).all() and (sigma > 0).all()


def test_bad_inputs_give_clear_errors(adapter):
    c, h, w = adapter.latent_shape
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"x0 must be \[B, \*latent_shape\]"):
        adapter.features(torch.randn(2, c, h + 1, w), y)
    with pytest.raises(ValueError, match="x_t must be"):
        adapter.predict(torch.randn(2, c + 1, h, w), 0, y)
    with pytest.raises(TypeError, match="x_t must be floating"):
        adapter.predict(torch.zeros(2, c, h, w, dtype=torch.int64), 0, y)
    x = torch.randn(2, c, h, w)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, num_classes=10\)"):
        adapter.features(x, torch.tensor([0, 11]))  # 10 is the DiT's null class, 11 never valid
    with pytest.raises(ValueError, match="class ids"):
        adapter.step_distribution(x, 5, torch.tensor([-1, 0]))
    with pytest.raises(TypeError, match="y must be int64"):
        adapter.features(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"y must be \[B\] = \[2\]"):
        adapter.features(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="num_train_timesteps=1000"):
        adapter.predict(x, 1000, y)
    with pytest.raises(TypeError, match="t must be"):
        adapter.predict(x, 0.5, y)


def test_check_values_off_keeps_type_and_shape_checks_without_reads(adapter, monkeypatch):
    """``check_values=False`` (the trainer's step): types and shapes still checked, value ranges
    not (they read values back: a host sync), so out-of-range ids pass the checks."""
    c, h, w = adapter.latent_shape
    x = torch.randn(2, c, h, w)
    with pytest.raises(ValueError, match=r"y must be \[B\] = \[2\]"):
        adapter.features(x, torch.tensor([0, 1, 2]), check_values=False)
    with pytest.raises(TypeError, match="y must be int64"):
        adapter.predict(x, torch.tensor([1, 2]), torch.tensor([0.0, 1.0]), check_values=False)
    with pytest.raises(ValueError, match="x_t must be"):
        adapter.predict(torch.randn(2, c + 1, h, w), 0, torch.tensor([0, 1]), check_values=False)
    y = torch.tensor([0, 1])
    t = torch.tensor([3, 999])
    reads = []
    monkeypatch.setattr(torch.Tensor, "__int__", lambda s: reads.append(s) or 0)
    adapter.check_labels(y, 2, check_values=False)
    adapter._timesteps(t, 2, check_values=False)
    adapter._timesteps(5, 2)  # an int is checked on the host
    assert reads == []
    with pytest.raises(ValueError, match="num_train_timesteps=1000"):
        adapter._timesteps(1000, 2, check_values=False)


def test_unet2d_condition_context_dim_mismatch():
    model = tiny_unet2d_condition(block_out_channels=(16, 32))
    model.register_to_config(cross_attention_dim=32)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        BackboneAdapter.unet2d_condition(model, tiny_scheduler())
    # an explicit context callable is accepted
    ctx = torch.nn.Embedding(10, 64)
    ad = BackboneAdapter.unet2d_condition(
        model, tiny_scheduler(), context=lambda y: ctx(y)[:, None]
    )
    assert ad.num_classes == 10


def test_unconditional_model_rejected():
    from diffusers import UNet2DModel

    model = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        layers_per_block=1,
    )
    with pytest.raises(ValueError, match="class-conditional"):
        make_adapter(model, DDPMScheduler())


def test_attention_backend_is_logged_and_sdpa_on_cpu(caplog):
    model = tiny_unet2d(block_out_channels=(16, 32))
    with caplog.at_level(logging.INFO, logger="genrep_fast.models"):
        ad = make_adapter(model, tiny_scheduler())
    assert ad.attention_backend == "sdpa"
    assert any(
        "attention backend" in r.getMessage() and "SDPA" in r.getMessage() for r in caplog.records
    )
    with pytest.raises(RuntimeError, match="xformers"):
        configure_attention(model, "xformers")
    with pytest.raises(ValueError, match="backend"):
        configure_attention(model, "flash")


@pytest.mark.gpu
def test_xformers_or_sdpa_on_cuda():
    model = tiny_dit().cuda()
    backend = configure_attention(model, "auto")
    ad = make_adapter(model, tiny_scheduler(learned_variance=True))
    x = torch.randn(2, *ad.latent_shape, device="cuda")
    with torch.no_grad():
        out = ad.predict(x, 10, torch.tensor([0, 1], device="cuda"))
    assert torch.isfinite(out).all() and backend in ("sdpa", "xformers")


def test_learned_variance_unet_gives_diagonal_sigma():
    torch.manual_seed(0)
    model = tiny_unet2d(block_out_channels=(16, 32), learned_variance=True).eval()
    ad = make_adapter(model, tiny_scheduler(learned_variance=True))
    assert ad.learned_variance and ad.diagonal_sigma
    x = torch.randn(2, *ad.latent_shape)
    with torch.no_grad():
        mu, sigma = ad.step_distribution(x, 300, torch.tensor([0, 1]))
    assert sigma.shape == x.shape and (sigma > 0).all()
    # with a fixed-variance scheduler the variance half is ignored (as diffusers' DiT pipeline)
    ad_fixed = make_adapter(model, tiny_scheduler())
    with torch.no_grad():
        mu2, sigma2 = ad_fixed.step_distribution(x, 300, torch.tensor([0, 1]))
    assert not ad_fixed.diagonal_sigma and sigma2.shape == (2,)
    torch.testing.assert_close(mu2, mu)


def test_nvtx_ranges_around_features_steps_and_refresh(monkeypatch):
    import genrep_fast.profiling as profiling
    from genrep_fast.models import ChainBank

    names: list[str] = []

    class FakeNvtx:
        @staticmethod
        def push_range(name, color=None, domain=None):
            names.append(name)

        @staticmethod
        def pop_range(domain=None):
            pass

    monkeypatch.setattr(profiling, "_nvtx", FakeNvtx)
    ad = make_adapter(tiny_dit(), tiny_scheduler(learned_variance=True))
    ad.features(torch.randn(1, *ad.latent_shape), torch.tensor([0]))
    assert names == ["genrep.features"]
    names.clear()
    ChainBank.build(ad, 1, num_steps=4, burn_in=1, batch_size=1)
    assert names[0] == "genrep.bank_refresh" and names.count("genrep.sampling_step") == 4


def test_null_class_pass_and_counting_the_null_row():
    ad = build("dit")
    ad.model.eval()
    x = torch.randn(2, *ad.latent_shape)
    null = torch.full((2,), ad.null_class)
    with torch.no_grad():
        feats, out = ad.features(x, null, return_output=True)  # class-agnostic perception
        ref = ad.predict(x, 0, null)
    torch.testing.assert_close(out, ref)
    # a caller may count the null row as a class (num_classes = C + 1)
    again = BackboneAdapter.dit(ad.model, ad.scheduler, num_classes=11)
    assert again.num_classes == 11 and again.null_class == 10
    unet = tiny_unet2d(block_out_channels=(16, 32), num_classes=11)
    ad_u = BackboneAdapter.unet2d(unet, tiny_scheduler(), num_classes=10, null_class=10)
    assert ad_u.check_guidance(2.0) == 2.0
    with pytest.raises(ValueError, match="class ids"):
        ad_u.features(x[:, :1].expand(2, 1, 8, 8).contiguous(), torch.tensor([0, 11]))
