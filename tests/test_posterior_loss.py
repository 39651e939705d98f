"""The fused posterior / KL kernels (through TRITON_INTERPRET=1 on CPU) against the reference.

Tolerance idiom: the kernel's error against the float64 reference is at most 2x that of the
reference run in float32 on the same inputs, plus a floor of 4 fp32 eps of the largest value.
"""

from __future__ import annotations

import pytest
import torch

import genrep_fast as G
from genrep_fast import reference as R
from genrep_fast.kernels import posterior_loss as PL
from genrep_fast.posterior import _class_posterior_op, _posterior_kl_op

F64 = torch.float64
EPS32 = torch.finfo(torch.float32).eps


def make_rows(b, c, *, scale=50.0, prior=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ll = torch.randn(b, c, generator=g) * scale
    logits = torch.randn(b, c, generator=g) * 3
    lp = None
    if prior == "c":
        lp = torch.log_softmax(torch.randn(c, generator=g), -1)
    elif prior == "bc":
        lp = torch.log_softmax(torch.randn(b, c, generator=g), -1)
    return ll, logits, lp


def _check(got, f32, want):
    err = (got.double() - want).abs().max().item()
    ref_err = (f32.double() - want).abs().max().item()
    floor = 4 * EPS32 * max(1.0, want.abs().max().item())
    assert err <= 2 * ref_err + floor, (err, ref_err)


CASES = [(1, 1, None), (3, 7, "c"), (5, 1000, "bc"), (2, 2500, "c"), (4, 10, None)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}C{c[1]}-{c[2]}")
def test_forward_kernel_matches_reference(case):
    b, c, prior = case
    ll, logits, lp = make_rows(b, c, prior=prior)
    p, kl, stats = PL.posterior_forward(ll, lp, logits, store_posterior=True)
    lp64 = None if lp is None else lp.double()
    _check(p, R.class_posterior(ll, lp), R.class_posterior(ll.double(), lp64))
    _check(
        kl,
        R.posterior_kl_loss(logits, ll, lp, "none"),
        R.posterior_kl_loss(logits.double(), ll.double(), lp64, "none"),
    )
    assert p.dtype == kl.dtype == torch.float32 and stats.shape == (b, 4)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}C{c[1]}-{c[2]}")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_public_triton_loss_and_logit_gradient(case, reduction):
    b, c, prior = case
    ll, logits, lp = make_rows(b, c, prior=prior)
    lp64 = None if lp is None else lp.double()
    gz = logits.clone().requires_grad_()
    lls = ll.clone().requires_grad_()
    loss = G.posterior_kl_loss(gz, lls, lp, reduction, backend="triton")
    weight = torch.randn(loss.shape, generator=torch.Generator().manual_seed(3))
    (loss * weight).sum().backward()
    assert lls.grad is None  # the teacher is detached
    z64 = logits.double().requires_grad_()
    want = R.posterior_kl_loss(z64, ll.double(), lp64, reduction)
    (want * weight.double()).sum().backward()
    z32 = logits.clone().requires_grad_()
    f32 = R.posterior_kl_loss(z32, ll, lp, reduction)
    (f32 * weight).sum().backward()
    _check(loss.detach(), f32.detach(), want.detach())
    assert gz.grad.dtype == torch.float32
    _check(gz.grad, z32.grad, z64.grad)


def test_log_likelihoods_around_minus_1e7_one_class_dominating_and_ties():
    # Row 0: -1e7-scale scores, one class 40 nats above the rest (p ~ 1, others ~ e^-40).
    # Row 1: all classes tied (p uniform). Row 2: a class 1e6 nats below (p = 0 exactly).
    ll = torch.full((3, 6), -1.0e7)
    ll[0] += torch.tensor([0.0, -40.0, -45.0, -50.0, -41.0, -60.0])
    ll[2, 3] -= 1e6
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    p, kl, _ = PL.posterior_forward(ll, None, logits, store_posterior=True)
    want_p = R.class_posterior(ll.double())
    want_kl = R.posterior_kl_loss(logits.double(), ll.double(), None, "none")
    # The float32 input is exact; the scores differ by exact small integers, so p is exact up to
    # the exp: a float32 LSE (ulp(1e7) = 1 nat) would be off by a factor of up to e^0.5 here.
    torch.testing.assert_close(p.double(), want_p, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(kl.double(), want_kl, rtol=1e-6, atol=1e-6)
    assert p[2, 3].item() == 0.0 and torch.isfinite(kl).all()
    torch.testing.assert_close(p[1], torch.full((6,), 1 / 6), rtol=1e-6, atol=0)


def test_float64_rows():
    ll, logits, lp = make_rows(3, 9, prior="c")
    ll, logits, lp = ll.double(), logits.double(), lp.double()
    p, kl, _ = PL.posterior_forward(ll, lp, logits, store_posterior=True)
    assert p.dtype == kl.dtype == F64
    torch.testing.assert_close(p, R.class_posterior(ll, lp), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        kl, R.posterior_kl_loss(logits, ll, lp, "none"), rtol=1e-11, atol=1e-12
    )


def test_class_posterior_triton_with_gradient():
    ll, _, lp = make_rows(4, 7, prior="c")
    a = ll.clone().requires_grad_()
    pa = lp.clone().requires_grad_()
    got = G.class_posterior(a, pa, backend="triton")
    w = torch.randn(4, 7, generator=torch.Generator().manual_seed(4))
    (got * w).sum().backward()
    b64 = ll.double().requires_grad_()
    p64 = lp.double().requires_grad_()
    want = R.class_posterior(b64, p64)
    (want * w.double()).sum().backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a.grad.double(), b64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pa.grad.double(), p64.grad, rtol=1e-4, atol=1e-6)


def test_candidate_classes_triton():
    ll, logits, _ = make_rows(3, 2)
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(5))
    ci = torch.tensor([[4, 9], [0, 4], [7, 7]])
    z = logits.clone().requires_grad_()
    got = G.posterior_kl_loss(z, ll, class_index=ci, backend="triton")
    got.backward()
    z64 = logits.double().requires_grad_()
    want = R.posterior_kl_loss(z64, ll.double(), class_index=ci)
    want.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad.double(), z64.grad, rtol=1e-5, atol=1e-6)


def test_opcheck_and_compile():
    ll, logits, lp = make_rows(3, 5, prior="c")
    torch.library.opcheck(_posterior_kl_op, (logits.clone().requires_grad_(), ll, lp))
    torch.library.opcheck(_class_posterior_op, (ll.clone().requires_grad_(), None))

    def loss_fn(z, ll):
        return (
            G.posterior_kl_loss(z, ll, backend="triton")
            + G.class_posterior(ll, backend="triton").amax(-1).sum()
        )

    z = logits.clone().requires_grad_()
    got = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(z, ll)
    got.backward()
    z2 = logits.clone().requires_grad_()
    want = loss_fn(z2, ll)
    want.backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(z.grad, z2.grad)


def test_bad_backend_and_triton_on_cpu_without_interpreter(monkeypatch):
    ll, logits, _ = make_rows(2, 3)
    with pytest.raises(ValueError, match="backend"):
        G.posterior_kl_loss(logits, ll, backend="cuda")
    with pytest.raises(ValueError, match="backend"):
        G.class_posterior(ll, backend="fast")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="triton"):
        G.class_posterior(ll, backend="triton")


@pytest.mark.gpu
def test_gpu_auto_uses_the_kernels_and_matches(monkeypatch):
    calls = []
    real = PL.posterior_forward
    monkeypatch.setattr(PL, "posterior_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    ll, logits, lp = make_rows(256, 1000, prior="c")
    z = logits.cuda().requires_grad_()
    got = G.posterior_kl_loss(z, ll.cuda(), lp.cuda())
    got.backward()
    assert calls
    z64 = logits.double().requires_grad_()
    want = R.posterior_kl_loss(z64, ll.double(), lp.double())
    want.backward()
    torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad.double().cpu(), z64.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_gpu_kl_step_replays_from_a_cuda_graph():
    """The fused forward + backward (the Triton path) captured once and replayed on new values in
    the captured tensors gives the float64 loss and gradient of those new values: no host sync
    inside the op (capture would raise) and nothing computed once at capture time and reused.
    The benchmark's graph-replayed KL case (``kl_loss_fwd_bwd_graph``) times this step."""
    from genrep_fast.benchmarking import cuda_graph

    ll, logits, lp = make_rows(64, 100, prior="c")
    z = logits.cuda().requires_grad_()
    ll_c, lp_c = ll.cuda(), lp.cuda()
    out = {}

    def step():
        loss = G.posterior_kl_loss(z, ll_c, lp_c)
        (out["grad"],) = torch.autograd.grad(loss, z)
        out["loss"] = loss

    replay = cuda_graph(step, device="cuda")
    ll2, logits2, lp2 = make_rows(64, 100, prior="c", seed=1)
    with torch.no_grad():
        z.copy_(logits2.cuda())
        ll_c.copy_(ll2.cuda())
        lp_c.copy_(lp2.cuda())
    replay()
    torch.cuda.synchronize()
    z64 = logits2.double().requires_grad_()
    want = R.posterior_kl_loss(z64, ll2.double(), lp2.double())
    want.backward()
    torch.testing.assert_close(out["loss"].double().cpu(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["grad"].double().cpu(), z64.grad, rtol=1e-5, atol=1e-7)


def test_cuda_graph_needs_a_cuda_device():
    from genrep_fast.benchmarking import cuda_graph

    with pytest.raises(ValueError, match="device: CUDA graph capture needs a CUDA device, got cpu"):
        cuda_graph(lambda: None, device="cpu")


def test_kl_validate_false_skips_the_class_index_range_check():
    """``validate=False`` (the trainer's step): no range check of class_index (a host sync); the
    default keeps it."""
    logits = torch.randn(2, 5)
    ll = torch.randn(2, 3)
    idx = torch.tensor([[0, 1, 9], [2, 3, 4]])
    with pytest.raises(ValueError, match="class_index values must lie in"):
        G.posterior_kl_loss(logits, ll, class_index=idx, backend="torch")
    good = torch.tensor([[0, 1, 2], [2, 3, 4]])
    ref = G.posterior_kl_loss(logits, ll, class_index=good, backend="torch")
    out = G.posterior_kl_loss(logits, ll, class_index=good, backend="torch", validate=False)
    torch.testing.assert_close(out, ref)
    with pytest.raises(TypeError, match="int64 or int32"):  # dtype still checked
        G.posterior_kl_loss(logits, ll, class_index=good.float(), validate=False)
