"""The Diffusion Classifier (Li et al., "Your Diffusion Model is Secretly a Zero-Shot
Classifier", ICCV 2023): a class-conditional diffusion model as a classifier, with no bank.

For an image ``x0`` and each class ``c`` the classifier scores the mean noise-prediction error over
``n`` trials ``(t_j, eps_j)`` shared by all classes (the same noisy inputs for every class, so the
classes differ only by their conditioning)::

    err_c = 1/n sum_j || eps_j - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_j, t_j, c) ||^2

(the squared L2 norm over the latent's values, unweighted over t as in the paper). The prediction
is ``argmin_c err_c``; probabilities are ``softmax(-err / temperature)``.

Adaptive class pruning (the paper's section 3.2): ``prune=((n_1, k_1), (n_2, k_2), ...)`` scores
every class on the first ``n_1`` trials, keeps the ``k_1`` with the smallest error, scores those on
trials up to ``n_2``, keeps ``k_2``, and so on; the survivors of the last round get all
``num_trials``. A pruned class keeps its error over the trials it was scored on (``errors``,
``trials``) and gets probability 0 (logit -inf). Rows (model evaluations) per image:
``C n_1 + k_1 (n_2 - n_1) + ... + k_r (num_trials - n_r)`` instead of ``C num_trials``.

Trials: ``t_j = floor(frac(u + j phi) T)`` with ``phi = (sqrt(5) - 1) / 2`` and ``u`` uniform per
image (a Kronecker sequence: every prefix, which is what a pruning round sees, spreads over
``[0, T)``), ``eps_j`` standard normal per image and trial; both drawn from ``generator`` before
any model call, so the result depends on the generator's seed only, not on ``batch_size`` or the
pruning schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch

# The golden-ratio step of the trial timesteps' Kronecker sequence.
_PHI = (math.sqrt(5.0) - 1.0) / 2.0


@dataclasses.dataclass(frozen=True)
class DiffusionClassifierResult:
    """What ``diffusion_classifier`` returns (B images, C classes).

    Attributes:
        errors: ``[B, C]`` float32, each class's mean squared noise-prediction error over the
            trials it was scored on (a pruned class: over the rounds it survived).
        trials: ``[B, C]`` int64, the number of trials behind each error.
        logits: ``[B, C]`` float32, ``-errors / temperature``; ``-inf`` for pruned classes.
        probs: ``[B, C]`` float32, ``softmax(logits)`` (0 for pruned classes).
        prediction: ``[B]`` int64, ``argmin`` of the survivors' errors.
        rows: model evaluations per image (the same for every image).
    """

    errors: torch.Tensor
    trials: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    prediction: torch.Tensor
    rows: int


def check_prune_schedule(
    prune: object, num_trials: int, num_classes: int
) -> tuple[tuple[int, int], ...]:
    """``prune`` as a tuple of ``(after_trials, keep)`` rounds, or a ValueError/TypeError naming
    what is wrong: ``0 < after_1 < after_2 < ... < num_trials`` and
    ``num_classes > keep_1 > keep_2 > ... >= 1``."""
    if prune is None:
        return ()
    if not isinstance(prune, (list, tuple)):
        raise TypeError(f"prune must be a list of (after_trials, keep) pairs, got {prune!r}")
    rounds = []
    last_n, last_k = 0, num_classes
    for r in prune:
        if (
            not isinstance(r, (list, tuple))
            or len(r) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in r)
        ):
            raise TypeError(
                f"prune: each round must be a pair of ints (after_trials, keep), got {r!r}"
            )
        n, k = int(r[0]), int(r[1])
        if not last_n < n < num_trials:
            raise ValueError(
                f"prune: after_trials must increase and stay in ({last_n}, num_trials={num_trials}), "
                f"got {list(r)}"
            )
        if not 1 <= k < last_k:
            raise ValueError(
                f"prune: keep must decrease and stay in [1, {last_k}) (classes left), got {list(r)}"
            )
        rounds.append((n, k))
        last_n, last_k = n, k
    return tuple(rounds)


def rows_per_image(num_classes: int, num_trials: int, prune: Sequence = ()) -> int:
    """Model evaluations per image of a schedule: ``C num_trials`` without pruning."""
    rounds = check_prune_schedule(prune, num_trials, num_classes)
    rows, lo, active = 0, 0, num_classes
    for n, k in (*rounds, (num_trials, None)):
        rows += active * (n - lo)
        lo, active = n, k
    return rows


def sample_trials(
    batch: int,
    num_trials: int,
    latent_shape: Sequence[int],
    num_train_timesteps: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared trials of ``batch`` images: ``(t [B, n] int64, eps [B, n, *latent] float32)``,
    on the generator's device (see the module docstring)."""
    dev = generator.device
    u = torch.rand((batch, 1), generator=generator, device=dev, dtype=torch.float64)
    j = torch.arange(num_trials, device=dev, dtype=torch.float64)
    frac = torch.remainder(u + j * _PHI, 1.0)
    t = (frac * num_train_timesteps).floor().long().clamp_(0, num_train_timesteps - 1)
    eps = torch.randn(
        (batch, num_trials, *latent_shape), generator=generator, device=dev, dtype=torch.float32
    )
    return t, eps


@contextlib.contextmanager
def _eval_mode(module) -> Iterator[None]:
    # A DiT in train mode drops labels (classifier-free guidance training): the classifier must
    # see the class it scores. Each submodule's flag is restored afterwards.
    if not isinstance(module, torch.nn.Module):
        yield
        return
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _eps_prediction(adapter, x_t, t, out, sqrt_a, sqrt_1ma) -> torch.Tensor:
    """The model's noise prediction from its raw output (first C channels), per prediction type."""
    c = x_t.shape[1]
    out = out[:, :c].float()
    kind = adapter.scheduler.config.prediction_type
    if kind == "epsilon":
        return out
    if kind == "v_prediction":
        # v = sqrt(a) eps - sqrt(1-a) x0, so eps = sqrt(a) v + sqrt(1-a) x_t
        return sqrt_a * out + sqrt_1ma * x_t
    return (x_t - sqrt_a * out) / sqrt_1ma  # "sample": the model predicts x0


def _row_errors(adapter, x0, t, eps, y, alphas_cumprod) -> torch.Tensor:
    """``[R]`` squared L2 noise-prediction errors of rows ``(x0 [R, *], t [R], eps [R, *], y [R])``."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = alphas_cumprod[t].view(shape)
    sqrt_a, sqrt_1ma = a.sqrt(), (1.0 - a).sqrt()
    x_t = sqrt_a * x0 + sqrt_1ma * eps
    out = adapter.predict(x_t, t, y, validate=False)
    eps_hat = _eps_prediction(adapter, x_t, t, out, sqrt_a, sqrt_1ma)
    return (eps_hat - eps).square().flatten(1).sum(1)


@torch.no_grad()
def diffusion_classifier(
    adapter,
    x0: torch.Tensor,
    *,
    num_trials: int = 10,
    prune: Sequence[Sequence[int]] = (),
    num_classes: int | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int = 0,
    batch_size: int = 1024,
    trials: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> DiffusionClassifierResult:
    """Classify ``x0`` with the Diffusion Classifier (module docstring), batched over images,
    classes and trials.

    Args:
        adapter: a ``genrep_fast.models.BackboneAdapter`` (or an object with its ``predict(x_t, t,
            y, validate=False)``, ``scheduler`` and ``latent_shape``). Runs in eval mode, no grad.
        x0: ``[B, *latent_shape]`` clean images / latents (the model's input space).
        num_trials: ``n``, trials per surviving class (the paper: 10-500).
        prune: adaptive pruning rounds ``((after_trials, keep), ...)``; empty: no pruning.
        num_classes: classes scored, ids ``[0, num_classes)`` (default ``adapter.num_classes``;
            a GenRep network passes its ``num_classes``, leaving out the null class row).
        temperature: > 0, the softmax temperature of ``probs`` (errors are in squared-norm units).
        generator: draws the trials; default: a generator on the adapter's device seeded with
            ``seed``. The result is a function of the generator's state alone.
        batch_size: model rows per forward pass (memory, not results: any value gives the same
            errors up to the model's batched arithmetic).
        trials: ``(t [B, n], eps [B, n, *latent])`` to use instead of drawing them (tests,
            a caller sharing trials between models).

    Returns:
        ``DiffusionClassifierResult``.
    """
    if isinstance(num_trials, bool) or not isinstance(num_trials, int) or num_trials < 1:
        raise ValueError(f"num_trials must be an int >= 1, got {num_trials!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a real number, got {temperature!r}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    latent = tuple(int(s) for s in adapter.latent_shape)
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point torch.Tensor, got {x0!r:.80}")
    if x0.dim() != 1 + len(latent) or tuple(x0.shape[1:]) != latent:
        raise ValueError(
            f"x0 must be [B, *latent_shape] = [B, {', '.join(map(str, latent))}], got shape "
            f"{tuple(x0.shape)}"
        )
    c = int(adapter.num_classes if num_classes is None else num_classes)
    if not 1 <= c <= int(getattr(adapter, "num_classes", c)):
        raise ValueError(f"num_classes must be in [1, {adapter.num_classes}], got {num_classes}")
    rounds = check_prune_schedule(prune, num_trials, c)
    device = x0.device
    b = x0.shape[0]
    n_train = int(adapter.scheduler.config.num_train_timesteps)
    if trials is None:
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(seed)
        t_all, eps_all = sample_trials(b, num_trials, latent, n_train, generator)
    else:
        t_all, eps_all = trials
        if tuple(t_all.shape) != (b, num_trials) or tuple(eps_all.shape) != (
            b,
            num_trials,
            *latent,
        ):
            raise ValueError(
                f"trials must be (t [{b}, {num_trials}], eps [{b}, {num_trials}, *latent]), got "
                f"{tuple(t_all.shape)} and {tuple(eps_all.shape)}"
            )
    t_all = t_all.to(device=device, dtype=torch.int64)
    eps_all = eps_all.to(device=device, dtype=torch.float32)
    x0 = x0.float()
    ac = adapter.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)

    # per (image, class, trial) error, NaN where not scored: summed in a fixed order afterwards,
    # so the result does not depend on how the rows were batched (no float atomics either)
    err = torch.full((b, c, num_trials), float("nan"), device=device)
    active = torch.arange(c, device=device).expand(b, c)  # [B, k] classes still in the race
    lo = 0
    with _eval_mode(getattr(adapter, "model", None)):
        for hi, keep in (*rounds, (num_trials, None)):
            k, m = active.shape[1], hi - lo
            bi = torch.arange(b, device=device).view(b, 1, 1).expand(b, k, m).reshape(-1)
            ci = active.view(b, k, 1).expand(b, k, m).reshape(-1)
            ji = torch.arange(lo, hi, device=device).view(1, 1, m).expand(b, k, m).reshape(-1)
            for s in range(0, bi.numel(), batch_size):
                rb, rc, rj = bi[s : s + batch_size], ci[s : s + batch_size], ji[s : s + batch_size]
                err[rb, rc, rj] = _row_errors(
                    adapter, x0[rb], t_all[rb, rj], eps_all[rb, rj], rc, ac
                )
            lo = hi
            if keep is not None:
                mean = err[:, :, :hi].gather(1, active.unsqueeze(-1).expand(b, k, hi)).mean(-1)
                order = mean.argsort(dim=1, stable=True)[:, :keep]
                active = active.gather(1, order)

    scored = ~err.isnan()
    count = scored.sum(-1)
    errors = torch.where(scored, err, torch.zeros_like(err)).sum(-1) / count
    alive = torch.zeros((b, c), dtype=torch.bool, device=device)
    alive.scatter_(1, active, True)
    logits = torch.where(alive, -errors / float(temperature), torch.full_like(errors, -math.inf))
    return DiffusionClassifierResult(
        errors=errors,
        trials=count,
        logits=logits,
        probs=logits.softmax(-1),
        prediction=logits.argmax(-1),
        rows=rows_per_image(c, num_trials, rounds),
    )


def diffusion_classifier_reference(
    adapter, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """``[B, C]`` mean errors of the unpruned classifier, one image, one class and one trial per
    model call, in float64: the oracle of the tests. ``t [B, n]``, ``eps [B, n, *latent]``."""
    ac = adapter.scheduler.alphas_cumprod.double()
    out = torch.zeros(x0.shape[0], num_classes, dtype=torch.float64)
    with torch.no_grad(), _eval_mode(getattr(adapter, "model", None)):
        for i in range(x0.shape[0]):
            for cls in range(num_classes):
                total = 0.0
                for j in range(t.shape[1]):
                    a = ac[int(t[i, j])]
                    e = eps[i, j].double()
                    x_t = a.sqrt() * x0[i].double() + (1 - a).sqrt() * e
                    tt = torch.tensor([int(t[i, j])])
                    y = torch.tensor([cls])
                    o = adapter.predict(x_t[None].float(), tt, y, validate=False)
                    e_hat = _eps_prediction(adapter, x_t[None], tt, o, a.sqrt(), (1 - a).sqrt())
                    total += float((e_hat.double()[0] - e).square().sum())
                out[i, cls] = total / t.shape[1]
    return out
