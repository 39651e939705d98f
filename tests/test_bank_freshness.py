"""A bank is read as it is at each call; a PreparedBank is a snapshot; a dropped bank is freed.

Every route that changes a bank's values without (or around) its version counter - ``.data``, a
NumPy view, ``set_``, a DLPack view, a new tensor at a freed one's address, a bank made under
``torch.inference_mode()`` - must give the fresh answer on every backend: the reference, the torch
code (``backend="torch"``), the C++ kernels (``backend="cpp"``, candidate classes) and
the Triton kernels (interpreter on CPU), at ``precision="ieee"`` and at a GEMM precision.

Tolerance idiom of tests/test_mixture_triton.py: a result's error against the float64 reference is
at most 2x the error of torch computing the same form in fp32 (the difference form for the
reference / ieee / torch paths, and the GEMM form too for tf32x3, whose hi/lo split is near-fp32),
plus a floor of a few fp32 ulps of the result. A stale answer is nats off, far outside it.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import genrep_fast as G
from genrep_fast import mixture_torch
from genrep_fast import reference as R
from genrep_fast.models import ChainBank
from genrep_fast.posterior import _mixture_ll_op

B, C, T, LATENT = 3, 3, 4, (2, 5)  # tiny: the Triton interpreter is slow


def make_bank(seed=0, sigma_kind="c_t"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *LATENT, generator=g)
    mu = torch.randn(C, T, *LATENT, generator=g)
    # x near the bank's means, as in use: the answer depends strongly on mu.
    x = mu[torch.arange(B) % C, 0] + 0.3 * x
    shape = (C, T) if sigma_kind == "c_t" else tuple(mu.shape)
    sigma = 0.5 + torch.rand(shape, generator=g)
    return x, mu, sigma


CLASS_INDEX = torch.tensor([[0, 2], [1, 1], [2, 0]])

# (id, backend, class_index): every code path a shared bank can take on CPU.
PATHS = [
    ("reference", "reference", None),
    ("torch-gemm", "torch", None),  # float64 GEMM form (its bank copy was cached)
    ("torch-cand", "torch", CLASS_INDEX),  # GEMM form over the candidate classes
    ("cpp-cand", "cpp", CLASS_INDEX),  # C++ difference kernel
    ("triton", "triton", None),  # difference kernel (ieee) / GEMM kernel (tf32x3)
]
PRECISIONS = ["ieee", "tf32x3"]


@pytest.fixture
def path(request):
    pid, backend, ci = request.param
    return backend, ci


def _floor(want: torch.Tensor) -> float:
    return 4 * torch.finfo(torch.float32).eps * max(1.0, want.abs().max().item())


def _f32_gemm_form(x, mu, sigma):
    """The shared-bank GEMM form in torch fp32 (the yardstick of the tf32x3 kernel)."""
    x2 = x.reshape(x.shape[0], -1)
    mu2 = mu.reshape(C * T, -1)
    d = x2.shape[1]
    if sigma.shape == mu.shape:
        ivar = sigma.reshape(C * T, d).square().reciprocal()
        quad = x2.square() @ ivar.T - 2 * x2 @ (mu2 * ivar).T + (mu2.square() * ivar).sum(-1)
        s = -0.5 * quad.clamp_min(0) - torch.log(sigma.reshape(C * T, d)).sum(-1)
    else:
        sig = sigma.reshape(C * T)
        quad = x2.square().sum(-1, keepdim=True) - 2 * x2 @ mu2.T + mu2.square().sum(-1)
        s = -0.5 * quad.clamp_min(0) / sig.square() - d * torch.log(sig)
    s = s - 0.5 * d * R.LOG_2PI
    return torch.logsumexp(s.reshape(-1, C, T), -1) - math.log(T)


def check_fresh(got, x, mu, sigma, ci, precision):
    """``got`` is the likelihood of ``(mu, sigma)`` as they read now, within the mode's error."""
    x, mu, sigma = (t.detach().clone() for t in (x, mu, sigma))  # normal fp32 tensors
    want = R.mixture_log_likelihood(x.double(), mu.double(), sigma.double(), class_index=ci)
    errs = [(R.mixture_log_likelihood(x, mu, sigma, class_index=ci).double() - want).abs().max()]
    if precision != "ieee" and ci is None:
        errs.append((_f32_gemm_form(x, mu, sigma).double() - want).abs().max())
    tol = 2 * max(e.item() for e in errs) + _floor(want)
    err = (got.detach().double() - want).abs().max().item()
    assert err <= tol, (err, tol)
    return want, tol


def ll(x, bank, sigma, ci, precision, backend):
    return G.mixture_log_likelihood(
        x, bank, sigma, class_index=ci, precision=precision, backend=backend
    )


# ------------------------------------------------------------------------------------------------
# Raw tensors: read as they are at each call
# ------------------------------------------------------------------------------------------------


def _via_data(mu, sigma):
    mu.data.add_(0.7)  # .data shares the storage, not the version counter
    return mu, sigma


def _via_numpy(mu, sigma):
    mu.numpy()[:] += 0.7
    return mu, sigma


def _via_set(mu, sigma):
    mu.set_(mu + 0.7)
    return mu, sigma


def _via_from_dlpack(mu, sigma):
    torch.from_dlpack(mu).add_(0.7)
    return mu, sigma


def _via_utils_dlpack(mu, sigma):
    torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(mu)).add_(0.7)
    return mu, sigma


def _sigma_via_data(mu, sigma):
    sigma.data.mul_(0.6)
    return mu, sigma


def _new_tensor_at_old_address(mu, sigma):
    # A new tensor over the same memory (same address, version 0): a bank re-read from the NumPy
    # buffer it lives in. (The CUDA caching allocator hands a freed block's address to the next
    # bank of the same size just as readily.)
    buf = mu.numpy()
    buf += 0.7
    return torch.from_numpy(buf), sigma


ROUTES = {
    "data": _via_data,
    "numpy": _via_numpy,
    "set_": _via_set,
    "from_dlpack": _via_from_dlpack,
    "utils_dlpack": _via_utils_dlpack,
    "sigma_data": _sigma_via_data,
    "same_address": _new_tensor_at_old_address,
}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("path", PATHS, ids=[p[0] for p in PATHS], indirect=True)
@pytest.mark.parametrize("route", ROUTES)
def test_changed_bank_gives_fresh_answer(route, path, precision):
    backend, ci = path
    x, mu, sigma = make_bank()
    first = ll(x, mu, sigma, ci, precision, backend)
    check_fresh(first, x, mu, sigma, ci, precision)
    mu, sigma = ROUTES[route](mu, sigma)
    want, tol = check_fresh(ll(x, mu, sigma, ci, precision, backend), x, mu, sigma, ci, precision)
    # The change moves the answer far outside the tolerance: a stale answer would fail above.
    assert (first.double() - want).abs().max().item() > 100 * tol


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("path", PATHS, ids=[p[0] for p in PATHS], indirect=True)
def test_inference_mode_bank(path, precision):
    backend, ci = path
    with torch.inference_mode():
        x, mu, sigma = make_bank()
        first = ll(x, mu, sigma, ci, precision, backend)
        check_fresh(first, x, mu, sigma, ci, precision)
        mu.add_(0.7)  # inference tensors have no version counter at all
        check_fresh(ll(x, mu, sigma, ci, precision, backend), x, mu, sigma, ci, precision)
    # Outside inference mode, the gradient with respect to x still works against that bank.
    xg = x.clone().requires_grad_()
    out = ll(xg, mu, sigma, ci, precision, backend)
    check_fresh(out, x, mu, sigma, ci, precision)
    out.sum().backward()
    x64 = x.clone().double().requires_grad_()
    R.mixture_log_likelihood(x64, mu.double(), sigma.double(), class_index=ci).sum().backward()
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# PreparedBank: a snapshot
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma_kind", ["c_t", "diag"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("path", PATHS, ids=[p[0] for p in PATHS], indirect=True)
def test_prepared_bank_matches_raw_and_is_a_snapshot(path, precision, sigma_kind):
    backend, ci = path
    x, mu, sigma = make_bank(sigma_kind=sigma_kind)
    mu0, sigma0 = mu.clone(), sigma.clone()
    bank = G.prepare_bank(mu, sigma)
    got = ll(x, bank, None, ci, precision, backend)
    assert torch.equal(got, ll(x, mu, sigma, ci, precision, backend))
    assert torch.equal(
        got, bank.log_likelihood(x, class_index=ci, precision=precision, backend=backend)
    )
    check_fresh(got, x, mu0, sigma0, ci, precision)
    # The caller's tensors change through every route: the snapshot does not.
    mu.add_(0.7)
    mu.data.add_(0.7)
    mu.numpy()[:] += 0.7
    torch.from_dlpack(sigma).mul_(0.6)
    assert torch.equal(ll(x, bank, None, ci, precision, backend), got)
    # Preparing again takes the bank as it is now.
    fresh = ll(x, G.prepare_bank(mu, sigma), None, ci, precision, backend)
    want, tol = check_fresh(fresh, x, mu, sigma, ci, precision)
    assert (got.double() - want).abs().max().item() > 100 * tol


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("path", PATHS, ids=[p[0] for p in PATHS], indirect=True)
def test_prepared_bank_x_gradient_and_no_bank_gradient(path, precision):
    backend, ci = path
    x, mu, sigma = make_bank()
    mu.requires_grad_()
    bank = G.prepare_bank(mu, sigma)
    assert not G.mixture_log_likelihood(x, bank, backend=backend).requires_grad
    xg = x.clone().requires_grad_()
    out = ll(xg, bank, None, ci, precision, backend)
    out.sum().backward()
    assert mu.grad is None  # the snapshot takes no gradient for the bank
    x_raw = x.clone().requires_grad_()
    ll(x_raw, mu.detach(), sigma, ci, precision, backend).sum().backward()
    assert torch.equal(xg.grad, x_raw.grad)
    x64 = x.clone().double().requires_grad_()
    R.mixture_log_likelihood(x64, mu.double(), sigma.double(), class_index=ci).sum().backward()
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)


def test_prepared_bank_made_under_inference_mode_takes_x_gradients():
    x, mu, sigma = make_bank()
    with torch.inference_mode():
        bank = G.prepare_bank(mu * 1.0, sigma * 1.0)
    xg = x.clone().requires_grad_()
    G.mixture_log_likelihood(xg, bank).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_prepared_bank_dtype_widens_once():
    x, mu, sigma = make_bank()
    bank = G.prepare_bank(mu.bfloat16(), sigma, dtype=torch.float32)
    assert bank.dtype == torch.float32
    want = G.mixture_log_likelihood(x, mu.bfloat16().float(), sigma)
    assert torch.equal(G.mixture_log_likelihood(x, bank), want)


def test_prepared_bank_bad_input():
    x, mu, sigma = make_bank()
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        G.prepare_bank(mu, -sigma)
    with pytest.raises(ValueError, match="sigma must be isotropic"):
        G.prepare_bank(mu, sigma[:, :2])
    with pytest.raises(ValueError, match="mu must have at least 3 dims"):
        G.prepare_bank(mu[0, 0], sigma)
    bank = G.prepare_bank(mu, sigma)
    with pytest.raises(TypeError, match="sigma must be None with a PreparedBank"):
        G.mixture_log_likelihood(x, bank, sigma)
    with pytest.raises(TypeError, match="sigma is required"):
        G.mixture_log_likelihood(x, mu)
    with pytest.raises(TypeError, match=r"prepare_bank\(mu, sigma, dtype=torch.float64\)"):
        G.mixture_log_likelihood(x.double(), bank)
    with pytest.raises(ValueError, match="latent"):
        G.mixture_log_likelihood(x.reshape(B, -1), bank)
    with pytest.raises(ValueError, match="class_index values"):
        G.mixture_log_likelihood(x, bank, class_index=CLASS_INDEX + 1)


def test_opcheck_with_prepared_operands():
    x, mu, sigma = make_bank()
    x = x.double().requires_grad_()
    ops = mixture_torch.gemm_bank(mu.double(), sigma.double())
    torch.library.opcheck(
        _mixture_ll_op, (x, mu.double(), sigma.double(), None, "ieee", "torch", list(ops))
    )


# ------------------------------------------------------------------------------------------------
# Nothing keeps a dropped bank alive
# ------------------------------------------------------------------------------------------------


def _bank_tensors_alive(d: int) -> list[tuple]:
    """Shapes of the live tensors whose last dim is ``d`` (a bank's rows; d is unique to the test)."""
    gc.collect()
    return [
        tuple(o.shape)
        for o in gc.get_objects()
        if issubclass(type(o), torch.Tensor) and o.dim() and o.shape[-1] == d
    ]


RUNS = [(b, p) for b in ("torch", "triton") for p in PRECISIONS] + [("reference", "ieee")]


@pytest.mark.parametrize("backend,precision", RUNS)
@pytest.mark.parametrize("prepared", [False, True], ids=["raw", "prepared"])
def test_dropped_bank_is_freed(backend, precision, prepared):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 37, generator=g, requires_grad=True)
    mu = torch.randn(C, T, 37, generator=g)
    sigma = 0.5 + torch.rand(C, T, generator=g)
    bank = G.prepare_bank(mu, sigma) if prepared else mu
    refs = [StorageWeakRef(mu.untyped_storage())]
    if prepared:
        refs.append(StorageWeakRef(bank._mu.untyped_storage()))
    out = ll(x, bank, None if prepared else sigma, None, precision, backend)
    out.sum().backward()
    del out, bank, mu, sigma
    x = x.detach()
    gc.collect()
    assert all(r.expired() for r in refs)
    # No copy of the bank (float64 copy, fp32 GEMM operands) survives either; x is [2, 37].
    assert [s for s in _bank_tensors_alive(37) if s != (2, 37)] == []


# ------------------------------------------------------------------------------------------------
# ChainBank
# ------------------------------------------------------------------------------------------------


def _chain_bank(dtype=torch.float32):
    _, mu, sigma = make_bank()
    steps = G.thinned_steps(T, 0, 1)
    return ChainBank(
        mu.to(dtype),
        sigma,
        torch.arange(len(steps)),
        num_steps=T,
        burn_in=0,
        thin=1,
        chains_per_class=1,
        sigma_min=0.5,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chain_bank_log_likelihood_reads_the_bank_now(dtype):
    x, _, _ = make_bank()
    bank = _chain_bank(dtype)
    first = bank.log_likelihood(x)
    bank.mu.data.add_(0.7)  # the widened copy of a bf16 bank was kept past this write
    got = bank.log_likelihood(x)
    want, tol = check_fresh(got, x, bank.mu.float(), bank.sigma, None, "ieee")
    assert (first.double() - want).abs().max().item() > 100 * tol


def test_chain_bank_prepared_is_kept_until_the_bank_changes():
    x, _, _ = make_bank()
    bank = _chain_bank(torch.bfloat16)
    snap = bank.prepared()
    assert bank.prepared() is snap and snap.dtype == torch.bfloat16
    wide = bank.prepared(torch.float32)  # another dtype replaces it
    assert wide.dtype == torch.float32 and bank.prepared(torch.float32) is wide
    assert torch.equal(wide.log_likelihood(x), bank.log_likelihood(x))
    bank.mu.add_(0.7)
    assert torch.equal(bank.prepared(torch.float32).log_likelihood(x), wide.log_likelihood(x))
    bank.mark_changed()
    fresh = bank.prepared(torch.float32)
    assert fresh is not wide
    assert torch.equal(fresh.log_likelihood(x), bank.log_likelihood(x))
    moved = bank.to("cpu").prepared()
    assert moved is not fresh


def test_trainer_losses_use_one_snapshot_per_refresh(monkeypatch, tmp_path):
    from train_helpers import tiny_config

    from genrep_fast.prepared_bank import PreparedBank
    from genrep_fast.train import evaluation, network

    made = []
    real_init = PreparedBank.__init__

    def counting_init(self, *a, **k):
        made.append(1)
        real_init(self, *a, **k)

    monkeypatch.setattr(PreparedBank, "__init__", counting_init)
    cfg = tiny_config(tmp_path)
    x, _, _ = make_bank()
    y = torch.arange(B) % C
    bank = _chain_bank()

    class Net:
        def perceive(self, x0, *, check_values=True):
            return x0.reshape(B, -1)[:, :C].clone().requires_grad_(), None

    losses = [network.perception_loss(Net(), x, y, bank, cfg, "torch")[2]["kl"] for _ in range(3)]
    assert len(made) == 1 and all(torch.equal(k, losses[0]) for k in losses)
    p = evaluation.posterior_probabilities(bank, x, batch_size=2)
    assert len(made) == 1
    torch.testing.assert_close(p, G.class_posterior(bank.log_likelihood(x)))
    bank.mark_changed()
    network.perception_loss(Net(), x, y, bank, cfg, "torch")
    assert len(made) == 2


def test_torch_compile_fullgraph_with_prepared_banks():
    x, mu, sigma = make_bank()

    def loss(x, bank):
        return G.mixture_log_likelihood(x, bank).logsumexp(-1).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for shift in (0.0, 0.7):  # a second snapshot: the compiled code reads that one's operands
        bank = G.prepare_bank(mu + shift, sigma)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = compiled(xc, bank), loss(xe, bank)
        got.backward()
        want.backward()
        assert torch.equal(got, want) and torch.equal(xc.grad, xe.grad)
