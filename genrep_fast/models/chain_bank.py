"""The chain bank: per class, the (mu, sigma) of S reverse chains at the thinned steps.

docs/METHOD.md section 1: ``mu: [C, S*T, *latent]`` and ``sigma: [C, S*T]`` (isotropic) or
``[C, S*T, *latent]`` (diagonal, learned variance), with ``T = len(thinned_steps(N, burn_in,
thin))``; entry ``s*T + j`` is chain ``s`` at the ``j``-th kept step. sigma is clamped below by
``sigma_min`` (default: the smallest std of a noisy step of the chain), never 0. The bank depends
only on the model and the class, so it is built once and refreshed every R training steps.

Storage: ``mu`` in ``dtype`` (float32 or bfloat16); an isotropic ``sigma`` stays float32 (it is
tiny, and bf16 rounding of sigma would shift every log-density by up to D * 2^-9 nats); a diagonal
``sigma`` is stored in ``dtype``.

Likelihoods: ``log_likelihood(x)`` reads ``mu`` / ``sigma`` as they are at each call (nothing
derived from them is kept). For many calls between refreshes, ``prepared()`` gives a
``genrep_fast.PreparedBank`` snapshot that the bank keeps until its own ``build`` / ``refresh`` /
``to`` / ``load`` change it; after writing ``mu`` or ``sigma`` by other means (``dist.broadcast``,
an in-place edit), call ``mark_changed()``.

Seeded and sharded builds: the chains run in model batches of ``batch_size`` chains (class-major:
chain ``j`` of class ``c`` is row ``c*S + j``). With ``seed``, model batch ``b`` draws all its noise
from its own generator seeded ``batch_seed(seed, b)``, so a batch's chains do not depend on which
process computes it or on what it computed before. ``sharded=True`` then splits the model batches
into contiguous blocks, one per rank of the ``torch.distributed`` group (rank ``r`` of ``W`` takes
batches ``[r*nb//W, (r+1)*nb//W)``: about ``C/W`` classes), and an ``all_gather`` of the rows
(their bytes, so any dtype travels exactly) gives every rank the whole bank. Each batch sees the
same inputs and the same shapes whatever the number of ranks, so the bank is bit-identical on 1 and
W ranks (same device kind and thread settings; tests/test_train_ddp.py checks it on 1 vs 2).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import genrep_fast
from genrep_fast._validation import check_int, check_real
from genrep_fast.models.adapters import BackboneAdapter
from genrep_fast.models.ddpm import check_num_steps, min_nonzero_std
from genrep_fast.models.modulation import SemanticModulation
from genrep_fast.models.sampling import DDPMSampler
from genrep_fast.profiling import nvtx_range

BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_META_KEY = "genrep_fast.chain_bank"
_FORMAT_VERSION = 1


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def batch_seed(seed: int, batch: int) -> int:
    """The seed of model batch ``batch``'s generator in a build with ``seed`` (an int64 value)."""
    return (seed * 1_000_003 + batch) % 2**63


def _shard_bounds(num_batches: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous block of model batches that ``rank`` of ``world`` builds."""
    return rank * num_batches // world, (rank + 1) * num_batches // world


class ChainBank:
    """Gaussian-mixture samples of the reverse chains of every class (see the module docstring).

    Build with ``ChainBank.build``; attributes:

    * ``mu``: ``[C, S*T, *latent]`` in ``dtype``;
    * ``sigma``: ``[C, S*T]`` float32, or ``[C, S*T, *latent]`` in ``dtype``;
    * ``timesteps``: ``[T]`` int64 diffusers timesteps of the kept steps;
    * ``steps``: the T kept 0-based positions; ``num_steps``, ``burn_in``, ``thin``,
      ``chains_per_class``, ``sigma_min``, ``guidance_scale``, ``batch_size``.
    """

    def __init__(
        self,
        mu: torch.Tensor,
        sigma: torch.Tensor,
        timesteps: torch.Tensor,
        *,
        num_steps: int,
        burn_in: int,
        thin: int,
        chains_per_class: int,
        sigma_min: float,
        guidance_scale: float = 1.0,
        batch_size: int = 64,
    ):
        self.steps = genrep_fast.thinned_steps(num_steps, burn_in, thin)
        t = len(self.steps)
        if mu.dim() < 3 or mu.shape[1] != chains_per_class * t:
            raise ValueError(
                f"mu must be [C, S*T, *latent] with S*T = {chains_per_class}*{t}, got {tuple(mu.shape)}"
            )
        if tuple(sigma.shape) not in (tuple(mu.shape[:2]), tuple(mu.shape)):
            raise ValueError(
                f"sigma must be [C, S*T] = {list(mu.shape[:2])} or the shape of mu, got "
                f"{list(sigma.shape)}"
            )
        if tuple(timesteps.shape) != (t,):
            raise ValueError(f"timesteps must be [T] = [{t}], got {tuple(timesteps.shape)}")
        self.mu = mu
        self.sigma = sigma
        self.timesteps = timesteps
        self.num_steps = num_steps
        self.burn_in = burn_in
        self.thin = thin
        self.chains_per_class = chains_per_class
        self.sigma_min = float(sigma_min)
        self.guidance_scale = float(guidance_scale)
        self.batch_size = batch_size
        self._prepared: genrep_fast.PreparedBank | None = None

    # ---------------------------------------------------------------- shape facts

    @property
    def num_classes(self) -> int:
        return self.mu.shape[0]

    @property
    def num_samples(self) -> int:
        """T' = S * T, the mixture components per class."""
        return self.mu.shape[1]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.mu.shape[2:])

    @property
    def diagonal(self) -> bool:
        return self.sigma.shape == self.mu.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.mu.dtype

    @property
    def device(self) -> torch.device:
        return self.mu.device

    def to(self, device: torch.device | str) -> ChainBank:
        """Move ``mu``, ``sigma`` (and ``timesteps``) in place; returns self."""
        self.mu = self.mu.to(device)
        self.sigma = self.sigma.to(device)
        self.timesteps = self.timesteps.to(device)
        self.mark_changed()
        return self

    def __repr__(self) -> str:
        return (
            f"ChainBank(C={self.num_classes}, S={self.chains_per_class}, T={len(self.steps)}, "
            f"latent={self.latent_shape}, dtype={self.dtype}, diagonal={self.diagonal}, "
            f"num_steps={self.num_steps}, burn_in={self.burn_in}, thin={self.thin}, "
            f"sigma_min={self.sigma_min:.3g})"
        )

    # ---------------------------------------------------------------- building

    @staticmethod
    def _check_args(
        adapter: object,
        num_classes: object,
        chains_per_class: object,
        batch_size: object,
        dtype: object,
    ) -> None:
        if not isinstance(adapter, BackboneAdapter):
            raise TypeError(f"adapter must be a BackboneAdapter, got {type(adapter).__name__}")
        check_int("num_classes", num_classes, minimum=1)
        check_int("chains_per_class", chains_per_class, minimum=1)
        check_int("batch_size", batch_size, minimum=1)
        if num_classes > adapter.num_classes:
            raise ValueError(
                f"num_classes={num_classes} exceeds the model's num_classes={adapter.num_classes}"
            )
        if dtype not in BANK_DTYPES:
            raise TypeError(f"dtype must be one of {[str(d) for d in BANK_DTYPES]}, got {dtype}")

    @classmethod
    def build(
        cls,
        adapter: BackboneAdapter,
        num_classes: int,
        *,
        num_steps: int,
        burn_in: int = 50,
        thin: int = 2,
        chains_per_class: int = 1,
        batch_size: int = 64,
        dtype: torch.dtype = torch.float32,
        sigma_min: float | None = None,
        modulation: SemanticModulation | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        guidance_scale: float = 1.0,
        seed: int | None = None,
        sharded: bool = False,
        process_group=None,
    ) -> ChainBank:
        """Run ``chains_per_class`` DDPM chains for each class ``0..num_classes-1``.

        Chains of all classes are batched together, ``batch_size`` chains per model call (the
        memory bound; classifier-free guidance doubles the model batch). Everything after
        ``num_classes`` is keyword-only: its several ints (N, burn-in, thin, S, batch size) cannot
        be passed in the wrong order.

        Args:
            adapter: the backbone (run in eval mode, without gradients).
            num_classes: C; the bank covers classes ``0..C-1`` (``<= adapter.num_classes``).
            num_steps: chain length N (``<= num_train_timesteps``).
            burn_in, thin: ``thinned_steps(N, burn_in, thin)`` (``burn_in < N``, ``thin >= 1``).
            chains_per_class: S.
            batch_size: chains per model call.
            dtype: storage dtype of ``mu`` (and of a diagonal ``sigma``).
            sigma_min: lower clamp of sigma; default the smallest std of a noisy step.
            modulation: ``SemanticModulation`` applied at every step (``x_sem := x_t``).
            generator: torch generator for the chains' noise.
            progress: tqdm bars.
            guidance_scale: classifier-free guidance (needs ``adapter.null_class``).
            seed: instead of ``generator``: one generator per model batch, seeded
                ``batch_seed(seed, b)`` (the module docstring); needed by ``sharded``.
            sharded: split the model batches over the ranks of ``process_group`` (default: the
                default ``torch.distributed`` group) and ``all_gather`` the rows: every rank
                returns the whole bank, the same as a one-process build with the same ``seed``.
            process_group: the group of a sharded build.
        """
        cls._check_args(adapter, num_classes, chains_per_class, batch_size, dtype)
        _check_seeding(generator, seed, sharded)
        check_num_steps(adapter.scheduler, num_steps)
        steps = genrep_fast.thinned_steps(num_steps, burn_in, thin)
        if sigma_min is None:
            sigma_min = min_nonzero_std(adapter.scheduler, num_steps)
        sigma_min = check_real("sigma_min", sigma_min)
        if not sigma_min > 0:
            raise ValueError(f"sigma_min must be > 0, got {sigma_min}")
        c, s, t = num_classes, chains_per_class, len(steps)
        shape = (c, s * t, *adapter.latent_shape)
        diagonal = adapter.diagonal_sigma
        sigma_dtype = dtype if diagonal else torch.float32
        # Round sigma_min into the storage dtype first: rounding is monotonic, so every stored
        # sigma is then >= the recorded sigma_min exactly.
        sigma_min = float(torch.tensor(sigma_min, dtype=torch.float64).to(sigma_dtype))
        sampler = DDPMSampler(adapter, num_steps, modulation, guidance_scale)
        bank = cls(
            torch.empty(shape, dtype=dtype, device=adapter.device),
            torch.empty(
                shape if diagonal else shape[:2],
                device=adapter.device,
                dtype=sigma_dtype,
            ),
            sampler.timesteps[steps].clone(),
            num_steps=num_steps,
            burn_in=burn_in,
            thin=thin,
            chains_per_class=s,
            sigma_min=sigma_min,
            guidance_scale=sampler.guidance_scale,
            batch_size=batch_size,
        )
        bank._fill(sampler, range(c), generator, progress, seed, sharded, process_group)
        return bank

    def _fill(
        self,
        sampler: DDPMSampler,
        classes: Sequence[int],
        generator: torch.Generator | None,
        progress: bool,
        seed: int | None = None,
        sharded: bool = False,
        process_group=None,
    ) -> None:
        """(Re)compute the rows of ``classes`` in place (this rank's share of the model batches
        when ``sharded``, then gathered)."""
        s, t = self.chains_per_class, len(self.steps)
        device = sampler.adapter.device
        classes_t = torch.as_tensor(list(classes), dtype=torch.int64)
        labels = classes_t.repeat_interleave(s)  # chain j of class c at c*S + j
        mu_rows = self.mu.view(self.num_classes * s, t, *self.latent_shape)
        sig_rows = self.sigma.view(self.num_classes * s, t, *self.sigma.shape[2:])
        chain_rows = (classes_t[:, None] * s + torch.arange(s)[None, :]).reshape(-1)
        bs = self.batch_size
        num_batches = -(-len(labels) // bs)
        rank, world = 0, 1
        if sharded:
            import torch.distributed as dist

            rank = dist.get_rank(process_group)
            world = dist.get_world_size(process_group)
        first, last = _shard_bounds(num_batches, rank, world)
        with nvtx_range("genrep.bank_refresh"):
            for b in range(first, last):
                lo = b * bs
                if seed is not None:
                    generator = torch.Generator(device)
                    generator.manual_seed(batch_seed(seed, b))
                y = labels[lo : lo + bs].to(device)
                rows = chain_rows[lo : lo + bs].to(self.mu.device)
                _, rec = sampler.sample(
                    y, generator=generator, record_steps=self.steps, progress=progress
                )
                mu_rows[rows] = rec.mu.to(self.mu.dtype)
                sig_rows[rows] = rec.sigma.to(self.sigma.dtype).clamp(min=self.sigma_min)
            if world > 1:
                bounds = [_shard_bounds(num_batches, r, world) for r in range(world)]
                spans = [(f * bs, min(la * bs, len(labels))) for f, la in bounds]
                for held in (mu_rows, sig_rows):
                    idx = chain_rows.to(held.device)
                    _all_gather_rows(held, idx, spans, rank, process_group)
        self.mark_changed()

    def refresh(
        self,
        adapter: BackboneAdapter,
        generator: torch.Generator | None = None,
        progress: bool = False,
        *,
        modulation: SemanticModulation | None = None,
        classes: Sequence[int] | None = None,
        seed: int | None = None,
        sharded: bool = False,
        process_group=None,
    ) -> ChainBank:
        """Recompute the bank in place from the adapter's current weights (same N, burn-in, thin,
        S, dtype, sigma_min, guidance); ``classes`` restricts the refresh to those rows (e.g. a
        rotating subset for large C); ``seed``, ``sharded``, ``process_group`` as in ``build``.
        Returns self."""
        if not isinstance(adapter, BackboneAdapter):
            raise TypeError(f"adapter must be a BackboneAdapter, got {type(adapter).__name__}")
        _check_seeding(generator, seed, sharded)
        if tuple(adapter.latent_shape) != self.latent_shape:
            raise ValueError(
                f"adapter latent_shape {adapter.latent_shape} differs from the bank's {self.latent_shape}"
            )
        if adapter.diagonal_sigma != self.diagonal:
            raise ValueError(
                "adapter's sigma layout (diagonal / isotropic) differs from the bank's"
            )
        if self.num_classes > adapter.num_classes:
            raise ValueError(
                f"the bank has {self.num_classes} classes, the model {adapter.num_classes}"
            )
        if classes is None:
            classes = range(self.num_classes)
        classes = [int(c) for c in classes]
        if any(not 0 <= c < self.num_classes for c in classes):
            raise ValueError(f"classes must be in [0, {self.num_classes}), got {classes}")
        sampler = DDPMSampler(adapter, self.num_steps, modulation, self.guidance_scale)
        self._fill(sampler, classes, generator, progress, seed, sharded, process_group)
        return self

    # ---------------------------------------------------------------- use

    def log_likelihood(self, x: torch.Tensor, **kw) -> torch.Tensor:
        """``genrep_fast.mixture_log_likelihood(x, mu, sigma, **kw)``: ``[B, C]`` (or ``[B, K]``).

        ``x`` and ``mu`` are brought to the wider of their dtypes (a bf16 bank is widened for an
        fp32 ``x``; an fp32 bank is never narrowed). Reads the bank as it is now and derives
        everything per call (the widening included): for repeated calls use
        ``prepared(x.dtype).log_likelihood(x, **kw)``.
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating torch.Tensor, got {type(x).__name__}")
        dt = torch.promote_types(x.dtype, self.mu.dtype)
        return genrep_fast.mixture_log_likelihood(x.to(dt), self.mu.to(dt), self.sigma, **kw)

    def prepared(self, dtype: torch.dtype | None = None) -> genrep_fast.PreparedBank:
        """A ``genrep_fast.PreparedBank`` snapshot of ``(mu, sigma)`` with ``mu`` in ``dtype``
        (default: the bank's), for many likelihood calls between refreshes.

        Taken on the first call and kept (one snapshot; another dtype replaces it) until the bank's
        own ``refresh`` / ``to`` change it, or ``mark_changed()`` is called. It holds a private
        copy of the bank (plus the operands of each backend it is used with), so it is never
        inconsistent; it is only as fresh as the last of those events.
        """
        dt = self.mu.dtype if dtype is None else dtype
        if self._prepared is None or self._prepared.dtype != dt:
            self._prepared = None  # free the old snapshot before copying the bank again
            self._prepared = genrep_fast.prepare_bank(self.mu, self.sigma, dtype=dt)
        return self._prepared

    def mark_changed(self) -> None:
        """Drop the snapshot of ``prepared()``: call after writing ``mu`` or ``sigma`` other than
        through ``refresh`` / ``to`` (e.g. ``dist.broadcast(bank.mu, 0)``)."""
        self._prepared = None

    # ---------------------------------------------------------------- persistence

    def metadata(self) -> dict:
        return {
            "format_version": _FORMAT_VERSION,
            "num_steps": self.num_steps,
            "burn_in": self.burn_in,
            "thin": self.thin,
            "chains_per_class": self.chains_per_class,
            "sigma_min": self.sigma_min,
            "guidance_scale": self.guidance_scale,
            "batch_size": self.batch_size,
            "mu_dtype": _dtype_name(self.mu.dtype),
            "sigma_dtype": _dtype_name(self.sigma.dtype),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write a ``.safetensors`` file (tensors stored bit-exactly, settings as JSON metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "mu": self.mu.detach().contiguous().cpu(),
            "sigma": self.sigma.detach().contiguous().cpu(),
            "timesteps": self.timesteps.detach().contiguous().cpu(),
        }
        save_file(tensors, str(path), metadata={_META_KEY: json.dumps(self.metadata())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> ChainBank:
        """Read a bank written by ``save`` (bit-identical tensors) onto ``device``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no chain bank file at {str(path)!r}")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta_raw = (f.metadata() or {}).get(_META_KEY)
            if meta_raw is None:
                raise ValueError(
                    f"{str(path)!r} is a safetensors file but not a ChainBank (no metadata)"
                )
            meta = json.loads(meta_raw)
            tensors = {k: f.get_tensor(k) for k in ("mu", "sigma", "timesteps")}
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported chain bank format_version {meta.get('format_version')}")
        bank = cls(
            tensors["mu"],
            tensors["sigma"],
            tensors["timesteps"],
            num_steps=meta["num_steps"],
            burn_in=meta["burn_in"],
            thin=meta["thin"],
            chains_per_class=meta["chains_per_class"],
            sigma_min=meta["sigma_min"],
            guidance_scale=meta["guidance_scale"],
            batch_size=meta["batch_size"],
        )
        return bank.to(device)


def _check_seeding(generator, seed, sharded) -> None:
    if seed is not None:
        if generator is not None:
            raise ValueError("pass either generator or seed, not both")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if sharded:
        import torch.distributed as dist

        if seed is None:
            raise ValueError(
                "sharded=True needs seed= (one generator per model batch), not a shared generator"
            )
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("sharded=True needs an initialised torch.distributed group")


def _all_gather_rows(
    rows: torch.Tensor,
    chain_rows: torch.Tensor,
    spans: list[tuple[int, int]],
    rank: int,
    group,
) -> None:
    """Give every rank the rows ``rows[chain_rows[lo:hi]]`` that rank ``r`` computed, ``(lo, hi) =
    spans[r]``, in place: one ``all_gather`` of each rank's rows (padded to the longest span) as
    bytes, so any dtype is sent exactly and gloo needs no bfloat16 support."""
    import torch.distributed as dist

    longest = max(hi - lo for lo, hi in spans)
    if longest == 0:
        return
    lo, hi = spans[rank]
    mine = torch.zeros((longest, *rows.shape[1:]), dtype=rows.dtype, device=rows.device)
    mine[: hi - lo] = rows[chain_rows[lo:hi]]
    as_bytes = mine.view(torch.uint8)
    parts = [torch.empty_like(as_bytes) for _ in spans]
    dist.all_gather(parts, as_bytes, group=group)
    for (lo, hi), part in zip(spans, parts):
        if hi > lo:
            rows[chain_rows[lo:hi]] = part.view(rows.dtype)[: hi - lo]
