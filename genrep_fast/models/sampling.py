"""DDPM ancestral sampling with semantic modulation, recording the transitions' (mu, sigma).

``DDPMSampler`` runs ``x_prev = mu + sigma * noise`` over the timesteps of a ``DDPMScheduler``
(its own copy of the adapter's scheduler, so the adapter's is never modified). Noise is drawn
with diffusers' ``randn_tensor`` in the same order, shape and dtype as ``DDPMScheduler.step``
does, so without modulation a chain reproduces the scheduler's own loop from the same generator
(tested). At inference the modulation's semantic input is the current sample (``x_sem := x_t``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from diffusers import DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from genrep_fast.models.adapters import BackboneAdapter, eval_mode
from genrep_fast.models.ddpm import check_num_steps
from genrep_fast.models.modulation import SemanticModulation
from genrep_fast.profiling import nvtx_range


class ChainRecord(NamedTuple):
    """``(mu, sigma)`` of a batch of chains at the recorded positions.

    ``mu: [B, R, *latent]`` float32; ``sigma: [B, R]`` (isotropic) or ``[B, R, *latent]``
    (diagonal) float32; ``steps``: the R 0-based positions; ``timesteps: [R]`` int64, their
    diffusers timesteps. sigma is not clamped here (it is 0 at the last step).
    """

    mu: torch.Tensor
    sigma: torch.Tensor
    steps: list[int]
    timesteps: torch.Tensor


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False)


class DDPMSampler:
    """Ancestral DDPM sampling of a ``BackboneAdapter`` in ``num_steps`` steps.

    Args:
        adapter: the backbone.
        num_steps: chain length N (``1 <= N <= num_train_timesteps``), e.g. 200 (LDM) or 250 (DiT).
        modulation: optional ``SemanticModulation`` applied to every transition.
        guidance_scale: classifier-free guidance (needs ``adapter.null_class``); 1.0 = none.
    """

    def __init__(
        self,
        adapter: BackboneAdapter,
        num_steps: int,
        modulation: SemanticModulation | None = None,
        guidance_scale: float = 1.0,
    ):
        if not isinstance(adapter, BackboneAdapter):
            raise TypeError(f"adapter must be a BackboneAdapter, got {type(adapter).__name__}")
        if modulation is not None and not isinstance(modulation, SemanticModulation):
            raise TypeError(
                f"modulation must be a SemanticModulation or None, got {type(modulation).__name__}"
            )
        if modulation is not None and modulation.latent_channels != adapter.latent_shape[0]:
            raise ValueError(
                f"modulation has {modulation.latent_channels} channels, the latent has "
                f"{adapter.latent_shape[0]}"
            )
        self.adapter = adapter
        self.num_steps = check_num_steps(adapter.scheduler, num_steps)
        self.modulation = modulation
        self.guidance_scale = adapter.check_guidance(guidance_scale)
        self.scheduler = DDPMScheduler.from_config(adapter.scheduler.config)
        self.scheduler.set_timesteps(num_steps)
        self.timesteps = self.scheduler.timesteps.to(torch.int64).clone()
        if len(self.timesteps) != num_steps:
            raise ValueError(
                f"the scheduler produced {len(self.timesteps)} timesteps for num_steps={num_steps}"
            )
        self.prev_timesteps = torch.cat([self.timesteps[1:], self.timesteps.new_full((1,), -1)])

    def _check_record_steps(self, record_steps: Sequence[int] | None) -> list[int]:
        if record_steps is None:
            return []
        steps = [int(s) for s in record_steps]
        if any(not 0 <= s < self.num_steps for s in steps):
            raise ValueError(
                f"record_steps must be in [0, num_steps={self.num_steps}), got {steps}"
            )
        if steps != sorted(set(steps)):
            raise ValueError(f"record_steps must be strictly increasing, got {steps}")
        return steps

    @torch.no_grad()
    def sample(
        self,
        y: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        record_steps: Sequence[int] | None = None,
        progress: bool = False,
        *,
        x_T: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ChainRecord]:
        """Run the chain for class ids ``y: [B]``.

        The model runs in eval mode (restored afterwards) and without gradients.

        Args:
            y: ``[B]`` int64 class ids in ``[0, num_classes)`` (or ``null_class``: unconditional).
            generator: torch generator(s) for the start noise and every step's noise.
            record_steps: 0-based positions whose ``(mu, sigma)`` to keep, e.g.
                ``genrep_fast.thinned_steps(N, burn_in, thin)``.
            progress: a tqdm bar over the steps.
            x_T: ``[B, *latent]`` start sample instead of ``init_noise_sigma * N(0, I)``.

        Returns:
            ``x0: [B, *latent]`` float32; with ``record_steps``, ``(x0, ChainRecord)``.
        """
        ad = self.adapter
        b = y.shape[0] if isinstance(y, torch.Tensor) and y.dim() == 1 else -1
        y = ad.check_labels(y, b if b >= 0 else 0, allow_null=True)
        steps = self._check_record_steps(record_steps)
        device = ad.device
        shape = (b, *ad.latent_shape)
        if x_T is None:
            x = randn_tensor(shape, generator=generator, device=device, dtype=ad.dtype)
            x = x.float() * self.scheduler.init_noise_sigma
        else:
            ad.check_latents("x_T", x_T)
            if x_T.shape[0] != b:
                raise ValueError(f"x_T has batch {x_T.shape[0]}, y has {b}")
            x = x_T.to(device=device, dtype=torch.float32)
        keep = {s: r for r, s in enumerate(steps)}
        mus: list[torch.Tensor] = []
        sigmas: list[torch.Tensor] = []
        with eval_mode(ad.model):
            for i in _progress(range(self.num_steps), progress, "ddpm"):
                t_val = int(self.timesteps[i])
                t = torch.full((b,), t_val, dtype=torch.int64, device=device)
                prev = torch.full(
                    (b,), int(self.prev_timesteps[i]), dtype=torch.int64, device=device
                )
                with nvtx_range("genrep.sampling_step"):
                    mu, sigma = ad.step_distribution(
                        x, t, y, prev_t=prev, guidance_scale=self.guidance_scale, validate=False
                    )
                    if self.modulation is not None:
                        mu, sigma = self.modulation(mu, sigma, x, x, t)
                    if i in keep:
                        mus.append(mu)
                        sigmas.append(sigma)
                    if t_val > 0:
                        noise = randn_tensor(
                            mu.shape, generator=generator, device=device, dtype=ad.dtype
                        )
                        s = sigma if sigma.dim() > 1 else sigma.view(b, 1, 1, 1)
                        x = mu + s * noise.to(mu.dtype)
                    else:
                        x = mu
        if not steps:
            return x
        rec = ChainRecord(
            mu=torch.stack(mus, dim=1),
            sigma=torch.stack(sigmas, dim=1),
            steps=steps,
            timesteps=self.timesteps[steps].clone(),
        )
        return x, rec
