"""GradientAligner: two backward passes over one graph, grouping, .grad semantics, AMP."""

from __future__ import annotations

import pytest
import torch
from _alignment_nets import Block
from torch import nn

from genrep_fast import reference
from genrep_fast.alignment import GradientAligner


class Net(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.head_p = nn.Linear(d, 3)
        self.head_g = nn.Linear(d, 4)  # only loss_g reaches it: its p gradient is None

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head_p(h), self.head_g(h)


def losses(model, x):
    zp, zg = model(x)
    return zp.pow(2).mean(), (zg - 1).pow(2).mean() + zp.sum() * 0.01


def expected_update(model, x, groups, **kw):
    params = [p for p in model.parameters()]
    lp, lg = losses(model, x)
    gp = torch.autograd.grad(lp, params, retain_graph=True, allow_unused=True)
    gg = torch.autograd.grad(lg, params, allow_unused=True)
    return reference.align_gradients(list(gp), list(gg), groups=groups, **kw)


def test_by_module_groups_and_grad():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(16, 4)
    groups = GradientAligner.by_module(model, Block)
    assert len(groups) == 2 and all(len(g) == 4 for g in groups)
    params = list(model.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    idx_groups = [[index[id(p)] for p in grp] for grp in groups]
    want = expected_update(model, x, idx_groups, k=2.0, w_p=0.7, w_g=0.3, mode="symmetric")
    aligner = GradientAligner(model, groups=groups)
    aligner.backward(*losses(model, x))
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w.to(p.dtype), rtol=1e-6, atol=1e-7)
    # parameters outside the groups got w_p * p + w_g * g: check one directly
    lp, lg = losses(model, x)
    gp = torch.autograd.grad(lp, model.inp.weight, retain_graph=True)[0]
    gg = torch.autograd.grad(lg, model.inp.weight)[0]
    torch.testing.assert_close(model.inp.weight.grad, 0.7 * gp + 0.3 * gg)


@pytest.mark.parametrize("groups", ["per_tensor", "global"])
@pytest.mark.parametrize("mode", ["symmetric", "perception"])
def test_presets_match_reference(groups, mode):
    torch.manual_seed(1)
    model = Net()
    x = torch.randn(16, 4)
    ref_groups = None if groups == "per_tensor" else "global"
    want = expected_update(model, x, ref_groups, k=3.5, w_p=0.6, w_g=0.4, mode=mode)
    GradientAligner(model, groups=groups, k=3.5, w_p=0.6, w_g=0.4, mode=mode).backward(
        *losses(model, x)
    )
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-7)


def test_accumulates_into_existing_grad_and_shared_gradient_buffers():
    torch.manual_seed(2)
    a = nn.Parameter(torch.randn(5))
    b = nn.Parameter(torch.randn(5))
    # (a + b): autograd hands the same gradient tensor to a and b, and sum() an expanded one.
    lp = (a + b).sum()
    lg = ((a + b) ** 2).sum()
    gp = torch.autograd.grad(lp, [a, b], retain_graph=True)
    gg = torch.autograd.grad(lg, [a, b], retain_graph=True)
    want = reference.align_gradients(list(gp), list(gg), groups=None)
    a.grad = torch.ones(5)
    GradientAligner([a, b]).backward(lp, lg)
    torch.testing.assert_close(a.grad, want[0] + 1)
    torch.testing.assert_close(b.grad, want[1])


def test_by_module_predicate_and_nesting():
    model = Net()
    groups = GradientAligner.by_module(model, lambda name, m: name.startswith("blocks."))
    # blocks.0 and blocks.1 match; their children (blocks.0.attn, ...) are inside them.
    assert len(groups) == 2
    with pytest.raises(TypeError, match="predicate"):
        GradientAligner.by_module(model, lambda m: True)


def test_bad_arguments():
    model = Net()
    with pytest.raises(ValueError, match="k must be >= 0"):
        GradientAligner(model, k=-1)
    with pytest.raises(ValueError, match="not among"):
        GradientAligner(model.blocks[0], groups=[[model.inp.weight]])
    with pytest.raises(ValueError, match="overlap"):
        GradientAligner(model, groups=[[model.inp.weight], [model.inp.weight]])
    with pytest.raises(ValueError, match="mode"):
        GradientAligner(model, mode="both")
    with pytest.raises(ValueError, match="process_group"):
        GradientAligner(model, sharded=True)
    with pytest.raises(ValueError, match="scalar"):
        GradientAligner(model).backward(torch.ones(2), torch.ones(()))


def test_grad_scaler_skips_step_on_inf_in_one_group():
    torch.manual_seed(3)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    aligner = GradientAligner(model, groups=GradientAligner.by_module(model, Block))
    x = torch.randn(16, 4)

    # A finite step first: the scaled update unscales to the unscaled update (degree-1 homogeneity).
    lp, lg = losses(model, x)
    want = expected_update(model, x, None, k=2.0)
    aligner2 = GradientAligner(model)
    aligner2.backward(scaler.scale(lp), scaler.scale(lg))
    scaler.unscale_(opt)
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)

    # Now an inf in the generation gradient of blocks[1] only.
    before = [p.detach().clone() for p in model.parameters()]
    scale_before = scaler.get_scale()
    lp, lg = losses(model, x)
    lg = lg + (model.blocks[1].attn.weight * float("inf")).sum()
    aligner.backward(scaler.scale(lp), scaler.scale(lg))
    # the whole group is non-finite (nan), the other groups stay finite
    for p in model.blocks[1].parameters():
        assert not torch.isfinite(p.grad).all()
    assert torch.isfinite(model.blocks[0].attn.weight.grad).all()
    scaler.step(opt)
    scaler.update()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)
    assert scaler.get_scale() < scale_before


def test_bf16_autocast():
    torch.manual_seed(4)
    model = Net()
    x = torch.randn(16, 4)
    params = list(model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, lg = losses(model, x)
    gp = torch.autograd.grad(lp, params, retain_graph=True, allow_unused=True)
    gg = torch.autograd.grad(lg, params, retain_graph=True, allow_unused=True)
    want = reference.align_gradients(list(gp), list(gg), groups="global")
    GradientAligner(model, groups="global").backward(lp, lg)
    for p, w in zip(params, want):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-7)


def test_step_plan_is_computed_once_per_gradient_layout(monkeypatch):
    """The per-call Python work of a step is a dict lookup: the checks and the plan run once per
    layout of the gradient lists (shapes, dtypes, devices, which gradients are None), and a new
    layout gets its own plan; a stale plan (e.g. keyed on the list length only) would pair a None
    gradient with a plan that expects a tensor and give a wrong or missing update."""
    import genrep_fast.alignment as alignment

    torch.manual_seed(0)
    model = Net()
    params = list(model.parameters())
    aligner = GradientAligner(model, groups="global")
    calls = []
    real_validate = alignment.validate_gradients
    monkeypatch.setattr(
        alignment, "validate_gradients", lambda p, g: calls.append(1) or real_validate(p, g)
    )
    x = torch.randn(16, 4)

    def step(uses_head_g: bool):
        model.zero_grad(set_to_none=True)
        zp, zg = model(x)
        lp = zp.pow(2).mean()
        lg = (zg - 1).pow(2).mean() if uses_head_g else zp.sum() * 0.01
        gp = torch.autograd.grad(lp, params, retain_graph=True, allow_unused=True)
        gg = torch.autograd.grad(lg, params, retain_graph=True, allow_unused=True)
        want = reference.align_gradients(list(gp), list(gg), groups="global")
        aligner.backward(lp, lg)
        for p, w in zip(params, want):
            if w is None:
                assert p.grad is None
            else:
                torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-7)

    for _ in range(3):
        step(uses_head_g=True)
    assert len(calls) == 1  # checked once, then looked up
    step(uses_head_g=False)  # head_g gets no gradient at all: a new layout, a new plan
    assert len(calls) == 2
    step(uses_head_g=True)  # the first layout again: its plan is still cached
    assert len(calls) == 2
    model.double()  # same parameters, new dtype: a new layout
    x = x.double()
    step(uses_head_g=True)
    assert len(calls) == 3
