"""Semantic modulation of the denoising transition (docs/METHOD.md section 2).

    mu'    = mu + W_t . concat(x_t, x_sem) + b_t          (a 1x1 projection, per timestep)
    sigma' = sigma * (1 + f_sigma(x_sem)),   f_sigma = bound * tanh(MLP(x_sem))  in (-bound, bound)

``W_t, b_t`` come from a linear map of diffusers' sinusoidal timestep embedding (a small
hypernetwork: 2C*C + C numbers per timestep). Both the hypernetwork's output layer and the last
layer of ``f_sigma`` start at zero, so an untrained module returns ``mu + 0`` and ``sigma * 1``:
bit-identical to its input (tested), while gradients still reach the zero layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn


def rep_align_loss(h: torch.Tensor, x_sem: torch.Tensor) -> torch.Tensor:
    """``L_rep_align = 1 - cos(h, x_sem)``, the cosine over all values of each sample, mean over B.

    ``h`` (a projected hidden state of the generation path) and ``x_sem`` are ``[B, ...]`` with
    the same number of values per sample. Returns a float32 scalar (float64 for float64 inputs).
    """
    for name, v in (("h", h), ("x_sem", x_sem)):
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got {type(v).__name__}")
        if v.dim() < 2:
            raise ValueError(f"{name} must be [B, ...], got shape {tuple(v.shape)}")
    if h.shape[0] != x_sem.shape[0] or h[0].numel() != x_sem[0].numel():
        raise ValueError(
            f"h {tuple(h.shape)} and x_sem {tuple(x_sem.shape)} need the same batch size and the "
            "same number of values per sample"
        )
    dt = torch.float64 if torch.float64 in (h.dtype, x_sem.dtype) else torch.float32
    cos = F.cosine_similarity(
        h.reshape(h.shape[0], -1).to(dt), x_sem.reshape(h.shape[0], -1).to(dt)
    )
    return (1 - cos).mean()


class SemanticModulation(nn.Module):
    """Mean correction and bounded variance factor from a semantic embedding ``x_sem``.

    Args:
        latent_channels: C of the latent ``[C, H, W]``.
        time_channels: width of the sinusoidal timestep features.
        time_embed_dim: width of the timestep embedding the projection is conditioned on.
        hidden: channels of the ``f_sigma`` MLP.
        sigma_bound: ``|f_sigma| < sigma_bound`` (< 1 keeps ``1 + f_sigma > 0``); default 0.5.
    """

    def __init__(
        self,
        latent_channels: int,
        *,
        time_channels: int = 64,
        time_embed_dim: int = 128,
        hidden: int = 64,
        sigma_bound: float = 0.5,
    ):
        super().__init__()
        if not isinstance(latent_channels, int) or latent_channels < 1:
            raise ValueError(f"latent_channels must be an int >= 1, got {latent_channels!r}")
        if not 0 < sigma_bound < 1:
            raise ValueError(f"sigma_bound must be in (0, 1) so 1 + f_sigma > 0, got {sigma_bound}")
        c = latent_channels
        self.latent_channels = c
        self.sigma_bound = float(sigma_bound)
        self.time_proj = Timesteps(time_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(time_channels, time_embed_dim)
        # -> W_t [C, 2C] and b_t [C]
        self.to_projection = nn.Linear(time_embed_dim, c * 2 * c + c)
        self.sigma_conv = nn.Conv2d(c, hidden, kernel_size=3, padding=1)
        self.sigma_out = nn.Linear(hidden, 1)
        self.reset_output_layers()

    def reset_output_layers(self) -> None:
        """Zero the output layers: the module becomes the identity on ``(mu, sigma)``."""
        for layer in (self.to_projection, self.sigma_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _check(self, name: str, v: torch.Tensor, shape: tuple[int, ...]) -> None:
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got {type(v).__name__}")
        if tuple(v.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {list(v.shape)}")

    def projection(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``W_t: [B, C, 2C]`` and ``b_t: [B, C]`` for timesteps ``t: [B]``."""
        c = self.latent_channels
        p = self.to_projection.weight
        emb = self.time_embedding(self.time_proj(t).to(p.dtype))
        flat = self.to_projection(emb).to(dtype)
        return flat[:, : 2 * c * c].reshape(-1, c, 2 * c), flat[:, 2 * c * c :]

    def sigma_factor(self, x_sem: torch.Tensor) -> torch.Tensor:
        """``1 + f_sigma(x_sem)``: ``[B]``, in ``(1 - bound, 1 + bound)``."""
        w = self.sigma_conv.weight
        hid = F.silu(self.sigma_conv(x_sem.to(w.dtype))).mean(dim=(2, 3))
        return 1 + self.sigma_bound * torch.tanh(self.sigma_out(hid)[:, 0])

    def forward(
        self,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        x_t: torch.Tensor,
        x_sem: torch.Tensor,
        t: int | torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Modulated ``(mu', sigma')``.

        Args:
            mu: ``[B, C, H, W]`` base mean of the transition.
            sigma: ``[B]`` (isotropic) or ``[B, C, H, W]`` (diagonal) base std.
            x_t: ``[B, C, H, W]`` the current sample.
            x_sem: ``[B, C, H, W]`` semantic embedding (``x_t`` itself at inference).
            t: diffusers timestep(s), int or ``[B]``.

        Returns:
            ``mu'`` in the dtype of ``mu`` and ``sigma'`` in the dtype of ``sigma``, same shapes.
        """
        if not isinstance(mu, torch.Tensor) or mu.dim() != 4:
            raise ValueError(f"mu must be [B, C, H, W], got {getattr(mu, 'shape', mu)!r}")
        b, c = mu.shape[0], mu.shape[1]
        if c != self.latent_channels:
            raise ValueError(
                f"mu has {c} channels, the module was built for {self.latent_channels}"
            )
        shape = tuple(mu.shape)
        self._check("x_t", x_t, shape)
        self._check("x_sem", x_sem, shape)
        if not isinstance(sigma, torch.Tensor) or tuple(sigma.shape) not in ((b,), shape):
            raise ValueError(
                f"sigma must be [B] = [{b}] or the shape of mu {list(shape)}, got "
                f"{list(getattr(sigma, 'shape', []))}"
            )
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t, device=mu.device)
        t = t.to(mu.device).reshape(-1).expand(b) if t.numel() == 1 else t.to(mu.device)
        if tuple(t.shape) != (b,):
            raise ValueError(f"t must be a scalar or [B] = [{b}], got shape {tuple(t.shape)}")

        wdt = self.to_projection.weight.dtype
        w_t, b_t = self.projection(t, wdt)
        z = torch.cat([x_t, x_sem], dim=1).to(wdt)
        f_mu = torch.einsum("boi,bihw->bohw", w_t, z) + b_t[:, :, None, None]
        # Add in the wider of the two dtypes, so a float64 chain keeps its bits.
        mdt = torch.promote_types(mu.dtype, wdt)
        mu_out = (mu.to(mdt) + f_mu.to(mdt)).to(mu.dtype)
        factor = self.sigma_factor(x_sem)
        if sigma.dim() > 1:
            factor = factor.view(b, 1, 1, 1)
        sdt = torch.promote_types(sigma.dtype, wdt)
        sigma_out = (sigma.to(sdt) * factor.to(sdt)).to(sigma.dtype)
        return mu_out, sigma_out
