"""Datasets as uint8 tensors: CIFAR-100/10 pickles or image folders, read safely, split, test images.

Layouts found under ``--data-root`` (auto-detected, or forced with ``dataset=``):

* ``cifar100``: torchvision's ``cifar-100-python/{train,test,meta}`` pickles (fine labels).
* ``cifar10``: ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``.
* ``folder``: ``training_set/<class>/*.png`` and ``test_set/<class>/*.png`` (classes sorted by name;
  PNG/JPEG/BMP, all of one size).
* the CIFAR-10.2 study's sets (``cifar102``, ``cifar101``, ``cifar101_v4``, ``cifar10_10k``, ``cifar10_30k``,
  ``cifar102_30k``): their published npz / npy / Python-2 pickle files (:mod:`micronet.data.cifar102`).

Images stay uint8 ``N×3×H×W`` tensors end to end; :class:`~micronet.data.Normalization` turns a batch into
float on its device. Pickles go through a restricted unpickler: no code in a data file ever runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from micronet.data.cifar102 import LAYOUTS
from micronet.data.normalization import Normalization, get_normalization, train_stats
from micronet.data.readers import as_class_names, as_images, as_labels, read_pickle
from micronet.errors import MicronetError

# The original three first (auto-detection tries them in this order), then the CIFAR-10.2 study's sets.
DATASETS = ("cifar100", "cifar10", "folder", *LAYOUTS)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
# Folder datasets are small images (CIFAR's are 32x32): anything above this many pixels is refused before it is
# decoded (a 20000x20000 PNG of a few KB would otherwise decode to 1.2 GB).
MAX_IMAGE_PIXELS = 1024 * 1024
MAX_FOLDER_IMAGES = 2_000_000
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


@dataclass
class ImageSet:
    """A labelled image set held as tensors: ``images`` uint8 ``N×3×H×W``, ``labels`` int64 ``N``."""

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        """Number of classes (from the class names, not from the labels present)."""
        return len(self.classes)

    def subset(self, index: Tensor) -> ImageSet:
        """The images at ``index`` (a new ImageSet sharing nothing with this one)."""
        return ImageSet(self.images[index].clone(), self.labels[index].clone(), self.classes)

    def to(self, device: torch.device | str) -> ImageSet:
        """The same set with its tensors on ``device``."""
        return ImageSet(self.images.to(device), self.labels.to(device), self.classes)


def _read_pickle(path: Path) -> dict:
    obj = read_pickle(path)
    if "data" not in obj and "fine_label_names" not in obj and "label_names" not in obj:
        raise MicronetError(f"{path} is not a CIFAR python batch (expected a dict with 'data' and labels)")
    return obj


def _batch_tensors(path: Path, label_key: str, num_classes: int) -> tuple[Tensor, Tensor]:
    d = _read_pickle(path)
    for key in ("data", label_key):
        if key not in d:
            raise MicronetError(f"CIFAR batch {path} lacks the key {key!r}")
    images = as_images(f"CIFAR batch {path} 'data'", d["data"], "planar")
    labels = as_labels(f"CIFAR batch {path} {label_key!r}", d[label_key], images.shape[0], num_classes)
    return images, labels


def _class_names(path: Path, key: str) -> tuple[str, ...]:
    meta = _read_pickle(path)
    if key not in meta:
        raise MicronetError(f"CIFAR meta file {path} lacks the key {key!r}")
    names = meta[key]
    count = len(names) if isinstance(names, list | tuple) or getattr(names, "ndim", 0) == 1 else -1
    if not 1 <= count <= 100_000:
        raise MicronetError(f"CIFAR meta file {path} {key!r}: expected a list of 1..100,000 class names")
    return as_class_names(f"CIFAR meta file {path} {key!r}", names, count)


def _load_cifar(root: Path, dataset: str, split: str) -> ImageSet:
    # Labels, pixels and class names are validated (types, shapes, ranges), never cast: a string label, a
    # label of 2**70 or a float pixel array is a one-line error naming the file.
    if dataset == "cifar100":
        base = root / "cifar-100-python"
        classes = _class_names(base / "meta", "fine_label_names")
        images, labels = _batch_tensors(base / ("train" if split == "train" else "test"), "fine_labels",
                                        len(classes))
    else:
        base = root / "cifar-10-batches-py"
        classes = _class_names(base / "batches.meta", "label_names")
        files = _CIFAR10_TRAIN if split == "train" else ("test_batch",)
        parts = [_batch_tensors(base / f, "labels", len(classes)) for f in files]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
    return ImageSet(images.contiguous(), labels, classes)


def _decode_image(file: Path) -> Any:
    """One image file as an ``H×W×3`` uint8 array; size checked from its header before decoding."""
    # PIL rather than torchvision.io: torchvision 0.29 deprecates its image decoders. Imported here: only folder
    # datasets need it.
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as im:
            width, height = im.size
            if width * height > MAX_IMAGE_PIXELS:
                raise MicronetError(f"image {file} is {width}x{height}, above the {MAX_IMAGE_PIXELS:,}-pixel limit")
            return np.asarray(im.convert("RGB")).copy()
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise MicronetError(f"cannot decode image {file}: {str(exc).splitlines()[0][:160]}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # what PIL's decoders raise on damaged data
        raise MicronetError(f"cannot decode image {file}: {type(exc).__name__}: {str(exc)[:160]}") from None


def _load_folder(root: Path, split: str) -> ImageSet:
    base = root / ("training_set" if split == "train" else "test_set")
    classes = tuple(sorted(p.name for p in base.iterdir() if p.is_dir()))
    if not classes:
        raise MicronetError(f"{base} has no class folders; expected {base.name}/<class>/*.png")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((base / name).iterdir()):
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            if len(images) >= MAX_FOLDER_IMAGES:
                raise MicronetError(f"{base} holds more than {MAX_FOLDER_IMAGES:,} images")
            images.append(torch.from_numpy(_decode_image(file)).permute(2, 0, 1))
            labels.append(label)
    if not images:
        raise MicronetError(f"{base} holds no images; expected {base.name}/<class>/*.png")
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise MicronetError(f"{base}: images differ in size {sorted(shapes)[:3]}; all must be the same size")
    return ImageSet(torch.stack(images).contiguous(), torch.tensor(labels, dtype=torch.int64), classes)


def _expected_files(dataset: str) -> list[str]:
    if dataset == "cifar100":
        return ["cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"]
    if dataset == "cifar10":
        return [f"cifar-10-batches-py/{f}" for f in (*_CIFAR10_TRAIN, "test_batch", "batches.meta")]
    if dataset in LAYOUTS:
        return LAYOUTS[dataset].expected()
    return ["training_set/<class>/", "test_set/<class>/"]


def _layout_present(root: Path, dataset: str) -> bool:
    if dataset == "folder":
        return (root / "training_set").is_dir() and (root / "test_set").is_dir()
    if dataset in LAYOUTS:
        return LAYOUTS[dataset].present(root)
    return all((root / f).is_file() for f in _expected_files(dataset))


def detect_layout(root: str | Path, dataset: str = "auto") -> str:
    """Which dataset layout ``root`` holds (one of ``DATASETS``, tried in that order); raises if none."""
    root = Path(root)
    if dataset not in ("auto", *DATASETS):
        raise MicronetError(f"unknown dataset {dataset!r}; choose auto, {', '.join(DATASETS)}")
    if not root.is_dir():
        raise MicronetError(f"data root {root} does not exist (pass --data-root DIR holding cifar-100-python/)")
    candidates = DATASETS if dataset == "auto" else (dataset,)
    for name in candidates:  # cifar100 first: it is the challenge's dataset
        if _layout_present(root, name):
            return name
    if dataset == "auto":
        raise MicronetError(
            f"{root} holds no dataset: expected cifar-100-python/{{train,test,meta}}, "
            "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}, training_set/ + test_set/, "
            "or the CIFAR-10.2 study's files (cifar102_{train,test}.npz, cifar10.1_v6_{data,labels}.npy, "
            "NAME_{train,test}_py27)"
        )
    missing = [f for f in _expected_files(dataset) if not (root / f.split("<")[0]).exists()]
    raise MicronetError(f"{root} is not a {dataset} root: missing {', '.join(missing)}")


def load_dataset(root: str | Path, split: str, dataset: str = "auto", download: bool = False) -> ImageSet:
    """Load the ``train`` or ``test`` split under ``root`` as uint8 tensors (downloads only if asked)."""
    if split not in ("train", "test"):
        raise MicronetError(f"split must be 'train' or 'test', not {split!r}")
    root = Path(root)
    if download and dataset in ("cifar100", "cifar10") and not _layout_present(root, dataset):
        from torchvision import datasets

        cls = datasets.CIFAR100 if dataset == "cifar100" else datasets.CIFAR10
        root.mkdir(parents=True, exist_ok=True)
        try:
            cls(str(root), train=split == "train", download=True)
        except Exception as exc:  # network errors come in many types; report them as one line
            raise MicronetError(f"downloading {dataset} into {root} failed: {exc}") from None
    layout = detect_layout(root, dataset)
    if layout in LAYOUTS:
        return ImageSet(*LAYOUTS[layout].load(root, split))
    return _load_folder(root, split) if layout == "folder" else _load_cifar(root, layout, split)


def holdout_amount(value: Any, name: str = "holdout") -> int | float:
    """``value`` as a held-out amount: a fraction in [0, 1) stays a float, a whole count >= 1 becomes an int (so
    it prints as ``5000``, not ``5000.0``); anything else is a one-line error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise MicronetError(f"{name} must be a fraction below 1 or a whole image count, not {value!r}")
    if value < 1:
        return float(value)
    if value != int(value):
        raise MicronetError(f"{name} must be a fraction below 1 or a whole image count, not {value!r}")
    return int(value)


def split_holdout(data: ImageSet, holdout: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Stratified split into ``(train, validation)``; ``holdout`` is a fraction (<1) or an image count."""
    n = len(data)
    holdout = holdout_amount(holdout)
    fraction = holdout if holdout < 1 else holdout / max(n, 1)
    if not 0 <= fraction < 1:
        raise MicronetError(f"holdout {holdout} leaves no training images out of {n}")
    train, val = _stratified_split(data.labels, fraction, torch.Generator().manual_seed(seed))
    return data.subset(train), data.subset(val)


def subsample(data: ImageSet, count: int, seed: int = 0) -> ImageSet:
    """A stratified random subset of exactly ``count`` images (how the study's 10k/30k sets were drawn).

    Each class keeps its share of ``count`` (largest remainders get the odd images), drawn with ``seed``.
    """
    n = len(data)
    if isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= n:
        raise MicronetError(f"subsample must be an image count in 1..{n}, got {count!r}")
    sizes = torch.bincount(data.labels, minlength=data.num_classes).tolist()
    exact = [count * s / n for s in sizes]
    quota = [int(e) for e in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda c: (quota[c] - exact[c], c))
    for c in by_remainder[: count - sum(quota)]:
        quota[c] += 1
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c, k in enumerate(quota):
        members = torch.nonzero(data.labels == c).flatten()
        chosen.append(members[torch.randperm(len(members), generator=g)[:k]])
    return data.subset(torch.sort(torch.cat(chosen)).values)


def training_split(root: str | Path, dataset: str = "auto", *, subsample_to: int = 0, subsample_seed: int = 0,
                   holdout: float = 0, holdout_seed: int = 0,
                   download: bool = False) -> tuple[ImageSet, ImageSet | None]:
    """The images a recipe trains on and its held-out split: the train split, stratified-subsampled to
    ``subsample_to`` images (0: all), then ``holdout`` held out (0: none). ``train-stats`` come from the first."""
    full = load_dataset(root, "train", dataset, download)
    if subsample_to:
        full = subsample(full, subsample_to, subsample_seed)
    if not holdout:
        return full, None
    return split_holdout(full, holdout, holdout_seed)


def dataset_stats(root: str | Path, dataset: str = "auto", *, subsample_to: int = 0, subsample_seed: int = 0,
                  holdout: float = 0, holdout_seed: int = 0) -> dict[str, Any]:
    """Split sizes and the ``train-stats`` normalisation (from the images trained on only) of a dataset."""
    layout = detect_layout(root, dataset)
    full = load_dataset(root, "train", layout)
    train = subsample(full, subsample_to, subsample_seed) if subsample_to else full
    held = 0
    if holdout:
        train, val = split_holdout(train, holdout, holdout_seed)
        held = len(val)
    test = load_dataset(root, "test", layout)
    norm = train_stats(train.images)
    return {"dataset": layout, "data_root": str(root), "train_split_images": len(full), "train_images": len(train),
            "holdout_images": held, "test_images": len(test), "classes": full.num_classes,
            "mean": list(norm.mean), "std": list(norm.std)}


def stratified_splits(labels: Tensor, splits: int, fraction: float, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``splits`` stratified shuffle splits of ``labels`` into sorted ``(keep, held_out)`` index pairs.

    Each split draws its own per-class permutation (seeded by ``seed`` and the split number) and holds out
    ``round(fraction·class size)`` images of every class, like scikit-learn's StratifiedShuffleSplit: the
    held-out parts of different splits may overlap (Fast AutoAugment's K folds, D_A = ``fraction``).
    """
    if splits < 1:
        raise MicronetError(f"splits must be at least 1, got {splits}")
    if not 0 < fraction < 1:
        raise MicronetError(f"the held-out fraction must be in (0, 1), got {fraction}")
    # independent, reproducible per split
    return [_stratified_split(labels, fraction, torch.Generator().manual_seed(seed * 1_000_003 + k))
            for k in range(splits)]


def _stratified_split(labels: Tensor, fraction: float, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sorted ``(keep, held_out)`` indices: ``round(fraction·class size)`` random images of each class held out."""
    keep, held = [], []
    for c in range(int(labels.max()) + 1 if len(labels) else 0):
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n_held = int(round(len(members) * fraction))
        held.append(members[:n_held])
        keep.append(members[n_held:])
    if not keep:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values


def test_images(root: str | Path, samples: int, normalization: str | Normalization = "cifar100",
                dataset: str = "auto") -> Tensor:
    """The first ``samples`` test-set images under ``root`` as a normalised float batch (for verification,
    dynamic-network op averaging and the like)."""
    data = load_dataset(root, "test", dataset)
    return get_normalization(normalization)(data.images[:samples])


test_images.__test__ = False  # a library function, not a pytest test
