"""Error of the Triton difference-form kernels where D spans several tiles (docs/NUMERICS.md,
"Launch configs and summation order").

Per-image bank, B=3, C=2, T=40, D=1000, sigma [C, T] and diagonal, 3 seeds: the largest error
against float64 of the forward LSE and of the backward row kernel's three gradients, in units of
fp32 eps x max|value|, next to torch's fp32 autograd through the reference. Run from the
repository root, on a machine without a GPU::

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python tools/measure_numerics_tiles.py
"""

from __future__ import annotations

import math

import torch

from genrep_fast import reference as R
from genrep_fast.kernels import mixture as M
from genrep_fast.kernels import mixture_backward as MB

B, C, T, D = 3, 2, 40, 1000
NAMES = ("dL/dx", "dL/dmu", "dL/dsigma")


def bank(kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    mu = torch.randn(B, C, T, D, generator=g)
    sigma = 0.5 + torch.rand((C, T) if kind == "c_t" else (B, C, T, D), generator=g)
    return x, mu, sigma


def autograd(x, mu, sigma, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (x, mu, sigma)]
    R.mixture_log_likelihood(*leaves).backward(grad.to(leaves[0].dtype))
    return [t.grad for t in leaves]


def main() -> None:
    eps = torch.finfo(torch.float32).eps
    worst: dict[tuple[str, str, str], float] = {}

    def record(key, got, want):
        err = (got.double() - want).abs().max().item() / (eps * want.abs().max().item())
        worst[key] = max(worst.get(key, 0.0), err)

    for kind in ("c_t", "diag"):
        for seed in range(3):
            x, mu, sigma = bank(kind, seed)
            grad = torch.randn(B, C, generator=torch.Generator().manual_seed(seed + 2))
            want = autograd(x.double(), mu.double(), sigma.double(), grad.double())
            torch32 = autograd(x, mu, sigma, grad)
            kernel = MB.mixture_lse_backward(grad, x, mu, sigma, None)
            for name, k, t, w in zip(NAMES, kernel, torch32, want):
                record((kind, name, "kernel"), k, w)
                record((kind, name, "torch"), t, w)
            lse = R.mixture_log_likelihood(x.double(), mu.double(), sigma.double()) + math.log(T)
            record((kind, "lse", "kernel"), M.mixture_lse_diff(x, mu, sigma, None), lse)
            torch_lse = R.mixture_log_likelihood(x, mu, sigma).double() + math.log(T)
            record((kind, "lse", "torch"), torch_lse, lse)
    print("| sigma | value | triton | torch fp32 (reference) |")
    print("|---|---|---|---|")
    for kind in ("c_t", "diag"):
        for name in ("lse", *NAMES):
            k, t = worst[kind, name, "kernel"], worst[kind, name, "torch"]
            print(f"| {kind} | {name} | {k:.3g} | {t:.3g} |")


if __name__ == "__main__":
    main()
