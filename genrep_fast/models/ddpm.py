"""The DDPM reverse transition p(x_prev | x_t) of a diffusers ``DDPMScheduler``, as a Gaussian.

``DDPMScheduler.step`` draws ``x_prev = mu + sigma * noise`` and returns only the draw; GenRep needs
``(mu, sigma)`` themselves (docs/METHOD.md section 1). ``ddpm_transition`` evaluates the scheduler's own
formulas (``alphas_cumprod``, the posterior variance of DDPM eq. 7, the ``variance_type`` of its
config, clipping / thresholding of the predicted x0) without drawing noise, batched over per-sample
timesteps. The tests check it against ``DDPMScheduler.step`` with the same noise.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers import DDPMScheduler

#: variance types whose std this module evaluates. "learned" (the raw model output used as a
#: variance) and "fixed_large_log" (diffusers takes the square root of a log there, giving NaN) are
#: not served.
SUPPORTED_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

# diffusers clamps the posterior variance here before taking its log.
_MIN_VARIANCE = 1e-20


def check_scheduler(scheduler: object) -> DDPMScheduler:
    """A ``DDPMScheduler`` whose variance and prediction types this module serves."""
    if not isinstance(scheduler, DDPMScheduler):
        raise TypeError(
            f"scheduler must be a diffusers DDPMScheduler, got {type(scheduler).__name__} "
            "(build one with DDPMScheduler.from_config(other.config) if needed)"
        )
    vt = scheduler.config.variance_type
    if vt not in SUPPORTED_VARIANCE_TYPES:
        raise ValueError(
            f"scheduler.config.variance_type={vt!r} is not served; use one of "
            f"{list(SUPPORTED_VARIANCE_TYPES)}"
        )
    pt = scheduler.config.prediction_type
    if pt not in PREDICTION_TYPES:
        raise ValueError(
            f"scheduler.config.prediction_type={pt!r} is not served; use one of {list(PREDICTION_TYPES)}"
        )
    return scheduler


def check_num_steps(scheduler: DDPMScheduler, num_steps: object) -> int:
    """``1 <= num_steps <= num_train_timesteps`` (DDPM cannot take more steps than it was trained on)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__} ({num_steps!r})")
    n_train = int(scheduler.config.num_train_timesteps)
    if not 1 <= num_steps <= n_train:
        raise ValueError(
            f"num_steps={num_steps} cannot be served by this scheduler: it needs 1 <= num_steps <= "
            f"num_train_timesteps={n_train}"
        )
    return num_steps


def inference_timesteps(scheduler: DDPMScheduler, num_steps: int) -> torch.Tensor:
    """The ``num_steps`` timesteps (int64, descending) a DDPM chain of that length visits.

    Computed on a copy of the scheduler, so ``scheduler`` itself is not modified.
    """
    check_num_steps(scheduler, num_steps)
    sched = DDPMScheduler.from_config(scheduler.config)
    sched.set_timesteps(num_steps)
    return sched.timesteps.to(torch.int64).clone()


def previous_timesteps(scheduler: DDPMScheduler, timestep: torch.Tensor) -> torch.Tensor:
    """``scheduler.previous_timestep`` for a ``[B]`` tensor of timesteps (-1 after the last step).

    Follows the scheduler's state: after ``set_timesteps`` the next entry of ``scheduler.timesteps``,
    otherwise ``t - 1`` (the training chain).
    """
    if scheduler.custom_timesteps or scheduler.num_inference_steps:
        ts = scheduler.timesteps.to(device=timestep.device, dtype=torch.int64)
        match = ts[None, :] == timestep[:, None]
        if not bool(match.any(1).all()):
            bad = timestep[~match.any(1)].tolist()
            raise ValueError(
                f"timestep values {bad} are not among the scheduler's {len(ts)} inference timesteps; "
                "pass prev_t explicitly or call scheduler.set_timesteps for the chain you run"
            )
        idx = match.to(torch.int64).argmax(1)
        nxt = ts[(idx + 1).clamp(max=len(ts) - 1)]
        return torch.where(idx + 1 < len(ts), nxt, torch.full_like(nxt, -1))
    return timestep - 1


@dataclasses.dataclass(frozen=True)
class PosteriorCoefficients:
    """DDPM's step ``t -> prev_t`` and its true posterior ``q(x_prev | x_t, x0) = N(coef_x0 x0 +
    coef_xt x_t, variance)`` (DDPM eq. 7), one value per sample: ``[B]`` tensors of one dtype.
    ``prev_t < 0`` (past the last step) has ``alpha_prod_prev = 1``. The one home of these
    formulas: the reverse transition (``ddpm_transition``), the bank's default ``sigma_min`` and the
    trainer's losses (``genrep_fast.train.network``) all read them from here."""

    alpha_prod_t: torch.Tensor  # alphas_cumprod[t]
    alpha_prod_prev: torch.Tensor  # alphas_cumprod[prev_t], 1 for prev_t < 0
    beta: torch.Tensor  # the step's beta: 1 - alpha_prod_t / alpha_prod_prev
    coef_x0: torch.Tensor  # the posterior mean's weight of x0
    coef_xt: torch.Tensor  # ... and of x_t
    variance: torch.Tensor  # the posterior variance, clamped below at diffusers' 1e-20

    def mean(self, x0: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """The posterior mean ``coef_x0 * x0 + coef_xt * x_t`` of ``[B, ...]`` tensors."""
        view = (-1,) + (1,) * (x_t.dim() - 1)
        return self.coef_x0.view(view) * x0 + self.coef_xt.view(view) * x_t

    @property
    def eps_scale(self) -> torch.Tensor:
        """``s_t`` with ``mu - mu_true = s_t (eps - eps_hat)`` for an epsilon model: the posterior
        mean's error in noise units."""
        a_t, a_prev = self.alpha_prod_t, self.alpha_prod_prev
        return a_prev.sqrt() * self.beta / ((1 - a_t).sqrt() * a_t.sqrt())


def posterior_coefficients(
    scheduler: DDPMScheduler, t: torch.Tensor, prev_t: torch.Tensor, dtype: torch.dtype
) -> PosteriorCoefficients:
    """The ``PosteriorCoefficients`` of ``[B]`` int64 timesteps ``t`` and ``prev_t`` (-1 past the
    last step), computed in ``dtype`` on ``t``'s device from ``scheduler.alphas_cumprod``."""
    ac = scheduler.alphas_cumprod.to(device=t.device, dtype=dtype)
    a_t = ac[t]
    a_prev = torch.where(prev_t >= 0, ac[prev_t.clamp(min=0)], torch.ones_like(a_t))
    beta_prod_t = 1 - a_t
    beta_prod_prev = 1 - a_prev
    cur_alpha = a_t / a_prev
    cur_beta = 1 - cur_alpha
    return PosteriorCoefficients(
        alpha_prod_t=a_t,
        alpha_prod_prev=a_prev,
        beta=cur_beta,
        coef_x0=a_prev.sqrt() * cur_beta / beta_prod_t,
        coef_xt=cur_alpha.sqrt() * beta_prod_prev / beta_prod_t,
        variance=(beta_prod_prev / beta_prod_t * cur_beta).clamp(min=_MIN_VARIANCE),
    )


def base_std(
    scheduler: DDPMScheduler, t: torch.Tensor, prev_t: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The fixed (not learned) std of a step, ``[B]``: sqrt of the DDPM posterior variance
    (``fixed_small``, and the lower end of ``learned_range``) or sqrt(beta_t) (``fixed_large``)."""
    q = posterior_coefficients(scheduler, t, prev_t, dtype)
    if scheduler.config.variance_type == "fixed_large":
        return q.beta.sqrt()
    return q.variance.sqrt()


def min_nonzero_std(scheduler: DDPMScheduler, num_steps: int) -> float:
    """The smallest std of a noisy step (t > 0) of the ``num_steps``-step chain: the default
    ``sigma_min`` of a chain bank (the last, deterministic step has std 0)."""
    ts = inference_timesteps(scheduler, num_steps)
    prev = torch.cat([ts[1:], ts.new_full((1,), -1)])
    keep = ts > 0
    if not bool(keep.any()):
        raise ValueError("the chain has no noisy step (every timestep is 0); cannot set sigma_min")
    return float(base_std(scheduler, ts[keep], prev[keep], torch.float64).min())


def ddpm_transition(
    scheduler: DDPMScheduler,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    model_output: torch.Tensor,
    prev_timestep: torch.Tensor | None = None,
    *,
    learned_variance: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of ``p(x_prev | x_t)`` under ``scheduler`` for a model output.

    Args:
        scheduler: a ``DDPMScheduler`` (see ``check_scheduler``).
        sample: ``x_t``, ``[B, C, H, W]``.
        timestep: ``[B]`` int64 diffusers timesteps (0 .. num_train_timesteps-1).
        model_output: ``[B, C, H, W]``, or ``[B, 2C, H, W]`` with ``learned_variance`` (the second
            half is the variance interpolation ``v`` in [-1, 1] of ``learned_range``).
        prev_timestep: ``[B]`` int64, -1 after the last step; default
            ``previous_timesteps(scheduler, timestep)``.
        learned_variance: the output carries a variance half. With a fixed ``variance_type`` that
            half is ignored (as diffusers' DiT pipeline does).

    Returns:
        ``mu: [B, C, H, W]`` and ``sigma``: ``[B]`` (fixed variance) or ``[B, C, H, W]``
        (``learned_range``), both float32 (float64 for a float64 ``sample``). ``sigma`` is exactly
        0 where ``timestep == 0``: DDPM's last step adds no noise.
    """
    dt = torch.float64 if sample.dtype == torch.float64 else torch.float32
    c = sample.shape[1]
    t = timestep.to(device=sample.device, dtype=torch.int64)
    prev = previous_timesteps(scheduler, t) if prev_timestep is None else prev_timestep
    prev = prev.to(device=sample.device, dtype=torch.int64)
    pred_var = None
    if learned_variance:
        model_output, pred_var = model_output[:, :c], model_output[:, c : 2 * c]
    x = sample.to(dt)
    out = model_output.to(dt)

    q = posterior_coefficients(scheduler, t, prev, dt)
    a_t, cur_beta = q.alpha_prod_t, q.beta
    view = (-1,) + (1,) * (sample.dim() - 1)
    beta_prod_t = 1 - a_t

    ptype = scheduler.config.prediction_type
    if ptype == "epsilon":
        x0 = (x - beta_prod_t.sqrt().view(view) * out) / a_t.sqrt().view(view)
    elif ptype == "sample":
        x0 = out
    else:  # v_prediction
        x0 = a_t.sqrt().view(view) * x - beta_prod_t.sqrt().view(view) * out
    if scheduler.config.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)

    mu = q.mean(x0, x)

    vtype = scheduler.config.variance_type
    post_var = q.variance
    if vtype == "learned_range":
        if pred_var is None:
            raise ValueError(
                "scheduler.config.variance_type='learned_range' needs a model that predicts its "
                f"variance (output channels 2*C = {2 * c}), got output channels {c}"
            )
        frac = (pred_var.to(dt) + 1) / 2
        log_var = frac * cur_beta.log().view(view) + (1 - frac) * post_var.log().view(view)
        sigma = torch.exp(0.5 * log_var)
        sigma = torch.where((t > 0).view(view), sigma, torch.zeros_like(sigma))
    else:
        sigma = cur_beta.sqrt() if vtype == "fixed_large" else post_var.sqrt()
        sigma = torch.where(t > 0, sigma, torch.zeros_like(sigma))
    return mu, sigma
