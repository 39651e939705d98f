"""Bad arguments raise TypeError (wrong kind, layout or dtype) or ValueError (wrong shape, range or
device, a meta tensor) with a message naming the argument: the public functions, and the ops
reachable directly through ``torch.ops.genrep_fast`` (C++ and Python custom ops alike)."""

from __future__ import annotations

import pytest
import torch

import genrep_fast as G
from genrep_fast import _ops

ops = torch.ops.genrep_fast
needs_ext = pytest.mark.skipif(not _ops.HAS_EXTENSION, reason="genrep_fast._C is not built")
needs_mixture_ext = pytest.mark.skipif(
    not _ops.HAS_MIXTURE_CPU_OPS, reason="genrep_fast._C has no mixture kernels"
)

X = torch.randn(2, 3)
MU = torch.randn(4, 5, 3)
SIG = torch.rand(5) + 0.5
SIG3 = SIG.reshape(1, 1, 5)
LL = torch.randn(2, 4)
Z = torch.randn(2, 4)
CI = torch.tensor([[0, 1], [1, 2]])
F64 = torch.float64


def meta(t):
    return t.to("meta")


def sparse(t):
    return t.to_sparse()


def combine(p, g, sums, out, ids=(0,)):
    return ops.align_combine(p, g, sums, list(ids), 2.0, 0.7, 0.3, "symmetric", out)


PUBLIC = {
    # lists instead of tensors
    "ll class_index list": (
        lambda: G.mixture_log_likelihood(X, MU, SIG, class_index=[[0, 1], [1, 2]]),
        TypeError,
        "class_index",
    ),
    "kl class_index list": (
        lambda: G.posterior_kl_loss(Z, LL[:, :2], class_index=[[0, 1], [1, 2]]),
        TypeError,
        "class_index",
    ),
    "ll x list": (lambda: G.mixture_log_likelihood([[1.0]], MU, SIG), TypeError, "x"),
    "posterior list": (lambda: G.class_posterior([[1.0, 2.0]]), TypeError, "log_likelihood"),
    "posterior prior list": (lambda: G.class_posterior(LL, [0.0] * 4), TypeError, "log_prior"),
    "align grads tensor": (
        lambda: G.align_gradients(torch.randn(3), torch.randn(3)),
        TypeError,
        "grads_p",
    ),
    # meta tensors
    "ll meta": (
        lambda: G.mixture_log_likelihood(meta(X), meta(MU), meta(SIG)),
        ValueError,
        "x is on the meta device",
    ),
    "ll meta unvalidated": (
        lambda: G.mixture_log_likelihood(meta(X), meta(MU), meta(SIG), validate=False),
        ValueError,
        "x is on the meta device",
    ),
    "ll meta class_index": (
        lambda: G.mixture_log_likelihood(X, MU, SIG, class_index=meta(CI)),
        ValueError,
        "class_index is on the meta device",
    ),
    "posterior meta": (
        lambda: G.class_posterior(meta(LL)),
        ValueError,
        "log_likelihood is on the meta device",
    ),
    "kl meta": (
        lambda: G.posterior_kl_loss(meta(Z), meta(LL)),
        ValueError,
        "logits is on the meta",
    ),
    "align meta": (
        lambda: G.align_gradients([meta(torch.randn(3))], [meta(torch.randn(3))]),
        ValueError,
        r"grads_p\[0\] is on the meta device",
    ),
    "align meta reference": (
        lambda: G.align_gradients([torch.randn(3)], [meta(torch.randn(3))], backend="reference"),
        ValueError,
        r"grads_g\[0\] is on the meta device",
    ),
    # sparse tensors
    "ll sparse x": (lambda: G.mixture_log_likelihood(sparse(X), MU, SIG), TypeError, "x must be"),
    "ll sparse mu": (lambda: G.mixture_log_likelihood(X, sparse(MU), SIG), TypeError, "mu must"),
    "ll sparse sigma": (
        lambda: G.mixture_log_likelihood(X, MU, sparse(SIG)),
        TypeError,
        "sigma must be a dense",
    ),
    "posterior sparse": (lambda: G.class_posterior(sparse(LL)), TypeError, "log_likelihood"),
    "posterior sparse prior": (
        lambda: G.class_posterior(LL, sparse(torch.zeros(4))),
        TypeError,
        "log_prior must be a dense",
    ),
    "kl sparse": (lambda: G.posterior_kl_loss(sparse(Z), LL), TypeError, "logits must be a dense"),
    "align sparse": (
        lambda: G.align_gradients([sparse(torch.randn(3))], [torch.randn(3)]),
        TypeError,
        r"grads_p\[0\] must be a dense",
    ),
    "align sparse reference": (
        lambda: G.align_gradients([torch.randn(3)], [sparse(torch.randn(3))], backend="reference"),
        TypeError,
        r"grads_g\[0\] must be a dense",
    ),
    "align out sparse": (
        lambda: G.align_gradients([torch.randn(3)], [torch.randn(3)], out=[sparse(torch.zeros(3))]),
        TypeError,
        r"out\[0\] must be a dense",
    ),
    "aligner sparse parameter": (
        lambda: G.GradientAligner([torch.nn.Parameter(sparse(torch.randn(3)))]),
        TypeError,
        r"model_or_params\[0\]",
    ),
    # wrong ranks
    "ll x rank": (lambda: G.mixture_log_likelihood(X[0], MU, SIG), ValueError, "x must have"),
    "ll class_index rank": (
        lambda: G.mixture_log_likelihood(X, MU, SIG, class_index=CI[0]),
        ValueError,
        "class_index must be",
    ),
    "posterior rank": (lambda: G.class_posterior(LL[0]), ValueError, "log_likelihood must be"),
    "kl rank": (lambda: G.posterior_kl_loss(Z[0], LL[0]), ValueError, "logits and log_likelihood"),
}


@pytest.mark.parametrize("case", list(PUBLIC))
def test_public_functions(case):
    call, error, match = PUBLIC[case]
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_aligner_sparse_gradient(backend):
    emb = torch.nn.Embedding(5, 3, sparse=True)
    aligner = G.GradientAligner(emb, backend=backend)
    idx = torch.tensor([0, 2])
    with pytest.raises(TypeError, match=r"grads_p\[0\] must be a dense"):
        aligner.backward(emb(idx).sum(), emb(idx).pow(2).sum())


SUMS = torch.zeros(1, 3, dtype=F64)

C_OPS = {
    "align_combine sums 1-D": (
        lambda: combine(
            [torch.randn(3)], [torch.randn(3)], torch.zeros(3, dtype=F64), [torch.zeros(3)]
        ),
        ValueError,
        "sums must be",
    ),
    "align_combine sums float32": (
        lambda: combine([torch.randn(3)], [torch.randn(3)], torch.zeros(1, 3), [torch.zeros(3)]),
        TypeError,
        "sums must be float64",
    ),
    "align_combine sparse out": (
        lambda: combine([torch.randn(3)], [torch.randn(3)], SUMS, [sparse(torch.zeros(3))]),
        TypeError,
        r"out\[0\] must be a dense",
    ),
    "group_sums sparse": (
        lambda: ops.group_sums([sparse(torch.randn(3))], [torch.randn(3)], [0], 1),
        TypeError,
        r"p\[0\] must be a dense",
    ),
    "group_sums int": (
        lambda: ops.group_sums([torch.ones(3, dtype=torch.long)], [None], [0], 1),
        TypeError,
        "floating point",
    ),
    "group_sums group_ids": (
        lambda: ops.group_sums([torch.ones(3)], [None], [5], 1),
        ValueError,
        r"group_ids\[0\]",
    ),
}

MIXTURE_OPS = {
    "x rank": (lambda: ops.mixture_ll_diff(X[0], MU, SIG3, None), ValueError, "x must be"),
    "mu rank": (lambda: ops.mixture_ll_diff(X, MU[0], SIG3, None), ValueError, "mu must be"),
    "x int": (
        lambda: ops.mixture_ll_diff(X.long(), MU.long(), SIG3, None),
        TypeError,
        "x must be floating",
    ),
    "mu dtype": (lambda: ops.mixture_ll_diff(X, MU.double(), SIG3, None), TypeError, "mu dtype"),
    "sigma shape": (lambda: ops.mixture_ll_diff(X, MU, SIG, None), ValueError, "sigma must be"),
    "sigma dtype": (
        lambda: ops.mixture_ll_diff(X, MU, SIG3.double(), None),
        TypeError,
        "sigma must be",
    ),
    "class_index float": (
        lambda: ops.mixture_ll_diff(X, MU, SIG3, torch.zeros(2, 2)),
        TypeError,
        "class_index must be int64",
    ),
    "class_index rank": (
        lambda: ops.mixture_ll_diff(X, MU, SIG3, CI[0]),
        ValueError,
        "class_index must be",
    ),
    "class_index range": (
        lambda: ops.mixture_ll_diff(X, MU, SIG3, torch.full((2, 2), 9)),
        ValueError,
        "class_index value 9",
    ),
    "sparse x": (
        lambda: ops.mixture_ll_diff(sparse(X), MU, SIG3, None),
        TypeError,
        "x must be a dense",
    ),
    "backward grad shape": (
        lambda: ops.mixture_ll_diff_backward(torch.zeros(3), X, MU, SIG3, None, True, True, True),
        ValueError,
        "grad must be",
    ),
}

PY_OPS = {
    "mixture_log_likelihood x rank": (
        lambda: ops.mixture_log_likelihood(X[0], MU, SIG, None, "ieee", "torch", []),
        ValueError,
        "x must have",
    ),
    "mixture_log_likelihood impl": (
        lambda: ops.mixture_log_likelihood(X, MU, SIG, None, "ieee", "nope", []),
        ValueError,
        "impl must be",
    ),
    "mixture_log_likelihood precision": (
        lambda: ops.mixture_log_likelihood(X, MU, SIG, None, "fp8", "torch", []),
        ValueError,
        "precision must be",
    ),
    "mixture_log_likelihood_backward grad": (
        lambda: ops.mixture_log_likelihood_backward(
            torch.zeros(3), X, MU, SIG, None, True, True, True, "torch", []
        ),
        ValueError,
        "grad must be",
    ),
    "class_posterior rank": (
        lambda: ops.class_posterior(LL[0], None),
        ValueError,
        "log_likelihood",
    ),
    "posterior_kl shapes": (
        lambda: ops.posterior_kl(Z[:, :3], LL, None),
        ValueError,
        "logits",
    ),
    "posterior_kl_backward stats": (
        lambda: ops.posterior_kl_backward(torch.zeros(2), Z, LL, None, torch.zeros(2, 3)),
        ValueError,
        "stats",
    ),
}


@needs_ext
@pytest.mark.parametrize("case", list(C_OPS))
def test_alignment_ops(case):
    call, error, match = C_OPS[case]
    with pytest.raises(error, match=match):
        call()


@needs_mixture_ext
@pytest.mark.parametrize("case", list(MIXTURE_OPS))
def test_mixture_ops(case):
    call, error, match = MIXTURE_OPS[case]
    with pytest.raises(error, match=match):
        call()


@needs_mixture_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only op with a CUDA tensor")
def test_mixture_op_is_cpu_only():
    # Without CUDA the dispatcher still routes by the tensor's device; a meta tensor goes to the
    # fake kernel (shapes only), which is allowed.
    out = ops.mixture_ll_diff(meta(X), meta(MU), meta(SIG3), None)
    assert out.shape == (2, 4) and out.device.type == "meta"


@pytest.mark.parametrize("case", list(PY_OPS))
def test_python_custom_ops(case):
    call, error, match = PY_OPS[case]
    with pytest.raises(error, match=match):
        call()
