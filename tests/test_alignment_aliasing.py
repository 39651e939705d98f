"""``out`` that shares memory with the gradients: the update is exact whatever the aliasing (the
same tensor for two parameters, outputs swapped, shifted views), or a ValueError names the two
positions when two outputs would have to hold different updates. Every backend: the compiled ops,
the torch two-pass fallback (``reduce_sums`` without the ops) and the eager reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from genrep_fast import _ops, reference
from genrep_fast.alignment import GradientAligner, align_gradients


def _identity(sums):
    return sums


# (backend, reduce_sums): the ops, the torch fallback of the two passes, the reference.
PATHS = [
    pytest.param(
        "ops",
        None,
        id="ops",
        marks=pytest.mark.skipif(not _ops.HAS_EXTENSION, reason="genrep_fast._C is not built"),
    ),
    pytest.param("reference", _identity, id="torch-two-pass"),
    pytest.param("reference", None, id="reference"),
]


def shared_parameter_gradients(seed=0):
    """Autograd's own aliasing: for ``w + v`` it returns one tensor object as both gradients."""
    torch.manual_seed(seed)
    w = torch.randn(6, 5, requires_grad=True)
    v = torch.randn(6, 5, requires_grad=True)
    u = torch.randn(7, requires_grad=True)
    s = w + v
    loss_p = (s**2).sum() + (u**3).sum()
    loss_g = s.sin().sum() + (u * 2).cos().sum()
    gp = list(torch.autograd.grad(loss_p, [w, v, u], retain_graph=True))
    gg = list(torch.autograd.grad(loss_g, [w, v, u]))
    assert gp[0] is gp[1] and gg[0] is gg[1]
    return gp, gg


def expected(gp, gg, groups):
    """The reference on private copies (nothing shared, nothing written in place)."""
    return reference.align_gradients(
        [t.clone() for t in gp], [t.clone() for t in gg], groups=groups
    )


def assert_updates(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("backend", "reduce_sums"), PATHS)
@pytest.mark.parametrize("groups", ["global", None, [[0, 2], [1]]])
def test_out_is_the_gradient_list_with_one_tensor_for_two_parameters(backend, reduce_sums, groups):
    gp, gg = shared_parameter_gradients()
    want = expected(gp, gg, groups)
    kw = dict(groups=groups, backend=backend, reduce_sums=reduce_sums)
    if groups == [[0, 2], [1]] or (groups is None and reduce_sums is not None):
        # Positions 0 and 1 share out and inputs but sit in different groups (whose sums
        # reduce_sums may change apart): two updates cannot live in one tensor.
        with pytest.raises(ValueError, match=r"out\[0\] and out\[1\]"):
            align_gradients(gp, gg, out=gp, **kw)
        return
    got = align_gradients(gp, gg, out=gp, **kw)
    assert got[0] is gp[0] and got[2] is gp[2]
    assert_updates(got, want)
    gp, gg = shared_parameter_gradients()
    got = align_gradients(gp, gg, out=gg, **kw)  # into the other list
    assert_updates(got, want)


@pytest.mark.parametrize(("backend", "reduce_sums"), PATHS)
def test_out_swapped(backend, reduce_sums):
    torch.manual_seed(1)
    ps = [torch.randn(9), torch.randn(9)]
    gs = [torch.randn(9), torch.randn(9)]
    want = expected(ps, gs, "global")
    out = [ps[1], ps[0]]
    got = align_gradients(
        ps, gs, groups="global", out=out, backend=backend, reduce_sums=reduce_sums
    )
    assert got[0] is out[0] and got[1] is out[1]
    assert_updates(got, want)
    # out[i] = g of the other position
    torch.manual_seed(1)
    ps = [torch.randn(9), torch.randn(9)]
    gs = [torch.randn(9), torch.randn(9)]
    want = expected(ps, gs, None)
    got = align_gradients(ps, gs, out=[gs[1], gs[0]], backend=backend, reduce_sums=reduce_sums)
    assert_updates(got, want)


@pytest.mark.parametrize(("backend", "reduce_sums"), PATHS)
def test_out_shifted_by_one_element(backend, reduce_sums):
    torch.manual_seed(2)
    buf = torch.randn(41)
    ps = [buf[:20], buf[20:40]]
    gs = [torch.randn(20), torch.randn(20)]
    want = expected(ps, gs, "global")
    out = [buf[1:21], buf[21:41]]
    got = align_gradients(
        ps, gs, groups="global", out=out, backend=backend, reduce_sums=reduce_sums
    )
    assert_updates(got, want)
    # a strided output overlapping its own input without being the same view
    torch.manual_seed(2)
    m = torch.randn(8, 8)
    ps, gs = [m], [torch.randn(8, 8)]
    want = expected(ps, gs, None)
    got = align_gradients(ps, gs, out=[m.t()], backend=backend, reduce_sums=reduce_sums)
    assert_updates(got, want)


@pytest.mark.parametrize(("backend", "reduce_sums"), PATHS)
def test_outputs_sharing_memory_with_different_updates_raise(backend, reduce_sums):
    ps = [torch.randn(5), torch.randn(5), torch.randn(5)]
    gs = [torch.randn(5), torch.randn(5), torch.randn(5)]
    buf = torch.zeros(5)
    kw = dict(backend=backend, reduce_sums=reduce_sums)
    with pytest.raises(ValueError, match=r"out\[0\] and out\[2\]"):
        align_gradients(ps, gs, out=[buf, torch.zeros(5), buf], **kw)
    flat = torch.zeros(9)
    with pytest.raises(ValueError, match=r"out\[1\] and out\[2\]"):
        align_gradients(ps, gs, out=[torch.zeros(5), flat[:5], flat[4:]], **kw)
    assert torch.equal(buf, torch.zeros(5)) and torch.equal(flat, torch.zeros(9))
    # Disjoint slices of one buffer are fine.
    flat = torch.zeros(15)
    got = align_gradients(ps, gs, out=[flat[:5], flat[5:10], flat[10:]], **kw)
    assert_updates(got, expected(ps, gs, None))


def test_in_place_update_needs_no_copy():
    ps = [torch.randn(6), torch.randn(3)]
    gs = [torch.randn(6), torch.randn(3)]
    want = expected(ps, gs, None)
    ptrs = [t.data_ptr() for t in ps]
    got = align_gradients(ps, gs, out=ps)
    assert [t.data_ptr() for t in got] == ptrs
    assert_updates(got, want)


class Tied(nn.Module):
    """Two parameters always used as their sum: autograd hands one gradient object to both."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.v = nn.Parameter(torch.randn(4, 3))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(x @ (self.w + self.v))


@pytest.mark.parametrize("groups", ["global", "per_tensor"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_aligner_with_shared_gradient_objects(groups, backend):
    torch.manual_seed(3)
    model = Tied()
    x = torch.randn(2, 4)

    def losses():
        z = model(x)
        return z.pow(2).mean(), (z - 1).abs().mean()

    params = list(model.parameters())
    lp, lg = losses()
    gp = list(torch.autograd.grad(lp, params, retain_graph=True))
    gg = list(torch.autograd.grad(lg, params))
    assert gp[0] is gp[1]
    want = expected(gp, gg, None if groups == "per_tensor" else groups)
    aligner = GradientAligner(model, groups=groups, backend=backend)
    aligner.backward(*losses())
    for p, u in zip(params, want):
        torch.testing.assert_close(p.grad, u, rtol=1e-6, atol=1e-6)
