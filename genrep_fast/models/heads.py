"""The perception branch: attention-block features -> a fused map -> task heads and ``x_sem``.

``FeatureAggregator`` normalises each block's map, projects it to ``hidden`` channels with a 1x1
convolution, resizes all to one resolution (bilinear) and fuses the concatenation with a 1x1 + 3x3
convolution. ``PerceptionHead`` puts a classifier (global pooling -> logits) and the ``x_sem``
projection (-> the latent's shape) on the fused map; dense heads (segmentation, depth) take the
same fused map (``PerceptionHead.aggregate``) and add their own 1x1 output convolution, e.g.
``DenseHead``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _group_count(channels: int, preferred: int = 32) -> int:
    return math.gcd(channels, preferred)


class FeatureAggregator(nn.Module):
    """Fuse multi-block feature maps ``[B, C_i, H_i, W_i]`` into ``[B, hidden, *resolution]``."""

    def __init__(self, feature_channels: Sequence[int], hidden: int, resolution: tuple[int, int]):
        super().__init__()
        chans = [int(c) for c in feature_channels]
        if not chans or min(chans) < 1:
            raise ValueError(f"feature_channels must be a non-empty list of ints >= 1, got {chans}")
        self.feature_channels = chans
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.norms = nn.ModuleList(nn.GroupNorm(_group_count(c), c) for c in chans)
        self.projs = nn.ModuleList(nn.Conv2d(c, hidden, kernel_size=1) for c in chans)
        self.fuse = nn.Sequential(
            nn.Conv2d(hidden * len(chans), hidden, kernel_size=1),
            nn.GroupNorm(_group_count(hidden), hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1),
        )

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.feature_channels):
            raise ValueError(
                f"features: expected {len(self.feature_channels)} maps (one per attention block), "
                f"got {len(features)}"
            )
        dt = self.projs[0].weight.dtype
        maps = []
        for i, (f, norm, proj) in enumerate(zip(features, self.norms, self.projs)):
            if (
                not isinstance(f, torch.Tensor)
                or f.dim() != 4
                or f.shape[1] != self.feature_channels[i]
            ):
                raise ValueError(
                    f"features[{i}] must be [B, {self.feature_channels[i]}, H, W], got "
                    f"{tuple(getattr(f, 'shape', ()))}"
                )
            if f.shape[0] != features[0].shape[0]:
                raise ValueError(
                    f"features[{i}] has batch {f.shape[0]}, features[0] has {features[0].shape[0]}"
                )
            f = f.to(dt)
            if f.device.type == "cpu":
                # torch's CPU GroupNorm backward crashes (SIGSEGV) on a channels-last input whose
                # own gradient is not needed, e.g. the features of a frozen backbone; attention
                # blocks hand back such maps. A contiguous copy takes the kernel's other path.
                f = f.contiguous()
            m = proj(norm(f))
            if tuple(m.shape[2:]) != self.resolution:
                m = F.interpolate(m, size=self.resolution, mode="bilinear", align_corners=False)
            maps.append(m)
        return self.fuse(torch.cat(maps, dim=1))


class DenseHead(nn.Module):
    """A per-pixel head on the fused map: ``[B, hidden, h, w] -> [B, out_channels, *size]``."""

    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_group_count(hidden), hidden)
        self.out = nn.Conv2d(hidden, out_channels, kernel_size=1)

    def forward(self, fused: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        out = self.out(F.silu(self.norm(fused)))
        if size is not None and tuple(out.shape[2:]) != tuple(size):
            out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
        return out


class PerceptionHead(nn.Module):
    """Classification logits and the semantic embedding ``x_sem`` from attention-block features.

    Args:
        feature_channels: channels of each feature map (``BackboneAdapter.feature_channels``).
        num_classes: C of the logits.
        latent_shape: ``(C_lat, H, W)``: ``x_sem`` gets this shape.
        hidden: width of the fused map.
        resolution: ``(h, w)`` the maps are resized to; default the latent's ``(H, W)``.
        sem_readout: ``x_sem`` feeds the logits through a linear read-out,
            ``logits = classifier(pool(fused)) + readout(flatten(x_sem))``, so the classification
            loss trains the ``x_sem`` projection (docs/METHOD.md section 2: without it ``to_sem``
            gets no gradient in stage 1 and ``x_sem`` carries no class information).

    ``forward(features) -> (logits [B, num_classes], x_sem [B, *latent_shape])`` in the head's dtype.
    """

    def __init__(
        self,
        feature_channels: Sequence[int],
        num_classes: int,
        latent_shape: Sequence[int],
        hidden: int = 128,
        resolution: tuple[int, int] | None = None,
        sem_readout: bool = True,
    ):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        latent_shape = tuple(int(v) for v in latent_shape)
        if len(latent_shape) != 3:
            raise ValueError(f"latent_shape must be (C, H, W), got {latent_shape}")
        self.num_classes = num_classes
        self.latent_shape = latent_shape
        res = latent_shape[1:] if resolution is None else tuple(resolution)
        self.aggregator = FeatureAggregator(feature_channels, hidden, res)
        self.classifier = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, num_classes))
        self.to_sem = DenseHead(hidden, latent_shape[0])
        self.sem_readout = nn.Linear(math.prod(latent_shape), num_classes) if sem_readout else None

    def aggregate(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """The fused map ``[B, hidden, h, w]`` shared by every head."""
        return self.aggregator(features)

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        fused = self.aggregate(features)
        logits = self.classifier(fused.mean(dim=(2, 3)))
        x_sem = self.to_sem(fused, self.latent_shape[1:])
        if self.sem_readout is not None:
            logits = logits + self.sem_readout(x_sem.flatten(1))
        return logits, x_sem
