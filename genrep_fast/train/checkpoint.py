"""Checkpoints: tensors in safetensors, everything else in a small JSON; written atomically.

Layout of ``<run>/checkpoints/``::

    step-000400/state.safetensors   model, EMA teacher, optimiser moments, RNG states, chain bank
    step-000400/meta.json           stage, step, config, optimiser hyper-parameters, Python/NumPy
                                    RNG states, and the size + SHA-256 of state.safetensors
    latest                          the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder and renamed into place only when both files
are complete and flushed, then ``latest`` is replaced atomically; a crash at any point leaves the
previous checkpoint and ``latest`` intact. Loading never unpickles: safetensors + JSON only, and
the tensor file's checksum is verified before use, so a truncated or corrupted file is reported
as such (``CheckpointError``) instead of loading garbage.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
LATEST = "latest"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prepare_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two entries sharing storage (safetensors refuses shared tensors)."""
    out = {}
    seen: set[tuple[int, int]] = set()
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"checkpoint tensor {k!r} is a {type(v).__name__}, not a tensor")
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in seen:
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        out[k] = t
    return out


def save_checkpoint(
    root: str | Path, name: str, tensors: dict[str, torch.Tensor], meta: dict, keep: int = 2
) -> Path:
    """Write ``root/name/`` atomically, point ``root/latest`` at it, keep the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state_path = tmp / STATE_FILE
        save_file(_prepare_tensors(tensors), str(state_path))
        with open(state_path, "rb+") as f:
            os.fsync(f.fileno())
        meta = dict(meta)
        meta["format_version"] = FORMAT_VERSION
        meta["state_bytes"] = state_path.stat().st_size
        meta["state_sha256"] = _sha256(state_path)
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            old = root / f".{name}.old-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / LATEST)
    _prune(root, keep, protect=name)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first (by their step-NNN names)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / META_FILE).exists()
    )


def _prune(root: Path, keep: int, protect: str) -> None:
    ckpts = [p for p in list_checkpoints(root) if p.name != protect]
    for p in ckpts[: max(0, len(ckpts) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run / checkpoints folder (-> its ``latest``)."""
    p = Path(path)
    if (p / META_FILE).exists() or (p / STATE_FILE).exists():
        return p
    for root in (p, p / "checkpoints"):
        latest = root / LATEST
        if latest.exists():
            name = latest.read_text().strip()
            if not (root / name).is_dir():
                raise CheckpointError(f"{latest} names {name!r}, which does not exist in {root}")
            return root / name
    raise CheckpointError(f"{p}: not a checkpoint folder and no checkpoints/{LATEST} inside it")


def load_checkpoint(
    path: str | Path, map_location: str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a checkpoint; ``CheckpointError`` naming the file if it is bad."""
    ckpt = resolve_checkpoint(path)
    meta_path, state_path = ckpt / META_FILE, ckpt / STATE_FILE
    if not meta_path.exists():
        raise CheckpointError(f"{meta_path}: missing (an incomplete checkpoint?)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{meta_path}: not valid JSON ({exc}); the checkpoint is corrupted"
        ) from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: unknown checkpoint format {meta.get('format_version')!r}"
        )
    if not state_path.exists():
        raise CheckpointError(f"{state_path}: missing")
    size = state_path.stat().st_size
    if size != meta.get("state_bytes"):
        raise CheckpointError(
            f"{state_path}: {size} bytes, expected {meta.get('state_bytes')} (truncated or "
            "overwritten); use an earlier checkpoint"
        )
    if _sha256(state_path) != meta.get("state_sha256"):
        raise CheckpointError(f"{state_path}: SHA-256 mismatch, the file is corrupted")
    try:
        tensors = load_file(str(state_path), device=map_location)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{state_path}: cannot be read as safetensors ({exc})") from None
    return tensors, meta


# ---------------------------------------------------------------------------------------------
# State <-> (tensors, JSON) helpers
# ---------------------------------------------------------------------------------------------


def prefixed(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "/"
    return {k[len(p) :]: v for k, v in tensors.items() if k.startswith(p)}


def optimizer_to_flat(opt: torch.optim.Optimizer, prefix: str = "optim") -> tuple[dict, dict]:
    """Optimiser state as (tensors, JSON): moments as tensors, hyper-parameters as JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}/{idx}/{name}"] = v
            else:
                scalars[f"{idx}/{name}"] = v
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(
    opt: torch.optim.Optimizer, tensors: dict, meta: dict, prefix: str = "optim"
) -> None:
    state: dict[int, dict] = {}
    for k, v in unprefixed(prefix, tensors).items():
        idx, name = k.split("/", 1)
        state.setdefault(int(idx), {})[name] = v
    for k, v in meta["scalars"].items():
        idx, name = k.split("/", 1)
        state.setdefault(int(idx), {})[name] = v
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Torch CPU/CUDA generator states as tensors; Python and NumPy states as JSON."""
    tensors = {"rng/torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/torch_cuda/{i}"] = s
    ver, internal, gauss = random.getstate()
    npst = np.random.get_state()  # noqa: NPY002 - the legacy global state is what users seed
    meta = {
        "python": [ver, list(internal), gauss],
        "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng/torch_cpu"].to(torch.uint8))
    cuda = sorted(k for k in tensors if k.startswith("rng/torch_cuda/"))
    if cuda and torch.cuda.is_available():
        states = [tensors[k].to(torch.uint8) for k in cuda]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    ver, internal, gauss = meta["python"]
    random.setstate((ver, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
