"""The Triton backward of mixture_log_likelihood (through TRITON_INTERPRET=1 on CPU) against the
float64 reference's autograd gradients.

Tolerance idiom (flash-attention): the kernel's gradient error against float64 is at most ~2x the
error of torch's autograd through the same math in float32 (the reference run on the float32
inputs), plus a floor of 4 fp32 eps of the largest gradient. Measured over CASES with 6 seeds
(T=75 case left out), in units of eps * max|grad|: kernel max error 6.8 (x), 20.8 (mu), 20.1
(sigma); torch 12.6, 17.5, 35.6; the excess ``kernel - 2 * torch`` at most 0.5, so the floor of 4
leaves an 8x margin. (A single case's kernel/torch ratio reaches 3.3 where torch is lucky on it,
which is why a floor is needed.) Before the backward recomputed its own LSE (it used the
forward's float32 one) the hard-regime test below measured 10% errors in dL/dmu.
"""

from __future__ import annotations

import pytest
import torch
from _mixture_cases import make_bank

import genrep_fast as G
from genrep_fast import reference as R
from genrep_fast.kernels import mixture_backward as MB
from genrep_fast.posterior import _mixture_ll_op

F64 = torch.float64
NAMES = ("x", "mu", "sigma")


def reference_grads(x, mu, sigma, ci, grad):
    """Autograd gradients of ``sum(grad * ll)`` through the reference, in x's dtype's compute."""
    xs = [a.detach().clone().requires_grad_() for a in (x, mu, sigma)]
    R.mixture_log_likelihood(*xs, class_index=ci).backward(grad.to(R.compute_dtype(x.dtype)))
    return [a.grad for a in xs]


def kernel_grads(x, mu, sigma, ci, grad, needs=(True, True, True)):
    return MB.mixture_lse_backward(grad, x, mu, sigma, ci, needs)


def _floor(ref: torch.Tensor) -> float:
    return 4 * torch.finfo(torch.float32).eps * ref.abs().max().item() + 1e-30


CASES = [
    # (B, C, T, latent, per_image, sigma kind, candidates)
    (1, 1, 1, (1,), False, "t", None),
    (3, 7, 75, (5,), False, "c_t", None),
    (2, 3, 4, (1,), False, "c_t", None),
    (2, 3, 37, (5, 3), False, "diag", None),
    (3, 5, 4, (33,), False, "t", [[0, 4, 0], [2, 2, 1], [4, 0, 3]]),
    (3, 4, 3, (2, 5), False, "diag", [[1, 3], [3, 3], [0, 1]]),
    (2, 1, 75, (7,), True, "b_c_t", None),
    (3, 7, 2, (6,), True, "t", None),
    (2, 3, 5, (4,), True, "c_t", [[2, 0, 2], [1, 1, 1]]),
    (2, 3, 5, (4,), True, "diag", [[2, 0, 2], [1, 1, 0]]),
    (2, 2, 3, (3,), True, "diag", None),
]


def _case_id(case):
    b, c, t, latent, per_image, kind, cand = case
    return f"B{b}C{c}T{t}L{latent}-{'img' if per_image else 'shared'}-{kind}-{'cand' if cand else 'all'}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_backward_matches_f64(case):
    b, c, t, latent, per_image, kind, cand = case
    x, mu, sigma = make_bank(b, c, t, latent, per_image=per_image, sigma_kind=kind)
    ci = None if cand is None else torch.tensor(cand)
    k = c if ci is None else ci.shape[1]
    grad = torch.randn(b, k, generator=torch.Generator().manual_seed(2))
    want = reference_grads(x.double(), mu.double(), sigma.double(), ci, grad.double())
    torch32 = reference_grads(x, mu, sigma, ci, grad)
    got = kernel_grads(x, mu, sigma, ci, grad)
    for name, g_, t_, w_ in zip(NAMES, got, torch32, want):
        assert g_.dtype == torch.float32 and g_.shape == w_.shape, name
        err = (g_.double() - w_).abs().max().item()
        torch_err = (t_.double() - w_).abs().max().item()
        assert err <= 2 * torch_err + _floor(w_), (name, err, torch_err)


@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, False), (False, False, True)]
)
@pytest.mark.parametrize("per_image", [False, True])
def test_only_the_requested_gradients(needs, per_image):
    x, mu, sigma = make_bank(2, 3, 4, (5,), per_image=per_image, sigma_kind="c_t")
    grad = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    all_three = kernel_grads(x, mu, sigma, None, grad)
    some = kernel_grads(x, mu, sigma, None, grad, needs)
    for need, a, s in zip(needs, all_three, some):
        if need:
            torch.testing.assert_close(s, a, rtol=0, atol=0)
        else:
            assert s is None


def test_float64_inputs_accumulate_in_float64():
    x, mu, sigma = make_bank(3, 4, 6, (9,), sigma_kind="diag")
    x, mu, sigma = x.double(), mu.double(), sigma.double()
    ci = torch.tensor([[0, 3], [2, 2], [1, 0]])
    grad = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    want = reference_grads(x, mu, sigma, ci, grad)
    got = kernel_grads(x, mu, sigma, ci, grad)
    for name, g_, w_ in zip(NAMES, got, want):
        assert g_.dtype == F64, name
        torch.testing.assert_close(g_, w_, rtol=1e-11, atol=1e-11, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_gradients_in_input_dtype(dtype):
    x, mu, sigma = make_bank(3, 2, 5, (8,), per_image=True, sigma_kind="t")
    x, mu, sigma = x.to(dtype), mu.to(dtype), sigma.to(dtype)
    grad = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))
    want = reference_grads(x.double(), mu.double(), sigma.double(), None, grad.double())
    got = kernel_grads(x, mu, sigma, None, grad)
    for name, g_, w_ in zip(NAMES, got, want):
        assert g_.dtype == dtype, name
        # fp32 accumulation, then one rounding to the input dtype (2^-8 relative for bf16).
        tol = 2 * torch.finfo(dtype).eps * w_.abs().max().item()
        assert (g_.double() - w_).abs().max().item() <= tol, name


def test_hard_regime_x_on_a_mean_small_sigma_one_class_dominating():
    # x on mu[c, t] with sigma = 1e-2 (D = 64): log-densities ~ +200 on the true class and ~ -6e5
    # on the others; the gradient flows through one (class, step) and is exactly 0 in x there.
    x0, mu, _ = make_bank(3, 4, 6, (64,))
    cls, steps = torch.tensor([0, 2, 3]), torch.tensor([5, 1, 0])
    x = mu[cls, steps] + 1e-3 * torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    sigma = torch.full((4, 6), 1e-2)
    grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    want = reference_grads(x.double(), mu.double(), sigma.double(), None, grad.double())
    torch32 = reference_grads(x, mu, sigma, None, grad)
    got = kernel_grads(x, mu, sigma, None, grad)
    for name, g_, t_, w_ in zip(NAMES, got, torch32, want):
        assert torch.isfinite(g_).all(), name
        err = (g_.double() - w_).abs().max().item()
        torch_err = (t_.double() - w_).abs().max().item()
        assert err <= 2 * torch_err + _floor(w_), (name, err, torch_err)


def test_all_classes_tied():
    x, mu, sigma = make_bank(2, 1, 5, (16,))
    mu = mu.expand(4, -1, -1).contiguous()
    sigma = sigma.expand(4, -1).contiguous()
    grad = torch.ones(2, 4)
    gx, gmu, gsig = kernel_grads(x, mu, sigma, None, grad)
    # Every class sees the same scores: equal gradients per class, and the x gradient is 4x one
    # class's.
    for c in range(1, 4):
        torch.testing.assert_close(gmu[c], gmu[0], rtol=0, atol=0)
        torch.testing.assert_close(gsig[c], gsig[0], rtol=0, atol=0)
    one = kernel_grads(x, mu[:1], sigma[:1], None, grad[:, :1])[0]
    torch.testing.assert_close(gx, 4 * one, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("precision", ["tf32x3", "tf32", "bf16"])
def test_gemm_modes_backward_recomputes_the_exact_lse(precision):
    # Near a mean with sigma = 1e-2 the GEMM-form LSE is off by nats to thousands of nats
    # (docs/NUMERICS.md). Weights exp(s - lse) built on it would be off by that factor; the
    # backward recomputes the LSE in the difference form, so its gradients match "ieee"'s.
    x0, mu, _ = make_bank(3, 3, 5, (32,))
    x = mu[torch.tensor([0, 1, 2]), torch.tensor([4, 0, 2])] + 1e-2 * torch.randn(
        3, 32, generator=torch.Generator().manual_seed(6)
    )
    sigma = torch.full((3, 5), 1e-2)

    def grads(prec):
        xs = x.clone().requires_grad_()
        ms = mu.clone().requires_grad_()
        ll = G.mixture_log_likelihood(xs, ms, sigma, precision=prec, backend="triton")
        ll.sum().backward()
        return ll.detach(), xs.grad, ms.grad

    ll_fast, gx_fast, gmu_fast = grads(precision)
    ll_ieee, gx, gmu = grads("ieee")
    assert (ll_fast - ll_ieee).abs().max() > 1e-2  # the forward really is the inexact GEMM form
    torch.testing.assert_close(gx_fast, gx, rtol=0, atol=0)
    torch.testing.assert_close(gmu_fast, gmu, rtol=0, atol=0)


def test_public_api_triton_backward_uses_the_kernels(monkeypatch):
    x, mu, sigma = make_bank(2, 3, 4, (5,), sigma_kind="diag")
    calls = []
    real = MB.mixture_lse_backward
    monkeypatch.setattr(
        MB, "mixture_lse_backward", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    xs, ms, ss = (a.clone().requires_grad_() for a in (x, mu, sigma))
    G.mixture_log_likelihood(xs, ms, ss, backend="triton").sum().backward()
    assert calls
    want = reference_grads(
        x.double(), mu.double(), sigma.double(), None, torch.ones(2, 3, dtype=F64)
    )
    for name, a, w_ in zip(NAMES, (xs, ms, ss), want):
        torch.testing.assert_close(a.grad.double(), w_, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("layout", [(False, "c_t", False), (True, "diag", True)])
def test_opcheck_triton(layout):
    per_image, kind, cand = layout
    x, mu, sigma = make_bank(3, 4, 5, (2, 3), per_image=per_image, sigma_kind=kind)
    ci = torch.tensor([[0, 3], [2, 2], [1, 0]]) if cand else None
    for a in (x, mu, sigma):
        a.requires_grad_()
    torch.library.opcheck(_mixture_ll_op, (x, mu, sigma, ci, "ieee", "triton", []))


@pytest.mark.gpu
def test_gpu_backward_deterministic_and_matches_torch_path():
    # On a GPU the programs run concurrently: the shared-bank gradients must still be bitwise
    # reproducible (no float atomics), and match the float64 reference.
    dev = "cuda"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1024, generator=g)
    mu = torch.randn(10, 75, 1024, generator=g)
    sigma = 0.5 + torch.rand(10, 75, generator=g)
    ci = torch.randint(0, 10, (64, 4), generator=g)
    grad = torch.randn(64, 10, generator=g)
    for idx, gr in ((None, grad), (ci, grad[:, :4])):
        runs = []
        for _ in range(3):
            ins = [a.to(dev).requires_grad_() for a in (x, mu, sigma)]
            ll = G.mixture_log_likelihood(*ins, class_index=None if idx is None else idx.to(dev))
            ll.backward(gr.to(dev))
            runs.append([a.grad.cpu() for a in ins])
        for r in runs[1:]:
            for a, b in zip(r, runs[0]):
                assert torch.equal(a, b)
        # Judged as the interpreter tests judge the Triton kernels (test_backward_matches_f64):
        # within twice the float32 reference's own error. A fixed 1e-4 is below that error here
        # (log-densities thousands of nats apart): the float32 reference is off by 5.7e-4 in x's
        # gradient and 4e-2 in sigma's (CPU); the H100 kernel by 3.3e-4 in x's; the C++ kernels,
        # which accumulate in float64, by 4.8e-7 (bench/results/gpu-h100-20261126).
        want_grads = reference_grads(x.double(), mu.double(), sigma.double(), idx, gr.double())
        torch32 = reference_grads(x, mu, sigma, idx, gr)
        for name, a, t_, w_ in zip(NAMES, runs[0], torch32, want_grads):
            err = (a.double() - w_).abs().max().item()
            torch_err = (t_.double() - w_).abs().max().item()
            print(
                f"{name} candidates={idx is not None}: err {err:.3g}, float32 ref {torch_err:.3g}"
            )
            assert err <= 2 * torch_err + _floor(w_), (name, idx is not None, err, torch_err)


@pytest.mark.parametrize("kind", ["c_t", "diag"])
def test_bank_kernel_splits_of_the_batch(monkeypatch, kind):
    # With BLOCK_B = 2 a batch of 7 runs as 4 splits per class, each with its own partial slice,
    # summed afterwards; the result must not depend on the split.
    x, mu, sigma = make_bank(7, 3, 5, (6,), sigma_kind=kind)
    grad = torch.randn(7, 3, generator=torch.Generator().manual_seed(2))
    whole = kernel_grads(x, mu, sigma, None, grad)
    monkeypatch.setattr(MB, "BANK_CONFIGS", ({**MB.BANK_CONFIGS[0], "BLOCK_B": 2},))
    split = kernel_grads(x, mu, sigma, None, grad)
    want = reference_grads(x.double(), mu.double(), sigma.double(), None, grad.double())
    for name, s_, a_, w_ in zip(NAMES, split, whole, want):
        torch.testing.assert_close(s_, a_, rtol=1e-5, atol=1e-5, msg=name)
        assert (s_.double() - w_).abs().max().item() <= 64 * _floor(w_), name
