"""Models the demo's evaluation trains beside GenRep, none of which sees a generated image.

* ``SmallCNN``: the discriminative baseline (``cnn_baseline_top1``), trained on the same training
  images with the same batch size and as many optimiser steps as GenRep's supervised stages
  (stage 1 + stage 2). The same network, trained on real images only, is the judge of the
  samples: its accuracy on them (``samples_classifier_top1``) and the Frechet distance of its
  pooled features between samples and real held-out images (``samples_fd``).
* ``train_ce_head``: the CE-only head (``ce_head_top1`` in the robustness rows): a fresh
  ``PerceptionHead`` of the GenRep head's shape trained by cross-entropy alone on the trained
  backbone's frozen features, for stage 1's steps at its learning rate. Beside the GenRep head
  it isolates what the head's training objective (the KL to the generative posterior, with or
  without cross-entropy) does, on the same features; the ablation's "CE-only diffusion head" row
  is the other comparison (features trained without GenRep's losses).
* ``linear_probe_top1``: a multinomial logistic regression (scikit-learn) on frozen features,
  for the linear probe of x_sem.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """Two 3x3 convolutions (32, 64 channels, the second with stride 2), global average pooling,
    one linear layer. ``features(x) [B, 64]`` is the pooled layer (the Frechet distance's
    space); ``forward(x) [B, num_classes]`` the logits. Inputs ``[B, C, H, W]`` in [-1, 1]."""

    feature_dim = 64

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, self.feature_dim, 3, stride=2, padding=1)
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))
        h = F.relu(self.conv2(h))
        return h.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def train_cnn(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    steps: int,
    batch_size: int,
    lr: float = 2e-3,
    seed: int = 0,
) -> SmallCNN:
    """A ``SmallCNN`` trained with AdamW and cross-entropy for ``steps`` batches drawn without
    replacement within each epoch (deterministic given ``seed``); returned in eval mode."""
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SmallCNN(images.shape[1], num_classes).to(images.device)
    return _fit_cross_entropy(
        net,
        lambda idx: net(images[idx]),
        labels,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
    )


def _fit_cross_entropy(
    module: nn.Module,
    logits_of,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> nn.Module:
    """``module`` trained with AdamW (weight decay 1e-4) and cross-entropy for ``steps``
    batches of rows drawn without replacement within each epoch (deterministic given ``seed``);
    ``logits_of(idx)``: the logits of the rows ``idx``. Returned in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    n = labels.shape[0]
    perm, pos = torch.randperm(n, generator=g), 0
    module.train()
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + batch_size].to(labels.device)
        pos += batch_size
        loss = F.cross_entropy(logits_of(idx).float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return module.eval()


@torch.no_grad()
def cnn_outputs(
    net: SmallCNN, images: torch.Tensor, batch_size: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probabilities [N, C], pooled features [N, 64])``, float32 on the CPU."""
    probs, feats = [], []
    for lo in range(0, images.shape[0], batch_size):
        f = net.features(images[lo : lo + batch_size].float())
        probs.append(net.fc(f).softmax(-1).cpu())
        feats.append(f.cpu())
    return torch.cat(probs), torch.cat(feats)


def linear_probe_top1(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor
) -> float:
    """Top-1 on ``test_x`` of a multinomial logistic regression fitted on ``train_x``
    (features flattened per row, standardised with the training rows' mean and std)."""
    from sklearn.linear_model import LogisticRegression

    a = train_x.detach().double().flatten(1).cpu()
    b = test_x.detach().double().flatten(1).cpu()
    mean, std = a.mean(0), a.std(0).clamp_min(1e-8)
    clf = LogisticRegression(max_iter=500)
    clf.fit(((a - mean) / std).numpy(), train_y.cpu().numpy())
    pred = clf.predict(((b - mean) / std).numpy())
    return float((torch.as_tensor(pred) == test_y.cpu()).double().mean())


@torch.no_grad()
def backbone_features(net, images: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
    """The backbone's attention-block feature maps of a noise-free, null-class pass over
    ``images`` (eval mode), as the heads read them: one ``[N, C_i, H_i, W_i]`` per block."""
    from genrep_fast.models import eval_mode

    chunks = []
    with eval_mode(net):
        for lo in range(0, images.shape[0], batch_size):
            x = images[lo : lo + batch_size]
            chunks.append(net.adapter.features(x, net.null_labels(x.shape[0], x.device)))
    return [torch.cat([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def train_ce_head(
    net,
    features: list[torch.Tensor],
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    head_kwargs: dict | None = None,
) -> nn.Module:
    """A fresh ``PerceptionHead`` like ``net.head`` trained with AdamW and cross-entropy alone
    on frozen ``features`` (``backbone_features``) for ``steps`` batches, drawn as ``train_cnn``
    draws them; returned in eval mode. ``head_kwargs``: the config's ``model.head_kwargs``."""
    from genrep_fast.models import PerceptionHead

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = PerceptionHead(
            net.adapter.feature_channels,
            net.num_classes,
            net.adapter.latent_shape,
            **(head_kwargs or {}),
        ).to(labels.device)
    return _fit_cross_entropy(
        head,
        lambda idx: head([f[idx] for f in features])[0],
        labels,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
    )
