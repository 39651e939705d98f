"""Diffusion backbones for GenRep over real diffusers classes.

* ``BackboneAdapter`` / ``make_adapter``: step Gaussians, attention blocks, t=0 features;
* ``PerceptionHead``: multi-block aggregation -> logits and ``x_sem``;
* ``SemanticModulation``, ``rep_align_loss``: semantic-driven generation (docs/METHOD.md section 2);
* ``DDPMSampler``, ``ChainBank``: reverse chains and the bank of the mixture likelihood;
* ``load_vae``, ``vae_encode``, ``vae_decode``: latent space;
* ``tiny_*``: small randomly initialised configs for tests and demos (nothing is downloaded).
"""

from __future__ import annotations

from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiTTransformer2DModel,
    UNet2DConditionModel,
    UNet2DModel,
    VQModel,
)

from genrep_fast.models.adapters import (
    BackboneAdapter,
    configure_attention,
    eval_mode,
    make_adapter,
)
from genrep_fast.models.chain_bank import ChainBank
from genrep_fast.models.ddpm import ddpm_transition, inference_timesteps, min_nonzero_std
from genrep_fast.models.heads import DenseHead, FeatureAggregator, PerceptionHead
from genrep_fast.models.modulation import SemanticModulation, rep_align_loss
from genrep_fast.models.sampling import ChainRecord, DDPMSampler
from genrep_fast.models.vae import load_vae, vae_decode, vae_encode


def tiny_scheduler(
    num_train_timesteps: int = 1000,
    *,
    learned_variance: bool = False,
    clip_sample: bool = False,
    prediction_type: str = "epsilon",
) -> DDPMScheduler:
    """A linear-beta ``DDPMScheduler``; ``learned_range`` variance for learned-variance models."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        variance_type="learned_range" if learned_variance else "fixed_small",
        clip_sample=clip_sample,
        prediction_type=prediction_type,
    )


def tiny_unet2d(
    sample_size: int = 8,
    in_channels: int = 1,
    num_classes: int = 10,
    *,
    block_out_channels: tuple[int, ...] = (32, 64),
    layers_per_block: int = 1,
    attention_head_dim: int = 8,
    norm_num_groups: int = 8,
    learned_variance: bool = False,
) -> UNet2DModel:
    """A class-conditional ``UNet2DModel``: one plain level, then attention levels, attention in the
    mid block. With the defaults 8x8 -> 4x4 (works for the 8x8 scikit-learn digits)."""
    n = len(block_out_channels)
    down = ("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1)
    up = ("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels * (2 if learned_variance else 1),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
        num_class_embeds=num_classes,
    )


def tiny_unet2d_condition(
    sample_size: int = 8,
    in_channels: int = 4,
    num_classes: int = 10,
    *,
    block_out_channels: tuple[int, int] = (32, 64),
    layers_per_block: int = 1,
    attention_head_dim: int = 8,
    norm_num_groups: int = 8,
) -> UNet2DConditionModel:
    """A class-conditional LDM ``UNet2DConditionModel``: ``num_class_embeds`` classes, and the class
    embedding doubles as the cross-attention context (``cross_attention_dim`` = time-embedding
    width = 4 * block_out_channels[0])."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=norm_num_groups,
        cross_attention_dim=4 * block_out_channels[0],
        attention_head_dim=attention_head_dim,
        num_class_embeds=num_classes,
    )


def tiny_dit(
    sample_size: int = 8,
    in_channels: int = 4,
    num_classes: int = 10,
    *,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    patch_size: int = 2,
    learned_variance: bool = True,
) -> DiTTransformer2DModel:
    """A ``DiTTransformer2DModel`` (adaLN-zero, ``num_classes`` + a null class for guidance); with
    ``learned_variance`` ``out_channels = 2 * in_channels``."""
    return DiTTransformer2DModel(
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=in_channels,
        out_channels=in_channels * (2 if learned_variance else 1),
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes,
    )


def tiny_vae(
    kind: str = "kl",
    *,
    in_channels: int = 3,
    latent_channels: int = 4,
    block_out_channels: tuple[int, ...] = (16, 32),
    norm_num_groups: int = 8,
) -> AutoencoderKL | VQModel:
    """A small random ``AutoencoderKL`` (``kind="kl"``) or ``VQModel`` (``"vq"``); downsamples by
    ``2 ** (len(block_out_channels) - 1)``."""
    n = len(block_out_channels)
    common = dict(
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(block_out_channels),
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
    )
    if kind == "kl":
        return AutoencoderKL(**common)
    if kind == "vq":
        return VQModel(**common, num_vq_embeddings=64)
    raise ValueError(f"kind must be 'kl' or 'vq', got {kind!r}")


__all__ = [
    "BackboneAdapter",
    "make_adapter",
    "configure_attention",
    "eval_mode",
    "PerceptionHead",
    "FeatureAggregator",
    "DenseHead",
    "SemanticModulation",
    "rep_align_loss",
    "DDPMSampler",
    "ChainRecord",
    "ChainBank",
    "ddpm_transition",
    "inference_timesteps",
    "min_nonzero_std",
    "load_vae",
    "vae_encode",
    "vae_decode",
    "tiny_scheduler",
    "tiny_unet2d",
    "tiny_unet2d_condition",
    "tiny_dit",
    "tiny_vae",
]
