"""Checkpoints: tensors in safetensors, everything else in a small JSON; written atomically.

Layout of ``<run>/checkpoints/``::

    stage1-00000400/state.safetensors   model, EMA teacher, optimiser moments, RNG states, bank
    stage1-00000400/meta.json           stage, step, config, optimiser hyper-parameters, Python/NumPy
                                        RNG states, the size + SHA-256 of state.safetensors, a
                                        serial number and the SHA-256 of meta.json's own content
    latest                              the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary folder and renamed into place, under a name never
used before in that folder, only when both files are complete and flushed; then ``latest`` is
replaced atomically. No step ever renames or deletes a complete checkpoint that ``latest`` names,
so a crash at any point leaves ``latest`` naming a complete checkpoint; the temporary folder a
killed write leaves behind is removed by ``remove_stale_temporaries`` (the trainer calls it at
start). A checkpoint holding a non-finite float tensor is refused (``NonFiniteCheckpointError``),
so pruning, which keeps the newest ``keep``, never deletes the last finite one.

Loading never unpickles: safetensors + JSON only; both files are verified (size and SHA-256 of the
tensors, SHA-256 of the meta content) before use, so a truncated, corrupted or edited checkpoint is
reported as such (``CheckpointError``) instead of loading garbage. Given a run folder, loading takes
``latest`` and falls back to the newest intact checkpoint (with a warning) when ``latest`` is
missing or broken.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

STATE_FILE = "state.safetensors"
META_FILE = "meta.json"
LATEST = "latest"
# 2: meta.json carries the SHA-256 of its own content (``meta_sha256``) and a ``serial``.
# 1 (earlier) still loads, without the meta check.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# ".<name>.tmp-<pid>", ".<name>.old-<pid>" (written by format 1), ".latest.tmp-<pid>"
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the file."""


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint to be written holds NaN or Inf values; nothing was written."""


@dataclasses.dataclass
class LoadedCheckpoint:
    path: Path  # the checkpoint folder that was read
    tensors: dict[str, torch.Tensor]
    meta: dict


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _meta_digest(meta: dict) -> str:
    """SHA-256 of the meta's content (all keys but ``meta_sha256``, canonical JSON)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


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


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an Inf."""
    return [
        k
        for k, t in tensors.items()
        if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())
    ]


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def _serial(folder: Path) -> int:
    meta = _read_meta(folder)
    s = meta.get("serial") if meta else None
    return s if isinstance(s, int) and not isinstance(s, bool) else -1


def _unused_name(root: Path, name: str) -> str:
    """``name``, or ``name.2``, ``name.3``, ... if a checkpoint of that name was written before
    (e.g. a run resumed from an older checkpoint reaches the same step again)."""
    if not (root / name).exists():
        return name
    k = 2
    while (root / f"{name}.{k}").exists():
        k += 1
    return f"{name}.{k}"


def save_checkpoint(
    root: str | Path, name: str, tensors: dict[str, torch.Tensor], meta: dict, keep: int = 2
) -> Path:
    """Write a new checkpoint folder under ``root`` atomically, point ``root/latest`` at it, keep
    the newest ``keep``; returns the folder.

    The folder is ``root/name``, or ``root/name.K`` when ``name`` exists already: a name is never
    written twice. ``NonFiniteCheckpointError`` (nothing written, ``latest`` untouched) if a float
    tensor holds NaN or Inf.
    """
    root = Path(root)
    prepared = _prepare_tensors(tensors)
    bad = nonfinite_tensors(prepared)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteCheckpointError(
            f"{root / name}: not written, non-finite values in {', '.join(bad[:5])}{more}"
        )
    root.mkdir(parents=True, exist_ok=True)
    name = _unused_name(root, name)
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state_path = tmp / STATE_FILE
        save_file(prepared, str(state_path))
        with open(state_path, "rb+") as f:
            os.fsync(f.fileno())
        meta = dict(meta)
        meta["format_version"] = FORMAT_VERSION
        meta["serial"] = 1 + max((_serial(p) for p in list_checkpoints(root)), default=0)
        meta["state_bytes"] = state_path.stat().st_size
        meta["state_sha256"] = _sha256(state_path)
        meta["meta_sha256"] = _meta_digest(meta)
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        tmp.rename(final)  # the only rename of a checkpoint folder: final did not exist
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    latest_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, root / LATEST)
    _fsync_dir(root)
    _prune(root, keep, protect=name)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint folders under ``root`` (those with a meta.json), oldest first: by the serial
    number each was written with (its name for a format-1 checkpoint)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / META_FILE).exists()
    ]
    return sorted(found, key=lambda p: (_serial(p), p.name))


def _prune(root: Path, keep: int, protect: str) -> None:
    ckpts = [p for p in list_checkpoints(root) if p.name != protect]
    for p in ckpts[: max(0, len(ckpts) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours, from a save that raised: no save of this process is running now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Delete the temporary folders / files a killed save left in ``root`` (those of processes
    that no longer run); returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    removed = []
    for p in root.iterdir():
        m = _TEMP_RE.match(p.name)
        if m is None or _pid_alive(int(m.group("pid"))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _is_checkpoint_folder(p: Path) -> bool:
    return (p / META_FILE).exists() or (p / STATE_FILE).exists()


def _checkpoint_root(p: Path) -> Path:
    for root in (p, p / "checkpoints"):
        if (root / LATEST).exists() or list_checkpoints(root):
            return root
    raise CheckpointError(f"{p}: not a checkpoint folder and no checkpoints/{LATEST} inside it")


def _candidates(root: Path) -> list[Path]:
    """``latest`` first, then every other checkpoint, newest first."""
    out = []
    latest = root / LATEST
    if latest.exists():
        name = latest.read_text().strip()
        out.append(root / name)
    out += [p for p in reversed(list_checkpoints(root)) if p not in out]
    return out


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run / checkpoints folder (-> its ``latest``, or the newest
    complete checkpoint when ``latest`` names none). Checks presence only; ``load_checkpoint``
    verifies the content."""
    p = Path(path)
    if _is_checkpoint_folder(p):
        return p
    root = _checkpoint_root(p)
    for c in _candidates(root):
        if (c / META_FILE).exists() and (c / STATE_FILE).exists():
            return c
    raise CheckpointError(f"{root}: no complete checkpoint ({LATEST} names none)")


def open_checkpoint(
    path: str | Path, map_location: str = "cpu", prefixes: tuple[str, ...] | None = None
) -> LoadedCheckpoint:
    """Read and verify a checkpoint.

    Args:
        path: a checkpoint folder (read as is, ``CheckpointError`` if it is bad), or a run /
            checkpoints folder: its ``latest``, falling back to the newest intact checkpoint
            (a ``UserWarning`` says why) when ``latest`` is missing or broken.
        map_location: device of the returned tensors.
        prefixes: load only tensors whose names start with one of these (e.g. ``("net/",)``);
            the whole file is still checksummed.
    """
    p = Path(path)
    if _is_checkpoint_folder(p):
        return _load_folder(p, map_location, prefixes)
    root = _checkpoint_root(p)
    errors = []
    for c in _candidates(root):
        try:
            loaded = _load_folder(c, map_location, prefixes)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if errors:
            warnings.warn(
                f"{root}: using {c.name}, the newest intact checkpoint ({'; '.join(errors)})",
                stacklevel=2,
            )
        return loaded
    if not errors:
        raise CheckpointError(f"{root}: no checkpoint in it")
    raise CheckpointError("; ".join(errors) + " (and no intact older checkpoint)")


def load_checkpoint(
    path: str | Path, map_location: str = "cpu", prefixes: tuple[str, ...] | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of ``open_checkpoint``; ``CheckpointError`` naming the file if bad."""
    loaded = open_checkpoint(path, map_location, prefixes)
    return loaded.tensors, loaded.meta


def _load_folder(
    ckpt: Path, map_location: str, prefixes: tuple[str, ...] | None
) -> LoadedCheckpoint:
    meta_path, state_path = ckpt / META_FILE, ckpt / STATE_FILE
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: does not exist")
    if not meta_path.exists():
        raise CheckpointError(f"{meta_path}: missing (an incomplete checkpoint?)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{meta_path}: not valid JSON ({exc}); the checkpoint is corrupted"
        ) from None
    if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_VERSIONS:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{meta_path}: unknown checkpoint format {version!r}")
    if meta["format_version"] >= 2 and meta.get("meta_sha256") != _meta_digest(meta):
        raise CheckpointError(f"{meta_path}: SHA-256 mismatch, the file was edited or is corrupted")
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
        with safe_open(str(state_path), framework="pt", device=map_location) as f:
            names = [k for k in f.keys() if prefixes is None or k.startswith(tuple(prefixes))]
            tensors = {k: f.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{state_path}: cannot be read as safetensors ({exc})") from None
    return LoadedCheckpoint(ckpt, tensors, meta)


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
