"""The teacher's bandwidth, chosen on training data (``diffusion.sigma_min: auto``;
docs/METHOD.md section 5.1).

The bank's sigma is clamped below at a bandwidth ``h``; with the true per-step sigma the posterior
is dominated by the near-deterministic last steps, with a large ``h`` it is a kernel density
estimate over the chain means. ``h`` is chosen, never hand-set on held-out images:
``split_validation`` carves a fixed validation split out of the *training* set (the trainer then
trains on the rest), and ``select_bandwidth`` picks the grid value whose posterior has the lowest
negative log-likelihood of the true labels on it. The test split is never read.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from genrep_fast import mixture_log_likelihood, prepare_bank


class IndexSubset(torch.utils.data.Dataset):
    """The rows ``indices`` of ``dataset`` (for datasets that are not in memory)."""

    def __init__(self, dataset, indices: torch.Tensor):
        self.dataset = dataset
        self.indices = indices

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __getitem__(self, i: int):
        return self.dataset[int(self.indices[i])]

    def describe(self, i: int) -> str:
        from genrep_fast.train.data import describe_sample

        return describe_sample(self.dataset, int(self.indices[i]))


def validation_indices(n: int, fraction: float, max_images: int, seed: int) -> torch.Tensor:
    """The sorted training-set rows of the validation split: ``min(round(fraction * n),
    max_images)`` rows (at least 1, at most ``n - 1``) of a permutation fixed by ``seed``."""
    if n < 2:
        raise ValueError(f"the training set has {n} examples; a validation split needs >= 2")
    k = min(max(1, round(fraction * n)), max_images if max_images > 0 else n, n - 1)
    g = torch.Generator().manual_seed(seed * 7_368_787 + 17)
    return torch.randperm(n, generator=g)[:k].sort().values


def split_validation(dataset, fraction: float, max_images: int, seed: int):
    """``(train, val)``: the training set without the validation rows, and those rows.

    An in-memory ``TensorDataset`` gives two ``TensorDataset``s; any other dataset two
    ``IndexSubset`` views."""
    from genrep_fast.train.data import TensorDataset

    n = len(dataset)
    val = validation_indices(n, fraction, max_images, seed)
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    train = keep.nonzero().flatten()
    if isinstance(dataset, TensorDataset):
        names = dataset.class_names
        return (
            TensorDataset(dataset.images[train], dataset.labels[train], names),
            TensorDataset(dataset.images[val], dataset.labels[val], names),
        )
    return IndexSubset(dataset, train), IndexSubset(dataset, val)


EXTEND_FACTOR = 1.5  # select_bandwidth's step past the grid's largest value


@dataclasses.dataclass
class BandwidthChoice:
    """The chosen bandwidth and, per grid value, the teacher's validation NLL (nats per image)
    and top-1."""

    bandwidth: float
    val_nll: float
    val_top1: float
    grid: list[float]
    nll: list[float]
    top1: list[float]


@torch.no_grad()
def select_bandwidth(
    mu: torch.Tensor,
    sigma: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    grid: list[float],
    *,
    precision: str = "ieee",
    backend: str = "auto",
    batch_size: int = 256,
    extend: int = 0,
) -> BandwidthChoice:
    """The grid value ``h`` minimising ``-mean log p(y | x)`` of the bank's posterior with sigma
    clamped below at ``h`` (the first of equal values).

    ``extend``: while the minimum is the grid's largest value (the NLL still falling there), up
    to ``extend`` more values are tried, each ``EXTEND_FACTOR`` times the last; the choice's
    ``grid`` lists every value tried. (MNIST at 14x14 chose the top of the default grid, 1.5.)

    Args:
        mu: ``[C, T, *latent]`` the bank's means.
        sigma: ``[C, T]`` or ``mu``'s shape: the bank's sigma, clamped at a value <= min(grid).
        x: ``[N, *latent]`` validation images (training data), on the bank's device.
        y: ``[N]`` their labels.
        grid: candidate bandwidths, each > 0.
    """
    if not grid or any(not (isinstance(h, (int, float)) and h > 0) for h in grid):
        raise ValueError(f"grid must be a non-empty list of numbers > 0, got {grid!r}")
    if isinstance(extend, bool) or not isinstance(extend, int) or extend < 0:
        raise ValueError(f"extend must be an int >= 0, got {extend!r}")
    grid = [float(h) for h in grid]
    nlls, tops = [], []
    y = y.to(x.device)

    def score(h: float) -> None:
        prepared = prepare_bank(mu, sigma.clamp(min=float(h)))
        nll, hits = 0.0, 0
        for lo in range(0, x.shape[0], batch_size):
            xb, yb = x[lo : lo + batch_size].to(prepared.dtype), y[lo : lo + batch_size]
            ll = mixture_log_likelihood(xb, prepared, precision=precision, backend=backend)
            logp = ll.double().log_softmax(1)  # log p(y | x), uniform prior
            nll -= float(logp.gather(1, yb[:, None]).sum())
            hits += int((logp.argmax(1) == yb).sum())
        n = max(1, x.shape[0])
        nll /= n
        nlls.append(nll if math.isfinite(nll) else math.inf)
        tops.append(hits / n)

    for h in grid:
        score(h)
    top = max(range(len(grid)), key=lambda i: grid[i])
    for _ in range(extend):
        best = min(range(len(grid)), key=lambda i: nlls[i])
        if best != top:
            break
        grid.append(grid[top] * EXTEND_FACTOR)
        top = len(grid) - 1
        score(grid[top])
    best = min(range(len(grid)), key=lambda i: nlls[i])
    return BandwidthChoice(grid[best], nlls[best], tops[best], grid, nlls, tops)
