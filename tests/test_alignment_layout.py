"""The native bookkeeping of a GradientAligner step (``torch.ops.genrep_fast.grad_layout``,
csrc/grad_layout.cpp) against its Python twin (``alignment._writable_outputs`` and the tuple key of
``GradientAligner._plan``): the same output choice for every aliasing case autograd can produce,
and a layout key that separates exactly what the plan depends on."""

from __future__ import annotations

import pytest
import torch

from genrep_fast import _ops
from genrep_fast.alignment import GradientAligner, _native_layout, _writable_outputs

pytestmark = pytest.mark.skipif(
    not _ops.HAS_GRAD_LAYOUT, reason="genrep_fast._C built without grad_layout"
)


def _cases():
    base = torch.randn(10, 4)
    shared = torch.randn(5)
    whole = torch.randn(6)
    return {
        "plain": ([torch.randn(3), torch.randn(2, 2)], [torch.randn(3), torch.randn(2, 2)]),
        "missing": ([None, torch.randn(4), None], [torch.randn(2), None, None]),
        # autograd hands one tensor to two parameters (w + v): neither may take the update
        "same tensor twice": ([shared, shared], [torch.randn(5), torch.randn(5)]),
        # an expanded (stride-0) gradient, as for w.sum(): not contiguous
        "expanded": ([torch.ones(1).expand(6)], [torch.randn(6)]),
        # two views of one storage: each covers only part of it
        "views": ([base[:5], base[5:]], [torch.randn(5, 4), torch.randn(5, 4)]),
        # p[0] and g[1] are one tensor: storage shared across positions
        "crossed": ([whole, torch.randn(6)], [torch.randn(6), whole]),
        "non-contiguous": ([torch.randn(4, 3).t()], [torch.randn(3, 4).t().contiguous().t()]),
        "empty": ([torch.empty(0), torch.empty(0)], [torch.empty(0), torch.empty(0)]),
        "p and g one tensor": ([whole], [whole]),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_native_choice_matches_python(name):
    ps, gs = _cases()[name]
    key, choice = _native_layout(ps, gs)
    want = _writable_outputs(ps, gs)
    for i, (p, g, w) in enumerate(zip(ps, gs, want)):
        if w is None:
            assert choice[i] == -2, (name, i)
        elif w is p:
            assert choice[i] == 0, (name, i)
        elif g is not None and w is g:
            assert choice[i] == 1, (name, i)
        else:  # a fresh buffer
            assert choice[i] == -1, (name, i, choice)
    assert isinstance(key, str)


def test_key_separates_what_the_plan_reads():
    p = [torch.randn(3, 4), None]
    g = [torch.randn(3, 4), torch.randn(2)]
    key = _native_layout(p, g)[0]
    same = _native_layout([torch.zeros(3, 4), None], [torch.ones(3, 4), torch.ones(2)])[0]
    assert key == same  # values and addresses play no part
    others = [
        ([torch.randn(4, 3), None], g),  # shape
        ([torch.randn(12), None], g),  # same numel, other rank
        ([torch.randn(3, 4, dtype=torch.float64), None], g),  # dtype
        ([torch.randn(3, 4), torch.randn(2)], g),  # a gradient present where it was missing
        (p, [torch.randn(3, 4), None]),
    ]
    for op, og in others:
        assert _native_layout(op, og)[0] != key
    # No kernel for meta tensors (nor for lists with no tensor at all): the Python path runs.
    assert _native_layout([torch.randn(3, 4, device="meta"), None], [None, None]) is None
    assert _native_layout([None], [None]) is None


@pytest.mark.gpu
def test_cuda_lists_get_the_same_choices_and_their_own_key():
    shared = torch.randn(5, device="cuda")
    ps = [shared, shared, torch.randn(3, device="cuda"), None]
    gs = [torch.randn(5, device="cuda"), torch.randn(5, device="cuda"), None, None]
    key, choice = _native_layout(ps, gs)
    want = _writable_outputs(ps, gs)
    assert choice == [1, 1, 0, -2] and want[0] is gs[0] and want[2] is ps[2]
    cpu_key, _ = _native_layout([t if t is None else t.cpu() for t in ps],
                                [t if t is None else t.cpu() for t in gs])  # fmt: skip
    assert cpu_key != key  # the device is part of the key


def test_aligner_falls_back_to_python_checks_on_bad_input():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    aligner = GradientAligner(params)
    assert _native_layout([torch.zeros(3)], [torch.zeros(3), torch.zeros(2)]) is None
    assert _native_layout([torch.zeros(3), "x"], [torch.zeros(3), torch.zeros(2)]) is None
    with pytest.raises((TypeError, ValueError), match="grads_p"):
        aligner.align([torch.zeros(3), "x"], [torch.zeros(3), torch.zeros(2)])


def test_aligner_update_written_where_the_native_pass_says():
    # End to end: the step writes into a gradient buffer only where it is the storage's sole
    # holder; a shared gradient is left as it was and the update goes to a fresh tensor.
    params = [torch.nn.Parameter(torch.zeros(5)) for _ in range(3)]
    aligner = GradientAligner(params, groups="global")
    shared = torch.randn(5)
    ps = [shared, shared, torch.randn(5)]
    gs = [torch.randn(5), torch.randn(5), torch.randn(5)]
    before = shared.clone()
    out = aligner.align(list(ps), list(gs))
    assert out[2] is ps[2] or out[2] is gs[2]
    assert out[0] is gs[0] and out[1] is gs[1]  # g is each position's own: it takes the update
    assert torch.equal(shared, before)
