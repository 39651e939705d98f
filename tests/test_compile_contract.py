"""Every public op under ``torch.compile(fullgraph=True)``, forward and backward, with triton
installed and without it (a fresh interpreter in which ``import triton`` fails): the backend
choice must not import anything inside traced code."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

# The body runs here and in a subprocess that blocks triton before genrep_fast is imported.
CHECKS = textwrap.dedent(
    """
    import torch
    import genrep_fast as G

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    def run(fn, *args):
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
        got_grads = torch.autograd.grad(got, leaves, allow_unused=True)
        want = fn(*args)
        want_grads = torch.autograd.grad(want, leaves, allow_unused=True)
        close(got, want)
        for a, b in zip(got_grads, want_grads):
            assert (a is None) == (b is None)
            if a is not None:
                close(a, b)

    torch.manual_seed(0)
    x = torch.randn(3, 2, 3, requires_grad=True)
    mu = torch.randn(4, 5, 2, 3, requires_grad=True)
    mu_img = torch.randn(3, 4, 5, 2, 3, requires_grad=True)
    sigma = (torch.rand(4, 5) + 0.5).requires_grad_()
    ci = torch.tensor([[0, 3], [2, 2], [1, 0]])
    z = torch.randn(3, 4, requires_grad=True)
    ll0 = torch.randn(3, 4, requires_grad=True)
    prior = torch.randn(4).log_softmax(-1)

    run(lambda x, mu, s: G.mixture_log_likelihood(x, mu, s).sum(), x, mu, sigma)
    run(lambda x, mu: G.mixture_log_likelihood(x, mu, sigma[0]).sum(), x, mu_img)
    run(lambda x, mu: G.mixture_log_likelihood(x, mu, sigma, class_index=ci).sum(), x, mu)
    run(lambda ll: (G.class_posterior(ll, prior) * torch.arange(4.0)).sum(), ll0)
    run(lambda z, ll: G.posterior_kl_loss(z, ll, prior), z, ll0)
    run(lambda z, ll: G.posterior_kl_loss(z, ll[:, :2], class_index=ci).sum(), z, ll0)
    run(
        lambda z, x, mu: G.posterior_kl_loss(z, G.mixture_log_likelihood(x, mu, sigma)),
        z, x, mu,
    )
    # The eager reference traces too (its zero-density guard runs without a host sync there).
    run(lambda x, mu: G.mixture_log_likelihood(x, mu, sigma, backend="reference").sum(), x, mu)
    run(lambda z, ll: G.posterior_kl_loss(z, ll, prior, backend="reference"), z, ll0)
    run(lambda ll: G.class_posterior(ll, backend="reference").amax(-1).sum(), ll0)

    ps = [torch.randn(4, 3), torch.randn(5, dtype=torch.float64), None]
    gs = [torch.randn(4, 3), torch.randn(5, dtype=torch.float64), torch.randn(2)]
    for backend in ("auto", "reference"):
        for groups in (None, "global"):
            def align(ps, gs):
                return G.align_gradients(ps, gs, groups=groups, backend=backend)
            got = torch.compile(align, fullgraph=True, backend="aot_eager")(ps, gs)
            for a, b in zip(got, align(ps, gs)):
                close(a, b)

            def align_out(ps, gs):
                out = [torch.empty_like(t) for t in gs]
                return G.align_gradients(ps, gs, groups=groups, backend=backend, out=out)
            got = torch.compile(align_out, fullgraph=True, backend="aot_eager")(ps, gs)
            for a, b in zip(got, align(ps, gs)):
                close(a, b)
    print("compiled every op")
    """
)

# Blocks `import triton` (and any of its submodules) the way an absent installation does.
HIDE_TRITON = textwrap.dedent(
    """
    import sys

    class _NoTriton:
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, _NoTriton())
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        del sys.modules[name]
    """
)


def test_compile_fullgraph_every_op():
    torch._dynamo.reset()
    exec(compile(CHECKS, "compile_checks", "exec"), {"__name__": "compile_checks"})


def test_compile_fullgraph_every_op_without_triton():
    code = HIDE_TRITON + CHECKS + "\nimport genrep_fast.posterior as P\nassert not P.HAS_TRITON\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "compiled every op" in proc.stdout


def test_triton_backend_without_triton_is_a_value_error():
    code = HIDE_TRITON + textwrap.dedent(
        """
        import torch
        import genrep_fast as G

        for call in (
            lambda: G.mixture_log_likelihood(torch.zeros(1, 2), torch.zeros(1, 1, 2),
                                             torch.ones(1), backend="triton"),
            lambda: G.class_posterior(torch.zeros(1, 2), backend="triton"),
            lambda: G.posterior_kl_loss(torch.zeros(1, 2), torch.zeros(1, 2), backend="triton"),
        ):
            try:
                call()
            except ValueError as exc:
                assert "triton" in str(exc), exc
            else:
                raise AssertionError("no error")
        print("refused")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "refused" in proc.stdout
