"""Datasets, the deterministic distributed batch schedule and the loaders.

Datasets give un-augmented ``(image, label)`` pairs, images as (3, H, W) tensors (uint8
0..255, or float 0..1 for the built-in digits):

* :class:`DigitsDataset`: scikit-learn's handwritten digits (``load_digits``' 1,797 8x8
  images shipped inside the scikit-learn wheel, no download), upsampled to 3x32x32; a fixed
  stratified split, 1,433 train / 364 validation images.
* :class:`ImageFolderDataset`: ``root/train/<class>/*.png|jpg|...`` and ``root/val/<class>/...``
  read with Pillow; the classes are the sorted sub-folders of ``train``.
* :class:`SyntheticDataset`: random images made on the fly from (seed, index), for
  throughput runs.

**The schedule.** Epoch ``e`` visits the training set in the order of
``randperm(n, seed=(seed, "perm", e))``, cut into global batches of ``batch_size`` (the
incomplete last one is dropped). Global batch ``s`` is split into ``world_size *
accum_steps`` micro-batches of consecutive positions; rank ``r`` takes micro-batches ``r *
accum_steps ... (r + 1) * accum_steps - 1``. The augmentation of the image at position
``p`` of the epoch draws from a generator seeded with ``(seed, "aug", e, p)``. So which
images form a global batch, how each is augmented and which images are mixup partners
(neighbours ``2k, 2k+1``) depend on (seed, epoch, step) only, never on the number of ranks,
and a run resumed at any step continues exactly. (``torch.utils.data.DistributedSampler``
deals positions out round robin, which would split mixup pairs across ranks.)
"""
from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = [
    "DataError", "derive_seed", "generator", "DigitsDataset", "ImageFolderDataset", "SyntheticDataset",
    "AugmentedDataset", "BatchSchedule", "build_datasets", "dataset_defaults", "IMAGE_EXTENSIONS",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """A problem with the data (missing folder, empty class, unreadable image): one line."""


def derive_seed(*keys: Any) -> int:
    """A 63-bit seed from any hashable keys (stable across processes and Python versions)."""
    h = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return struct.unpack("<Q", h)[0] & ((1 << 63) - 1)


def generator(*keys: Any) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*keys))
    return g


# ------------------------------------------------------------------------- datasets


def _digits_arrays():
    """(images (1797, 8, 8) float 0..16, targets) of scikit-learn's digits. Read straight from
    the ``digits.csv.gz`` the wheel ships (importing scikit-learn takes seconds), through
    ``load_digits`` if that file is not where scikit-learn keeps it."""
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in digits dataset needs scikit-learn: pip install scikit-learn "
                        "(or pip install 'fastvis[train]')")
    path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
        data = np.loadtxt(path, delimiter=",", dtype=np.float32)
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # pragma: no cover - another scikit-learn layout

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def digits_split() -> Tuple[List[int], List[int]]:
    """The fixed split: per class, a permutation by ``numpy.random.RandomState(0)``; its
    first ceil(20 %) images are validation images (1,433 train / 364 val)."""
    import numpy as np

    _, y = _digits_arrays()
    rs = np.random.RandomState(0)
    train, val = [], []
    for c in range(10):
        idx = np.flatnonzero(y == c)
        idx = idx[rs.permutation(len(idx))]
        k = int(np.ceil(0.2 * len(idx)))
        val += idx[:k].tolist()
        train += idx[k:].tolist()
    return sorted(train), sorted(val)


class DigitsDataset(Dataset):
    """scikit-learn's digits as 3x32x32 float images in [0, 1] (bilinear upsampling of the
    8x8 images, values 0..16 divided by 16); ``split`` "train" (1,433) or "val" (364), the
    fixed stratified split of :func:`digits_split`."""

    num_classes = 10
    img_size = 32

    def __init__(self, split: str = "train"):
        if split not in ("train", "val"):
            raise ValueError(f"DigitsDataset: split must be 'train' or 'val', got {split!r}")
        images, targets = _digits_arrays()
        tr, va = digits_split()
        sel = tr if split == "train" else va
        imgs = torch.as_tensor(images[sel]).div_(16.0)[:, None]
        imgs = torch.nn.functional.interpolate(imgs, size=(32, 32), mode="bilinear", align_corners=False)
        self.images = imgs.clamp_(0.0, 1.0).contiguous()  # (N, 1, 32, 32)
        self.targets = torch.as_tensor(targets[sel], dtype=torch.long)
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        return self.images[i].expand(3, -1, -1), int(self.targets[i])


def _load_image(path: str) -> torch.Tensor:
    try:
        from PIL import Image
    except ImportError:
        raise DataError("image folders are read with Pillow: pip install pillow (or 'fastvis[train]')") from None
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            data = bytearray(im.tobytes())
    except Exception as e:  # PIL raises many types for broken files
        raise DataError(f"cannot read image {path}: {' '.join(str(e).split()) or type(e).__name__}") from None
    return torch.frombuffer(data, dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1).contiguous()


class ImageFolderDataset(Dataset):
    """``root/<split>/<class>/<image>``; classes sorted by name (``classes`` given: the
    training split's, which the validation split must use)."""

    def __init__(self, root: str, split: str = "train", classes: Optional[Sequence[str]] = None):
        base = os.path.join(root, split)
        if not os.path.isdir(root):
            raise DataError(f"data directory not found: {root}")
        if not os.path.isdir(base):
            raise DataError(f"data directory {root} has no '{split}' folder (expected {root}/{split}/<class>/<images>)")
        found = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)) and not d.startswith("."))
        if not found:
            raise DataError(f"{base} has no class folders (expected {base}/<class>/<images>)")
        if classes is None:
            classes = found
        else:
            extra = [c for c in found if c not in classes]
            if extra:
                raise DataError(f"{base}: class folder(s) {', '.join(extra)} are not among the training classes")
        self.root, self.split, self.classes = root, split, list(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples: List[Tuple[str, int]] = []
        for c in found:
            folder = os.path.join(base, c)
            files = sorted(f for f in os.listdir(folder)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
            if not files:
                raise DataError(f"class folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS[:3])}, ...)")
            self.samples.extend((os.path.join(folder, f), index[c]) for f in files)
        self.targets = [t for _, t in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        path, target = self.samples[i]
        return _load_image(path), target


class SyntheticDataset(Dataset):
    """``n`` random uint8 images of 3 x size x size, each a function of (seed, index);
    label ``index % num_classes``."""

    def __init__(self, n: int, num_classes: int = 10, size: int = 224, seed: int = 0):
        self.n, self.num_classes, self.size, self.seed = int(n), int(num_classes), int(size), int(seed)
        self.classes = [str(i) for i in range(self.num_classes)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = generator("synthetic", self.seed, i)
        img = torch.randint(0, 256, (3, self.size, self.size), generator=g, dtype=torch.uint8)
        return img, i % self.num_classes


def dataset_defaults(dataset: str) -> Dict[str, Any]:
    """Settings a config leaves at None take these values for the dataset."""
    if dataset == "digits":
        return {"img_size": 32, "num_classes": 10, "hflip": 0.0, "mean": (0.5, 0.5, 0.5),
                "std": (0.5, 0.5, 0.5), "scale": (0.35, 1.0)}
    if dataset == "synthetic":
        return {"img_size": 64, "num_classes": 10}
    return {"img_size": 224}


def build_datasets(cfg) -> Tuple[Dataset, Dataset]:
    """(train, val) base datasets of a resolved config."""
    if cfg.dataset == "digits":
        return DigitsDataset("train"), DigitsDataset("val")
    if cfg.dataset == "synthetic":
        return (SyntheticDataset(cfg.synthetic_size, cfg.num_classes, cfg.img_size, cfg.seed),
                SyntheticDataset(max(1, cfg.synthetic_size // 4), cfg.num_classes, cfg.img_size, cfg.seed + 1))
    if cfg.dataset == "custom":
        raise DataError("this run trained on datasets given to the Python API (dataset 'custom'); "
                        "name the data with --data DIR or --dataset")
    train = ImageFolderDataset(cfg.data_dir, "train")
    val = ImageFolderDataset(cfg.data_dir, "val", classes=train.classes)
    return train, val


def folder_num_classes(root: str) -> int:
    return ImageFolderDataset(root, "train").num_classes


# ------------------------------------------------------------------ augmented view


class AugmentedDataset(Dataset):
    """Indexed by *keys* ``(index, epoch, position)``: returns the base image ``index``
    through ``transform(img, generator(seed, "aug", epoch, position))`` and its label."""

    def __init__(self, base: Dataset, transform: Callable, seed: int):
        self.base, self.transform, self.seed = base, transform, int(seed)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key) -> Tuple[torch.Tensor, int]:
        index, epoch, pos = key
        img, target = self.base[index]
        return self.transform(img, generator(self.seed, "aug", epoch, pos)), target


class _KeyBatches(Sampler):
    def __init__(self, batches: List[List[Tuple[int, int, int]]]):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class BatchSchedule:
    """The training schedule of one rank (see the module docstring)."""

    n: int
    batch_size: int          # global
    world_size: int = 1
    rank: int = 0
    accum_steps: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.batch_size % (self.world_size * self.accum_steps):
            raise ValueError("batch_size must be a multiple of world_size * accum_steps")
        if self.n < self.batch_size:
            raise DataError(f"the training set has {self.n} images, fewer than one global batch "
                            f"({self.batch_size}); use a smaller --batch-size")

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.world_size * self.accum_steps)

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=generator(self.seed, "perm", epoch))

    def micro_batches(self, epoch: int, start_step: int = 0) -> List[List[Tuple[int, int, int]]]:
        """Keys ``(index, epoch, position)`` of this rank's micro-batches from step
        ``start_step`` to the end of the epoch, ``accum_steps`` per step."""
        perm = self.permutation(epoch).tolist()
        mb = self.micro_batch
        out = []
        for s in range(start_step, self.steps_per_epoch):
            base = s * self.batch_size
            for m in range(self.accum_steps):
                lo = base + (self.rank * self.accum_steps + m) * mb
                out.append([(perm[p], epoch, p) for p in range(lo, lo + mb)])
        return out

    def positions(self, step_in_epoch: int, micro: int) -> Tuple[int, int]:
        """(first position within the global batch, length) of this rank's micro-batch."""
        mb = self.micro_batch
        return (self.rank * self.accum_steps + micro) * mb, mb


def _collate(batch):
    imgs = torch.stack([b[0] for b in batch])
    targets = torch.tensor([b[1] for b in batch], dtype=torch.long)
    return imgs, targets


def train_loader(aug: AugmentedDataset, schedule: BatchSchedule, epoch: int, start_step: int,
                 workers: int) -> DataLoader:
    """Micro-batches (images, targets) of one epoch of one rank from ``start_step`` on."""
    return DataLoader(aug, batch_sampler=_KeyBatches(schedule.micro_batches(epoch, start_step)),
                      num_workers=workers, collate_fn=_collate, persistent_workers=False)


class _EvalView(Dataset):
    def __init__(self, base: Dataset, transform: Callable):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        img, t = self.base[i]
        return self.transform(img), t


def eval_loader(base: Dataset, transform: Callable, batch_size: int, rank: int, world_size: int,
                workers: int) -> DataLoader:
    """This rank's share of the validation set (indices rank, rank + W, ...; no padding, so
    the summed counts over ranks are exact)."""
    idx = list(range(rank, len(base), world_size))
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return DataLoader(_EvalView(base, transform), batch_sampler=_KeyBatches(batches),
                      num_workers=workers, collate_fn=_collate)
