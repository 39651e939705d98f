"""The method's wiring (docs/METHOD.md sections 2, 4, 5): x_sem's projection learns in stage 1,
the modulation's training input, what keeps the teacher generative, the network the stage-2 bank
comes from, the alignment groups and the teacher's bandwidth chosen on training data only."""

from __future__ import annotations

import math

import pytest
import torch
from train_helpers import tiny_config

from genrep_fast.train.bandwidth import select_bandwidth, split_validation
from genrep_fast.train.data import load_digits_split
from genrep_fast.train.network import build_chain_bank, generation_loss
from genrep_fast.train.trainer import Trainer

ONLY_STAGE1 = ("stage0.steps=0", "stage1.steps=2", "stage2.steps=0")


def _params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _changed(before: dict, module) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def test_xsem_projection_learns_in_stage1(tmp_path):
    # x_sem feeds the logits (PerceptionHead's sem_readout), so L_percept trains to_sem. With a
    # zero gradient AdamW leaves a weight bit-identical, so "changed" means "had a gradient".
    tr = Trainer(tiny_config(tmp_path, *ONLY_STAGE1, "loss.stage1_teacher=none"))
    before = _params(tr.net.head.to_sem)
    tr.run()
    assert _changed(before, tr.net.head.to_sem) == set(before)


@pytest.mark.parametrize("mode", ["keep_diffusion", "freeze", "none"])
def test_stage1_teacher_modes(tmp_path, mode):
    tr = Trainer(tiny_config(tmp_path, *ONLY_STAGE1, f"loss.stage1_teacher={mode}"))
    backbone, head = _params(tr.net.backbone), _params(tr.net.head)
    tr.run()
    assert _changed(before=head, module=tr.net.head)
    moved = _changed(backbone, tr.net.backbone)
    if mode == "freeze":  # the bank depends on the backbone alone: frozen, the teacher stays
        assert not moved
    else:
        assert moved
    # keep_diffusion adds the DDPM loss to stage 1 (and only then is it logged there)
    assert ("ldm" in tr.history[-1]) == (mode == "keep_diffusion")


@pytest.mark.parametrize("network", ["ema", "student"])
def test_stage2_bank_comes_from_the_configured_network(tmp_path, network):
    cfg = tiny_config(
        tmp_path,
        "stage0.steps=0",
        "stage1.steps=1",
        "stage2.steps=0",
        "diffusion.sigma_min=0.3",
        f"diffusion.bank_network={network}",
    )
    tr = Trainer(cfg)
    tr.run()
    tr._enter_stage(2)
    # the student moves away from the EMA teacher (as a few hundred steps would)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in tr.net.backbone.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    tr.refresh_bank()

    def bank_of(net):
        seed = cfg.seed * 31 + 2 * 1_000_003 + tr.step  # the trainer's per-refresh seed
        return build_chain_bank(net, cfg, None, modulated=cfg.loss.semantic, seed=seed).mu

    want, other = (tr.teacher, tr.net) if network == "ema" else (tr.net, tr.teacher)
    assert torch.equal(tr.bank.mu, bank_of(want))
    assert not torch.allclose(tr.bank.mu, bank_of(other), atol=1e-3)


@pytest.mark.parametrize("sem_input", ["xt", "x0"])
def test_modulation_input_follows_sem_input(tmp_path, sem_input):
    # "xt": the modulation sees x_t, as the sampler feeds it, whatever x_sem is (x_sem is then
    # only L_rep_align's target); "x0": it sees x_sem.
    cfg = tiny_config(tmp_path, f"loss.sem_input={sem_input}")
    tr = Trainer(cfg)
    net = tr.net
    with torch.no_grad():  # a modulation that is not the identity
        for p in net.modulation.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x0, y = tr.train_set.batch(torch.arange(8))
    ldm = []
    for seed in (1, 2):
        x_sem = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            _, parts = generation_loss(net, x0, y, gen, cfg, x_sem)
        ldm.append(float(parts["ldm"]))
    assert (ldm[0] == ldm[1]) == (sem_input == "xt")


def _all_indices(groups) -> list[int]:
    return sorted(i for g in groups for i in g)


@pytest.mark.parametrize("groups", ["attention_blocks", "all_blocks"])
def test_alignment_groups_and_the_logged_fraction(tmp_path, groups):
    cfg = tiny_config(
        tmp_path, "stage0.steps=0", "stage1.steps=0", "stage2.steps=1", f"align.groups={groups}"
    )
    tr = Trainer(cfg)
    tr.run()
    n = len(tr.params)
    flat = _all_indices(tr.align_groups)
    assert len(flat) == len(set(flat))  # disjoint
    sizes = [p.numel() for p in tr.params]
    total = sum(sizes)
    if groups == "all_blocks":
        assert flat == list(range(n))
        want = 1.0
    else:  # the attention blocks' parameters, found from the module names
        prefixes = tuple(f"backbone.{b}." for b in tr.net.adapter.attention_block_names)
        attn = [i for i, name in enumerate(tr.param_names) if name.startswith(prefixes)]
        assert flat == attn
        want = sum(sizes[i] for i in attn) / total
        assert 0 < want < 1
    rec = [r for r in tr.history if r["stage"] == 2 and "aligned_fraction" in r]
    assert rec and rec[-1]["aligned_fraction"] == pytest.approx(want, rel=1e-12)


def test_stage2_update_is_the_aligned_sums_written_into_the_perception_buffers(tmp_path):
    """The stage-2 update is the alignment of the step's two gradient sums with the configured
    groups and weights (GradientAligner), written into the perception sums' own buffers: no
    third list of gradients."""
    from genrep_fast import align_gradients
    from genrep_fast.train.trainer import _TaskGradients

    cfg = tiny_config(tmp_path, "stage0.steps=0", "stage1.steps=0", "stage2.steps=1")
    tr = Trainer(cfg)
    tr.run()
    g = torch.Generator().manual_seed(0)
    sums = _TaskGradients(len(tr.params))
    sums.perception = [torch.randn(p.shape, generator=g) for p in tr.params]
    sums.generation = [torch.randn(p.shape, generator=g) for p in tr.params]
    a = cfg.align
    want = align_gradients(
        sums.perception,
        sums.generation,
        groups=tr.align_groups,
        k=a.k,
        w_p=a.w_p,
        w_g=a.w_g,
        mode=a.mode,
        backend=tr.backend,
    )
    buffers = list(sums.perception)
    got = tr._update(2, sums)
    assert all(u is b for u, b in zip(got, buffers, strict=True))
    assert all(torch.equal(u, w) for u, w in zip(got, want, strict=True))


# --------------------------------------------------------------- the teacher's bandwidth


def test_validation_split_is_carved_from_the_training_set():
    train, test = load_digits_split(seed=0)
    tr, val = split_validation(train, 0.1, 1000, seed=0)
    assert len(tr) + len(val) == len(train) and len(val) == round(0.1 * len(train))
    rows = {tuple(x.flatten().tolist()) for x in train.images}
    seen_tr = [tuple(x.flatten().tolist()) for x in tr.images]
    seen_val = [tuple(x.flatten().tolist()) for x in val.images]
    assert set(seen_val) <= rows and set(seen_tr) <= rows
    assert not set(seen_val) & set(seen_tr)
    # the cap on the validation images
    assert len(split_validation(train, 0.5, 100, seed=0)[1]) == 100


def _nll_float64(mu, sigma, x, y, h):
    # -mean log p(y|x) of the mixture with sigma clamped at h, straight from the formula
    mu, s, x = mu.double(), sigma.double().clamp(min=h), x.double()
    d = mu[0, 0].numel()
    sq = ((x[:, None, None] - mu[None]) ** 2).flatten(3).sum(-1)  # [B, C, T]
    logn = -0.5 * sq / s**2 - d * s.log() - 0.5 * d * math.log(2 * math.pi)
    ll = torch.logsumexp(logn, -1) - math.log(mu.shape[1])
    return float(-(ll.log_softmax(1).gather(1, y[:, None])).mean())


def _three_class_bank():
    """``(mu, sigma, x, y)``: 3 classes of 6 near-deterministic steps around a centre each, and
    60 noisy images of the centres (the NLL minimum is interior to [0.05, 8])."""
    g = torch.Generator().manual_seed(0)
    c, t = 3, 6
    centres = torch.randn(c, 1, 1, 2, 2, generator=g)
    mu = centres + 0.3 * torch.randn(c, t, 1, 2, 2, generator=g)
    sigma = 0.01 + 0.02 * torch.rand(c, t, generator=g)
    y = torch.arange(c).repeat(20)
    x = centres[y, 0] + 0.8 * torch.randn(len(y), 1, 2, 2, generator=g)
    return mu, sigma, x, y


def test_select_bandwidth_picks_the_nll_minimum():
    mu, sigma, x, y = _three_class_bank()
    grid = [0.05, 0.2, 0.5, 1.0, 2.0, 8.0]
    choice = select_bandwidth(mu, sigma, x, y, grid)
    want = [_nll_float64(mu, sigma, x, y, h) for h in grid]
    best = min(range(len(grid)), key=lambda i: want[i])
    assert 0 < best < len(grid) - 1  # an interior minimum: neither end of the grid is assumed
    assert choice.bandwidth == grid[best]
    assert choice.nll == pytest.approx(want, rel=1e-5)


def test_select_bandwidth_extends_past_a_grid_whose_top_is_best():
    # a grid that stops below the NLL minimum
    mu, sigma, x, y = _three_class_bank()
    grid = [0.05, 0.1, 0.2]
    assert select_bandwidth(mu, sigma, x, y, grid).bandwidth == 0.2  # the edge, without extend
    choice = select_bandwidth(mu, sigma, x, y, grid, extend=12)
    want = [_nll_float64(mu, sigma, x, y, h) for h in choice.grid]
    best = min(range(len(want)), key=lambda i: want[i])
    assert choice.grid[:3] == grid and choice.grid[3] == pytest.approx(0.3)
    # it stopped one value past an interior minimum, not at the edge or the extension limit
    assert 3 <= best == len(choice.grid) - 2 and len(choice.grid) < len(grid) + 12
    assert choice.bandwidth == choice.grid[best]
    assert choice.nll == pytest.approx(want, rel=1e-5)


class _ForbiddenTestSet:
    """Stands for the test split: any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the test split was read ({name})")

    def __len__(self):
        raise AssertionError("the test split was read (len)")

    def __getitem__(self, i):
        raise AssertionError("the test split was read (item)")


def test_sigma_min_auto_reads_only_the_validation_split(tmp_path):
    cfg = tiny_config(tmp_path, *ONLY_STAGE1, "diffusion.sigma_min=auto")
    tr = Trainer(cfg)
    full, _ = load_digits_split(seed=0)
    assert len(tr.train_set) + len(tr.val_set) == len(full)
    tr.test_set = _ForbiddenTestSet()
    tr.run()
    events = [r for r in tr.history if r.get("event") == "bandwidth"]
    assert len(events) == 1 + (cfg.stage1.steps - 1) // cfg.diffusion.bank_refresh_every
    last = events[-1]
    # the logged choice is the grid's NLL minimum, and it is the bank's clamp and the networks'
    nll = last["bandwidth_val_nll"]
    tried = last["bandwidth_grid"]
    assert tried[: len(cfg.diffusion.bandwidth_grid)] == cfg.diffusion.bandwidth_grid
    assert last["teacher_bandwidth"] == tried[nll.index(min(nll))]
    assert last["teacher_val_nll"] == min(nll)
    assert tr.bank.sigma_min == pytest.approx(last["teacher_bandwidth"], rel=1e-6)
    assert float(tr.bank.sigma.min()) >= tr.bank.sigma_min
    assert float(tr.net.teacher_bandwidth) == last["teacher_bandwidth"]


def test_sigma_min_auto_needs_a_chosen_bandwidth(tmp_path):
    cfg = tiny_config(tmp_path, "diffusion.sigma_min=auto")
    tr = Trainer(cfg)
    with pytest.raises(ValueError, match="diffusion.sigma_min"):
        build_chain_bank(tr.net, cfg, torch.Generator().manual_seed(0), modulated=False)
    tr.net.teacher_bandwidth.fill_(0.4)
    bank = build_chain_bank(tr.net, cfg, torch.Generator().manual_seed(0), modulated=False)
    assert bank.sigma_min == pytest.approx(0.4)


def test_sigma_min_auto_without_distillation_still_chooses_one(tmp_path):
    # no KL term, so no bank while training; evaluation's bank needs the bandwidth all the same
    cfg = tiny_config(tmp_path, *ONLY_STAGE1, "diffusion.sigma_min=auto", "loss.gen_distil=false")
    tr = Trainer(cfg)
    tr.run()
    assert [r["step"] for r in tr.history if r.get("event") == "bandwidth"] == [0]
    bank = build_chain_bank(tr.net, cfg, torch.Generator().manual_seed(0), modulated=False)
    assert bank.sigma_min == pytest.approx(float(tr.net.teacher_bandwidth), rel=1e-6)
    assert bank.sigma_min > 0
