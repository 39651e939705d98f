"""One interface over diffusers backbones: a step's Gaussian, the attention blocks, t=0 features.

``BackboneAdapter`` wraps a class-conditional diffusers model and its ``DDPMScheduler``:

* ``UNet2DModel`` (pixel or latent space) conditioned through ``num_class_embeds``;
* ``UNet2DConditionModel`` configured as a class-conditional LDM: ``num_class_embeds`` gives the
  class embedding (added to the time embedding) and, by default, the same embedding is the single
  cross-attention context token (which needs ``cross_attention_dim`` = the time-embedding width);
  a ``context`` callable ``y -> [B, L, cross_attention_dim]`` replaces that;
* ``DiTTransformer2DModel`` (``num_embeds_ada_norm`` classes; with ``out_channels = 2 *
  in_channels`` it learns its variance).

The attention blocks (``attention_block_names``) are the alignment groups of docs/METHOD.md section 3
and the taps of the perception branch: the ``attentions.N`` children of the UNets' down/mid/up
blocks, and the ``transformer_blocks.N`` of a DiT.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Callable, Iterator

import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from genrep_fast.models.ddpm import check_scheduler, ddpm_transition, previous_timesteps
from genrep_fast.profiling import nvtx_range

logger = logging.getLogger("genrep_fast.models")

KINDS = ("unet2d", "unet2d_condition", "dit")
ATTENTION_BACKENDS = ("auto", "sdpa", "xformers")

_UNET_ATTENTION = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+$")
_DIT_BLOCK = re.compile(r"^transformer_blocks\.\d+$")


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


def configure_attention(model: nn.Module, backend: str = "auto") -> str:
    """Choose the attention kernels of a diffusers model and log which one runs.

    ``"auto"``: xformers' memory-efficient attention when xformers is installed, the model is on
    CUDA and enabling it succeeds; torch SDPA (diffusers' ``AttnProcessor2_0``) otherwise.
    ``"sdpa"``: SDPA (undoes an earlier xformers choice). ``"xformers"``: xformers or an error.
    Returns ``"xformers"`` or ``"sdpa"``.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"backend must be one of {list(ATTENTION_BACKENDS)}, got {backend!r}")
    name = type(model).__name__
    why_not = "not requested"
    if backend in ("auto", "xformers"):
        device = _model_device(model)
        if device.type != "cuda":
            why_not = f"the model is on {device.type}, xformers runs on CUDA only"
        else:
            try:
                import xformers.ops  # noqa: F401

                model.enable_xformers_memory_efficient_attention()
                logger.info("attention backend for %s: xformers memory-efficient attention", name)
                return "xformers"
            except Exception as exc:  # ImportError, or xformers built for another torch/GPU
                why_not = f"{type(exc).__name__}: {exc}"
        if backend == "xformers":
            raise RuntimeError(f"attention backend 'xformers' requested for {name}: {why_not}")
    uses_xformers = any(
        "XFormers" in type(getattr(m, "processor", None)).__name__ for m in model.modules()
    )
    if uses_xformers:
        model.disable_xformers_memory_efficient_attention()
    logger.info(
        "attention backend for %s: torch SDPA (scaled_dot_product_attention); xformers: %s",
        name,
        why_not,
    )
    return "sdpa"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model.eval()`` inside the block; every submodule's own training flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _first_tensor(output: object) -> torch.Tensor:
    """The feature tensor of a block's output: a tensor, ``(tensor, ...)`` or a ``.sample`` holder."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot take a feature tensor from a block output of type {type(output)}")


class BackboneAdapter:
    """A class-conditional diffusers backbone with its DDPM scheduler (see the module docstring).

    Attributes:
        model: the diffusers model (trained in place; the adapter holds no parameters of its own).
        scheduler: its ``DDPMScheduler`` (read, never modified by the adapter).
        kind: ``"unet2d"``, ``"unet2d_condition"`` or ``"dit"``.
        latent_shape: ``(C, H, W)`` of the model's input.
        num_classes: class ids ``y`` are in ``[0, num_classes)``.
        null_class: the "no class" id for classifier-free guidance, or None (no guidance).
        learned_variance: the model outputs ``2C`` channels (noise, variance interpolation).
        attention_block_names: module names of the attention blocks, in forward order.
        attention_backend: ``"sdpa"`` or ``"xformers"`` (see ``configure_attention``).
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler: DDPMScheduler,
        *,
        kind: str,
        num_classes: int | None = None,
        null_class: int | None = None,
        context: Callable[[torch.Tensor], torch.Tensor] | None = None,
        attention_backend: str = "auto",
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        expected = {
            "unet2d": UNet2DModel,
            "unet2d_condition": UNet2DConditionModel,
            "dit": DiTTransformer2DModel,
        }[kind]
        if not isinstance(model, expected):
            raise TypeError(
                f"model: kind={kind!r} needs a {expected.__name__}, got {type(model).__name__}"
            )
        self.model = model
        self.scheduler = check_scheduler(scheduler)
        self.kind = kind
        cfg = model.config
        size = cfg.sample_size
        if size is None:
            raise ValueError("model.config.sample_size is None; the adapter needs the latent size")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape: tuple[int, int, int] = (int(cfg.in_channels), int(h), int(w))

        table = self._class_table()
        rows = table.num_embeddings
        if kind == "dit":
            native = int(cfg.num_embeds_ada_norm)
            native_null = native if rows == native + 1 else None
        else:
            native, native_null = rows, None
        self.num_classes = native if num_classes is None else int(num_classes)
        self.null_class = native_null if null_class is None else int(null_class)
        if not 1 <= self.num_classes <= rows:
            raise ValueError(
                f"num_classes={self.num_classes} must be in [1, {rows}] (the class embedding rows)"
            )
        if self.null_class is not None and not 0 <= self.null_class < rows:
            raise ValueError(
                f"null_class={self.null_class} is not a row of the class embedding ({rows})"
            )
        # A caller may count the null row as a class (num_classes = C + 1); that is allowed, the
        # null id then simply passes the class-id checks too.

        out_ch = int(cfg.out_channels if cfg.out_channels is not None else cfg.in_channels)
        c = self.latent_shape[0]
        if out_ch not in (c, 2 * c):
            raise ValueError(
                f"model.config.out_channels={out_ch} must be in_channels={c} or 2*in_channels "
                "(noise + learned variance)"
            )
        self.learned_variance = out_ch == 2 * c
        self.diagonal_sigma = self.learned_variance and scheduler.config.variance_type in (
            "learned",
            "learned_range",
        )
        if scheduler.config.variance_type == "learned_range" and not self.learned_variance:
            raise ValueError(
                "scheduler.config.variance_type='learned_range' needs a model that learns its "
                f"variance (out_channels = 2*in_channels = {2 * c}); this model has {out_ch}"
            )

        self._context = context
        if kind == "unet2d_condition" and context is None:
            ctx_dim = cfg.cross_attention_dim
            if ctx_dim != table.embedding_dim:
                raise ValueError(
                    "UNet2DConditionModel: the class embedding (width "
                    f"{table.embedding_dim}) is used as the cross-attention context by default, which "
                    f"needs cross_attention_dim={table.embedding_dim}, got {ctx_dim}; pass "
                    "context=callable(y) -> [B, L, cross_attention_dim] instead"
                )

        self.attention_block_names: list[str] = self._find_attention_blocks()
        if not self.attention_block_names:
            raise ValueError(f"{type(model).__name__} has no attention blocks; GenRep taps them")
        self.attention_backend = configure_attention(model, attention_backend)
        self._feature_channels: list[int] | None = None

    # ---------------------------------------------------------------- constructors

    @classmethod
    def unet2d(cls, model: UNet2DModel, scheduler: DDPMScheduler, **kw) -> BackboneAdapter:
        return cls(model, scheduler, kind="unet2d", **kw)

    @classmethod
    def unet2d_condition(
        cls, model: UNet2DConditionModel, scheduler: DDPMScheduler, **kw
    ) -> BackboneAdapter:
        return cls(model, scheduler, kind="unet2d_condition", **kw)

    @classmethod
    def dit(cls, model: DiTTransformer2DModel, scheduler: DDPMScheduler, **kw) -> BackboneAdapter:
        return cls(model, scheduler, kind="dit", **kw)

    # ---------------------------------------------------------------- structure

    def _class_table(self) -> nn.Embedding:
        if self.kind == "dit":
            if self.model.config.num_embeds_ada_norm is None:
                raise ValueError(
                    "DiTTransformer2DModel: num_embeds_ada_norm is None (not class-conditional)"
                )
            emb = self.model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
        else:
            emb = getattr(self.model, "class_embedding", None)
        if not isinstance(emb, nn.Embedding):
            raise ValueError(
                f"{type(self.model).__name__} is not class-conditional through a class-embedding "
                "table (set num_class_embeds=C and class_embed_type=None)"
            )
        return emb

    def _find_attention_blocks(self) -> list[str]:
        pattern = _DIT_BLOCK if self.kind == "dit" else _UNET_ATTENTION
        return [name for name, _ in self.model.named_modules() if pattern.match(name)]

    def attention_blocks(self) -> dict[str, nn.Module]:
        """``{name: module}`` of the attention blocks, in forward order."""
        # get_submodule walks one path; dict(named_modules()) would visit the whole model
        return {n: self.model.get_submodule(n) for n in self.attention_block_names}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters of each attention block (the alignment groups)."""
        return {n: list(m.parameters()) for n, m in self.attention_blocks().items()}

    @property
    def device(self) -> torch.device:
        return _model_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return _model_dtype(self.model)

    @property
    def feature_channels(self) -> list[int]:
        """Channels of each ``features()`` map (found once with a batch-1 dry run)."""
        if self._feature_channels is None:
            x = torch.zeros((1, *self.latent_shape), device=self.device, dtype=self.dtype)
            y = torch.zeros(1, dtype=torch.int64, device=self.device)
            with torch.no_grad():
                self._feature_channels = [f.shape[1] for f in self.features(x, y)]
        return list(self._feature_channels)

    def configure_attention(self, backend: str = "auto") -> str:
        """Re-run the backend choice (e.g. after moving the model to CUDA)."""
        self.attention_backend = configure_attention(self.model, backend)
        return self.attention_backend

    # ---------------------------------------------------------------- checks

    def check_latents(self, name: str, x: object) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"{name} must be [B, *latent_shape] = [B, {', '.join(map(str, self.latent_shape))}], "
                f"got shape {tuple(x.shape)}"
            )
        return x

    def check_labels(
        self, y: object, batch: int, *, allow_null: bool = False, check_values: bool = True
    ) -> torch.Tensor:
        """``y`` as ``[batch]`` int64 class ids on the model's device. ``check_values=False``
        checks type, dtype and shape only: the range check reads values back (a host sync)."""
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a torch.Tensor of class ids, got {type(y).__name__}")
        if y.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"y must be int64 or int32 class ids, got {y.dtype}")
        if tuple(y.shape) != (batch,):
            raise ValueError(f"y must be [B] = [{batch}], got shape {tuple(y.shape)}")
        if check_values and y.numel():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.num_classes:
                ok_null = allow_null and self.null_class is not None
                bad = (y < 0) | (y >= self.num_classes)
                if ok_null:
                    bad &= y != self.null_class
                if bool(bad.any()):
                    raise ValueError(
                        f"y: class ids must be in [0, num_classes={self.num_classes}), got values in "
                        f"[{lo}, {hi}]"
                    )
        return y.to(device=self.device, dtype=torch.int64)

    def _timesteps(self, t: object, batch: int, check_values: bool = True) -> torch.Tensor:
        """``t`` (int, 0-d or [B] integer tensor) as a ``[B]`` int64 tensor on the model's device;
        ``check_values=False`` skips the range check of a tensor's values (a host sync)."""
        if isinstance(t, bool):
            raise TypeError("t must be an int or an integer tensor, got bool")
        n = int(self.scheduler.config.num_train_timesteps)
        if isinstance(t, int):
            if not 0 <= t < n:  # checked on the host: no read back of a tensor
                raise ValueError(f"t: timesteps must be in [0, num_train_timesteps={n}), got {t}")
            # made on the device: no copy from the host (a blocking one waits for the stream)
            return torch.full((batch,), t, device=self.device, dtype=torch.int64)
        if not isinstance(t, torch.Tensor) or t.is_floating_point() or t.is_complex():
            raise TypeError(f"t must be an int or an integer tensor, got {t!r}")
        if t.dim() == 0:
            t = t.expand(batch)
        if tuple(t.shape) != (batch,):
            raise ValueError(f"t must be a scalar or [B] = [{batch}], got shape {tuple(t.shape)}")
        if check_values and t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(
                f"t: timesteps must be in [0, num_train_timesteps={n}), got {t.tolist()}"
            )
        return t.to(device=self.device, dtype=torch.int64)

    # ---------------------------------------------------------------- model calls

    def _forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.kind == "unet2d":
            return self.model(x, t, class_labels=y, return_dict=False)[0]
        if self.kind == "unet2d_condition":
            if self._context is not None:
                ctx = self._context(y)
            else:
                ctx = self.model.class_embedding(y)[:, None, :]
            ctx = ctx.to(self.dtype)
            return self.model(x, t, encoder_hidden_states=ctx, class_labels=y, return_dict=False)[0]
        return self.model(x, timestep=t, class_labels=y, return_dict=False)[0]

    def _unchecked_timesteps(self, t: int | torch.Tensor, batch: int) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            return torch.full((batch,), t, device=self.device, dtype=torch.int64)
        return t.to(device=self.device, dtype=torch.int64).expand(batch)

    def predict(
        self,
        x_t: torch.Tensor,
        t: int | torch.Tensor,
        y: torch.Tensor,
        *,
        validate: bool = True,
        check_values: bool = True,
    ) -> torch.Tensor:
        """The raw model output for ``x_t: [B, *latent]`` at diffusers timesteps ``t`` (int or
        ``[B]``) and class ids ``y: [B]`` (the null class allowed): ``[B, C, H, W]`` or
        ``[B, 2C, H, W]`` (learned variance), in the model's dtype. Runs in the caller's grad mode
        and the model's train/eval mode (a DiT in train mode drops labels for classifier-free
        guidance, as it was trained). ``validate=False`` skips the checks (and their host syncs);
        ``check_values=False`` keeps the type/shape checks but skips the value ranges of ``y`` and
        ``t`` (the host syncs), for a caller whose ids are known good (the trainer's step)."""
        b = x_t.shape[0]
        if not validate:
            return self._forward(x_t, self._unchecked_timesteps(t, b), y.to(self.device))
        self.check_latents("x_t", x_t)
        y = self.check_labels(y, b, allow_null=True, check_values=check_values)
        return self._forward(x_t, self._timesteps(t, b, check_values), y)

    def _guided(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float
    ) -> torch.Tensor:
        if scale == 1.0:
            return self._forward(x, t, y)
        b, c = x.shape[0], self.latent_shape[0]
        null = torch.full_like(y, self.null_class)
        out = self._forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out[:b], out[b:]
        # Guidance acts on the noise prediction; the learned variance is the conditional one
        # (as in diffusers' DiTPipeline).
        eps = uncond[:, :c] + scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat([eps, cond[:, c:]], dim=1) if self.learned_variance else eps

    def check_guidance(self, guidance_scale: object) -> float:
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"guidance_scale must be a real number, got {guidance_scale!r}")
        g = float(guidance_scale)
        if g != 1.0 and self.null_class is None:
            raise ValueError(
                f"guidance_scale={g} needs a null class (classifier-free guidance) but this "
                f"{type(self.model).__name__} has none; use guidance_scale=1.0 or pass null_class="
            )
        return g

    def step_distribution(
        self,
        x_t: torch.Tensor,
        t: int | torch.Tensor,
        y: torch.Tensor,
        *,
        prev_t: int | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        validate: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The DDPM transition ``p(x_prev | x_t, y) = N(mu, sigma^2)``.

        Args:
            x_t: ``[B, *latent]``.
            t: diffusers timestep(s), int or ``[B]``.
            y: ``[B]`` class ids.
            prev_t: the timestep the step goes to (-1 after the last); default: the scheduler's
                ``previous_timestep`` in its current state (``t - 1`` before ``set_timesteps``).
            guidance_scale: classifier-free guidance on the noise prediction (needs ``null_class``).
            validate: check shapes and class ids (host syncs); the sampler turns it off per step.

        Returns:
            ``mu: [B, *latent]`` and ``sigma: [B]`` (isotropic) or ``[B, *latent]`` (learned,
            diagonal), float32 (float64 for float64 ``x_t``); sigma is 0 at ``t == 0``.
        """
        b = x_t.shape[0]
        if validate:
            self.check_latents("x_t", x_t)
            y = self.check_labels(y, b, allow_null=True)
            guidance_scale = self.check_guidance(guidance_scale)
            t = self._timesteps(t, b)
        else:
            t = self._unchecked_timesteps(t, b)
        if prev_t is None:
            prev = previous_timesteps(self.scheduler, t)
        else:
            prev = prev_t if isinstance(prev_t, torch.Tensor) else torch.tensor(prev_t)
            prev = prev.to(device=t.device, dtype=torch.int64).expand(b)
        out = self._guided(x_t, t, y, guidance_scale)
        return ddpm_transition(
            self.scheduler, x_t, t, out, prev, learned_variance=self.learned_variance
        )

    # ---------------------------------------------------------------- features

    def _feature_map(self, out: torch.Tensor) -> torch.Tensor:
        if out.dim() == 4:
            return out
        if out.dim() == 3 and self.kind == "dit":  # tokens [B, N, D], row-major patches
            p = int(self.model.config.patch_size)
            h, w = self.latent_shape[1] // p, self.latent_shape[2] // p
            b, n, d = out.shape
            if n != h * w:
                raise ValueError(f"DiT block output has {n} tokens, expected {h}x{w}")
            return out.reshape(b, h, w, d).permute(0, 3, 1, 2)
        raise ValueError(f"unexpected attention-block output shape {tuple(out.shape)}")

    def features(
        self,
        x0: torch.Tensor,
        y: torch.Tensor,
        *,
        t: int | torch.Tensor = 0,
        return_output: bool = False,
        validate: bool = True,
        check_values: bool = True,
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor]:
        """Attention-block outputs of a noise-free (``t = 0``) class-conditioned pass.

        Forward hooks on ``attention_block_names`` capture each block's output; they are removed
        before returning, also when the pass raises. Label dropout of a DiT is suspended for the
        pass (its class embedder is put in eval mode and restored), so the features always see
        the true class. Gradients flow as in the caller's grad mode.

        Args:
            x0: ``[B, *latent]`` clean images / latents.
            y: ``[B]`` class ids (``null_class`` allowed: a class-agnostic pass, e.g. to
                classify an image whose class is unknown).
            t: the timestep of the pass (default 0).
            return_output: also return the model output of the same pass.
            validate: check shapes, class ids and t (host syncs); False in a hot loop.
            check_values: with ``validate``, False checks types and shapes only, not the value
                ranges of ``y`` and ``t`` (no host sync): for ids known to be good.

        Returns:
            One ``[B, C_i, H_i, W_i]`` map per attention block (DiT tokens reshaped to the patch
            grid), in the model's dtype; with ``return_output``, ``(features, output)``.
        """
        if validate:
            self.check_latents("x0", x0)
            y = self.check_labels(y, x0.shape[0], allow_null=True, check_values=check_values)
            tt = self._timesteps(t, x0.shape[0], check_values)
        else:
            y = y.to(self.device)
            tt = self._unchecked_timesteps(t, x0.shape[0])
        captured: dict[str, torch.Tensor] = {}

        def hook(name: str, module: nn.Module, args: object, output: object) -> None:
            if name in captured:
                raise RuntimeError(f"attention block {name} ran twice in one forward pass")
            captured[name] = _first_tensor(output)

        blocks = self.attention_blocks()
        handles = []
        label_dropout = []
        if self.kind == "dit":
            label_dropout = [
                m for m in self.model.modules() if isinstance(m, LabelEmbedding) and m.training
            ]
        try:
            for m in label_dropout:
                m.training = False
            for name, module in blocks.items():
                handles.append(module.register_forward_hook(functools.partial(hook, name)))
            with nvtx_range("genrep.features"):
                out = self._forward(x0, tt, y)
        finally:
            for h in handles:
                h.remove()
            for m in label_dropout:
                m.training = True
        missing = [n for n in blocks if n not in captured]
        if missing:
            raise RuntimeError(f"attention blocks {missing} did not run in the forward pass")
        feats = [self._feature_map(captured[n]) for n in blocks]
        return (feats, out) if return_output else feats

    def __repr__(self) -> str:
        return (
            f"BackboneAdapter(kind={self.kind!r}, model={type(self.model).__name__}, "
            f"latent_shape={self.latent_shape}, num_classes={self.num_classes}, "
            f"null_class={self.null_class}, learned_variance={self.learned_variance}, "
            f"blocks={len(self.attention_block_names)}, attention={self.attention_backend!r})"
        )


def make_adapter(model: nn.Module, scheduler: DDPMScheduler, **kw) -> BackboneAdapter:
    """``BackboneAdapter`` of the kind the model's class implies."""
    if isinstance(model, UNet2DConditionModel):
        return BackboneAdapter.unet2d_condition(model, scheduler, **kw)
    if isinstance(model, UNet2DModel):
        return BackboneAdapter.unet2d(model, scheduler, **kw)
    if isinstance(model, DiTTransformer2DModel):
        return BackboneAdapter.dit(model, scheduler, **kw)
    raise TypeError(
        "model must be a diffusers UNet2DModel, UNet2DConditionModel or DiTTransformer2DModel, got "
        f"{type(model).__name__}"
    )
