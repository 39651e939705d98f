"""The GenRep network of the trainer: a diffusion backbone (through ``BackboneAdapter``), the
perception head and the semantic modulation, plus the losses of the three stages.

Class ids: the backbone gets one class-embedding row more than there are classes; row ``C`` is
the *null* class. The perception pass (``GenRepNet.perceive``) always conditions on it, because a
classifier cannot condition on the label it has to predict; generation conditions on the class
(with label dropout to the null class while training, as DiT does for classifier-free guidance).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from genrep_fast import mixture_log_likelihood, posterior_kl_loss
from genrep_fast.models.ddpm import ddpm_transition, posterior_coefficients
from genrep_fast.train.config import TrainConfig


class GenRepNet(nn.Module):
    """``backbone`` (the diffusers model), ``head`` (PerceptionHead), ``modulation``
    (SemanticModulation); ``adapter`` is the BackboneAdapter over ``backbone``."""

    def __init__(self, adapter, head: nn.Module, modulation: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = adapter.model
        self.head = head
        self.modulation = modulation
        self.adapter = adapter  # plain attribute: holds no parameters of its own
        self.num_classes = num_classes
        self.null_class = num_classes
        # Names of the class ids (an image folder's sub-folders); the trainer sets them from its
        # training set, checkpoints keep them (meta "class_names").
        self.class_names: list[str] = [str(i) for i in range(num_classes)]
        # The teacher's bandwidth chosen by the trainer (diffusion.sigma_min: auto; 0: none yet). A
        # buffer, so it travels with the weights to evaluation, sampling and classification.
        self.register_buffer("teacher_bandwidth", torch.zeros((), dtype=torch.float64))

    @property
    def scheduler(self) -> DDPMScheduler:
        return self.adapter.scheduler

    @property
    def latent_channels(self) -> int:
        return self.adapter.latent_shape[0]

    def null_labels(self, batch: int, device: torch.device) -> torch.Tensor:
        return torch.full((batch,), self.null_class, dtype=torch.int64, device=device)

    def perceive(
        self, x0: torch.Tensor, *, check_values: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, C], x_sem [B, *latent])`` of a noise-free, null-class pass
        (``check_values=False``: the adapter's checks without a host sync)."""
        feats = self.adapter.features(
            x0, self.null_labels(x0.shape[0], x0.device), check_values=check_values
        )
        logits, x_sem = self.head(feats)
        return logits.float(), x_sem

    def copy(self) -> GenRepNet:
        return copy.deepcopy(self)


def class_names_for(names: object, num_classes: int) -> list[str]:
    """``num_classes`` display names: ``names`` (a dataset's ``class_names`` or a checkpoint's)
    where given, ``str(i)`` for a class id without one (also for an old checkpoint without names)."""
    given = [str(n) for n in names] if isinstance(names, (list, tuple)) else []
    return given[:num_classes] + [str(i) for i in range(len(given), num_classes)]


def build_network(cfg: TrainConfig, device: torch.device) -> GenRepNet:
    """The network ``cfg.model`` describes, on ``device`` (float32 weights)."""
    from genrep_fast.models import BackboneAdapter, PerceptionHead, SemanticModulation

    m, d = cfg.model, cfg.diffusion
    c = m.num_classes
    scheduler = DDPMScheduler(
        num_train_timesteps=d.num_train_timesteps,
        beta_schedule=d.beta_schedule,
        variance_type="learned_range" if m.kind == "dit" else "fixed_small",
        # pixels live in [-1, 1]; latents (shards or model.vae's) do not
        clip_sample=cfg.data.kind != "latents" and not cfg.model.vae,
    )
    if m.pretrained:
        from diffusers import DiTTransformer2DModel, UNet2DModel

        cls = DiTTransformer2DModel if m.kind == "dit" else UNet2DModel
        try:
            model = cls.from_pretrained(m.pretrained, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(
                f"model.pretrained: cannot load a {cls.__name__} from {m.pretrained!r} ({exc})"
            ) from None
    elif m.kind == "dit":
        from genrep_fast.models import tiny_dit

        model = tiny_dit(
            sample_size=m.sample_size, in_channels=m.in_channels, num_classes=c, **m.factory_kwargs
        )
    else:
        from genrep_fast.models import tiny_unet2d

        # one extra class-embedding row: the null class
        model = tiny_unet2d(
            sample_size=m.sample_size,
            in_channels=m.in_channels,
            num_classes=c + 1,
            **m.factory_kwargs,
        )
    model = _as_model(model).to(device)
    # Row C of the class embedding is the null class (label dropout trains it): classifier-free
    # guidance (DDPMSampler(guidance_scale=...)) uses it.
    if m.kind == "dit":
        adapter = BackboneAdapter.dit(model, scheduler, num_classes=c + 1, null_class=c)
    else:
        adapter = BackboneAdapter.unet2d(model, scheduler, num_classes=c + 1, null_class=c)
    head = PerceptionHead(adapter.feature_channels, c, adapter.latent_shape, **m.head_kwargs)
    modulation = SemanticModulation(adapter.latent_shape[0], **m.modulation_kwargs)
    return GenRepNet(adapter, head, modulation, c).to(device)


def _as_model(obj) -> nn.Module:
    # A factory may hand back an adapter rather than the bare diffusers model.
    return obj.model if hasattr(obj, "model") and not isinstance(obj, nn.Module) else obj


# ---------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------


def sample_noising(
    net: GenRepNet, x0: torch.Tensor, num_steps: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t, prev_t, noise, x_t)``: t uniform over the training timesteps, prev_t one reverse-chain
    stride (num_train_timesteps // num_steps) earlier (-1 past the start)."""
    n_train = int(net.scheduler.config.num_train_timesteps)
    b = x0.shape[0]
    t = torch.randint(0, n_train, (b,), generator=generator, device=generator.device).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    prev = t - max(1, n_train // num_steps)
    prev = torch.where(prev < 0, torch.full_like(prev, -1), prev)
    x_t = net.scheduler.add_noise(x0, noise, t)
    return t, prev, noise, x_t


def drop_labels(
    net: GenRepNet, y: torch.Tensor, p: float, generator: torch.Generator
) -> torch.Tensor:
    if p <= 0:
        return y
    drop = torch.rand(y.shape, generator=generator, device=generator.device).to(y.device) < p
    return torch.where(drop, torch.full_like(y, net.null_class), y)


def _posterior_vlb(net, x0, x_t, t, prev, mu_p, sigma_p):
    """Mean KL(q(x_prev | x_t, x0) || N(mu_p, sigma_p^2)) per value over the noisy transitions
    (prev_t >= 0; the step to x_0 has no variance to score). q is DDPM's true posterior (eq. 7)."""
    shape = (-1,) + (1,) * (x0.dim() - 1)
    q = posterior_coefficients(net.scheduler, t, prev, torch.float32)
    mu_q = q.mean(x0.float(), x_t.float())
    keep = (prev >= 0).view(shape).float()
    sq = q.variance.sqrt().view(shape)
    sq = torch.where(keep > 0, sq, torch.ones_like(sq))
    sp = sigma_p.view(shape) if sigma_p.dim() == 1 else sigma_p
    sp = torch.where(keep > 0, sp, torch.ones_like(sp))
    kl = torch.log(sp / sq) + (sq.square() + (mu_q - mu_p).square()) / (2 * sp.square()) - 0.5
    return (kl * keep).sum() / (keep.sum() * x0[0].numel()).clamp_min(1)


def generation_loss(
    net: GenRepNet,
    x0: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
    cfg: TrainConfig,
    x_sem: torch.Tensor | None = None,
    *,
    check_values: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """L_genera = L_LDM (+ L_rep_align with ``x_sem``), docs/METHOD.md section 2.

    Without ``x_sem`` (stage 0, stage 1's ``keep_diffusion`` term, or the ablation without
    semantic generation) this is the plain
    DDPM noise-prediction loss (plus the variance term of a learned-variance model). With it, the
    modulated transition ``(mu', sigma') = modulation(mu, sigma, x_t, s, t)`` is scored (``s`` is
    ``x_t`` or ``x_sem`` by ``loss.sem_input``): its
    mean correction in noise units, ``eps_eff = eps_hat - (mu' - mu) / s_t``, enters the MSE
    (identical to the plain loss while the modulation is zero), ``sigma'`` enters a KL to the true
    posterior with the mean detached (weight ``loss.vlb_weight``), and the generation path's
    noisy-input features, projected by the head, are aligned to ``x_sem`` (L_rep_align).

    ``check_values=False`` (the trainer's step, whose labels were checked once per dataset and
    whose timesteps are drawn in range): no value check, so no host sync.
    """
    from genrep_fast.models import rep_align_loss

    t, prev, noise, x_t = sample_noising(net, x0, cfg.diffusion.num_steps, generator)
    y_in = drop_labels(net, y, cfg.loss.label_dropout, generator)
    c = net.latent_channels
    # Detached tensors, not floats: converting here would sync the host every step; the trainer
    # converts only when it logs.
    parts: dict[str, torch.Tensor] = {}
    if x_sem is None:
        out = net.adapter.predict(x_t, t, y_in, check_values=check_values)
        eps_hat = out[:, :c].float()
        loss = F.mse_loss(eps_hat, noise)
        parts["ldm"] = loss.detach()
        if net.adapter.learned_variance:
            mu, sigma = ddpm_transition(
                net.scheduler,
                x_t,
                t,
                torch.cat([eps_hat.detach(), out[:, c:].float()], 1),
                prev,
                learned_variance=True,
            )
            vlb = _posterior_vlb(net, x0, x_t, t, prev, mu, sigma)
            loss = loss + cfg.loss.vlb_weight * vlb
            parts["vlb"] = vlb.detach()
        return loss, parts

    feats, out = net.adapter.features(x_t, y_in, t=t, return_output=True, check_values=check_values)
    eps_hat = out[:, :c].float()
    mu, sigma = ddpm_transition(
        net.scheduler, x_t, t, out.float(), prev, learned_variance=net.adapter.learned_variance
    )
    sigma = sigma.clamp_min(1e-6)
    # The modulation's input: x_t, as the sampler feeds it (loss.sem_input: xt), or the clean
    # image's x_sem (x0: what the sampler cannot compute).
    sem_in = x_t if cfg.loss.sem_input == "xt" else x_sem.detach().float()
    mu_mod, sigma_mod = net.modulation(mu, sigma, x_t, sem_in, t)
    scale = posterior_coefficients(net.scheduler, t, prev, mu.dtype).eps_scale
    scale = scale.view(-1, *([1] * (x0.dim() - 1)))
    eps_eff = eps_hat - (mu_mod - mu) / scale
    ldm = F.mse_loss(eps_eff, noise)
    vlb = _posterior_vlb(net, x0, x_t, t, prev, mu_mod.detach(), sigma_mod)
    _, h = net.head(feats)
    rep = rep_align_loss(h.float(), x_sem.detach().float())
    loss = ldm + cfg.loss.vlb_weight * vlb + cfg.loss.rep_align_weight * rep
    parts.update(ldm=ldm.detach(), vlb=vlb.detach(), rep_align=rep.detach())
    return loss, parts


def build_chain_bank(
    net: GenRepNet,
    cfg: TrainConfig,
    generator: torch.Generator | None,
    *,
    modulated: bool,
    progress: bool = False,
    seed: int | None = None,
    sharded: bool = False,
    sigma_min: float | None = None,
):
    """The chain bank of ``net`` for every class with ``cfg.diffusion``'s settings (training's
    refresh and evaluation share this one recipe). ``modulated``: sample with the semantic
    modulation (x_sem := x_t). ``seed`` (with ``generator=None``) and ``sharded``: see
    ``ChainBank.build`` (training builds its share of the model batches on each rank).
    ``sigma_min``: the clamp, in place of ``bank_sigma_min``'s."""
    from genrep_fast.models import ChainBank

    d = cfg.diffusion
    if sigma_min is None:
        sigma_min = bank_sigma_min(net, cfg)
    return ChainBank.build(
        net.adapter,
        net.num_classes,
        num_steps=d.num_steps,
        burn_in=d.burn_in,
        thin=d.thin,
        chains_per_class=d.chains_per_class,
        batch_size=d.bank_batch_size,
        dtype=torch.bfloat16 if d.bank_dtype == "bfloat16" else torch.float32,
        sigma_min=sigma_min,
        modulation=net.modulation if modulated else None,
        generator=generator,
        progress=progress,
        seed=seed,
        sharded=sharded,
    )


def bank_sigma_min(net: GenRepNet, cfg: TrainConfig) -> float | None:
    """The bank's sigma clamp: ``diffusion.sigma_min`` (None: the scheduler's default), or with
    ``"auto"`` the bandwidth the trainer chose for ``net`` (its ``teacher_bandwidth``)."""
    s = cfg.diffusion.sigma_min
    if s != "auto":
        return s
    h = float(net.teacher_bandwidth)
    if not h > 0:
        raise ValueError(
            'diffusion.sigma_min: "auto", but this network has no chosen bandwidth yet (the '
            "trainer chooses it at each bank build of stages 1 and 2); set a number instead"
        )
    return h


def candidate_classes(logits: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, k]``: the head's top-k classes with the label in place of the last when missing."""
    top = logits.detach().topk(k, dim=1).indices
    has = (top == y[:, None]).any(1)
    top[:, -1] = torch.where(has, top[:, -1], y)
    return top


def perception_loss(
    net: GenRepNet,
    x0: torch.Tensor,
    y: torch.Tensor,
    bank,
    cfg: TrainConfig,
    backend: str,
    timer=None,
    *,
    check_values: bool = True,
    dc_teacher=None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """L_percept = CE(logits, y) + w * KL(p(y|x) || softmax(logits)); returns (loss, logits, parts).

    The teacher ``p(y|x)`` is the class posterior of the chain bank's Gaussian mixture, computed
    from ``bank.prepared()`` (a ``ChainBank``'s snapshot, taken once per refresh); with
    ``loss.teacher: diffusion_classifier`` it is ``softmax(dc_teacher(x0))``, the Diffusion
    Classifier's ``[B, C]`` logits (``genrep_fast.train.dc.dc_teacher_log_probs``).
    ``check_values=False``: no value check of the labels and candidate classes (no host sync).
    """
    logits, _ = net.perceive(x0, check_values=check_values)
    ce = F.cross_entropy(logits, y)
    parts = {"ce": ce.detach()}
    loss = ce
    if cfg.loss.gen_distil and cfg.loss.teacher == "diffusion_classifier":
        if dc_teacher is None:
            raise ValueError("loss.teacher: 'diffusion_classifier' needs dc_teacher=callable(x0)")
        ctx = timer("posterior") if timer is not None else _null()
        with ctx:
            kl = posterior_kl_loss(logits, dc_teacher(x0.detach()), validate=False)
        loss = loss + cfg.loss.gen_distil_weight * kl
        parts["kl"] = kl.detach()
    elif cfg.loss.gen_distil and bank is not None:
        ctx = timer("posterior") if timer is not None else _null()
        with ctx:
            k = cfg.diffusion.candidate_classes
            idx = candidate_classes(logits, y, k) if k else None
            # The bank's snapshot, prepared once per refresh: no per-step conversion of the bank.
            prepared = bank.prepared()
            ll = mixture_log_likelihood(
                x0.detach().to(prepared.dtype),
                prepared,
                class_index=idx,
                precision=cfg.diffusion.precision,
                backend=backend,
                validate=False,
            )
            kl = posterior_kl_loss(logits, ll, class_index=idx, validate=check_values)
        loss = loss + cfg.loss.gen_distil_weight * kl
        parts["kl"] = kl.detach()
    return loss, logits, parts


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
