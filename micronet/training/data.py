"""Datasets and batch streams: CIFAR-100/10 pickles or image folders as uint8 tensors, split and streamed.

Layouts found under ``--data-root`` (auto-detected, or forced with ``dataset=``):

* ``cifar100``: torchvision's ``cifar-100-python/{train,test,meta}`` pickles (fine labels).
* ``cifar10``: ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``.
* ``folder``: ``training_set/<class>/*.png`` and ``test_set/<class>/*.png`` (classes sorted by name;
  PNG/JPEG/BMP, all of one size).

Images stay uint8 ``N×3×H×W`` tensors end to end. Augmentation runs on uint8 batches
(:mod:`micronet.training.augment`); :class:`Normalization` turns a batch into float on the device,
so the dataset can live on the GPU and the CPU never touches a float image.

Randomness is *stateless*: batch ``k`` of epoch ``e`` on rank ``r`` is shuffled and augmented with
generators derived from ``(seed, e, r, k)`` only. Any worker count, a resumed run, or a run that skips
to batch ``k`` therefore sees exactly the same batches.
"""

from __future__ import annotations

import functools
import hashlib
import io as _io
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from micronet.errors import MicronetError

DATASETS = ("cifar100", "cifar10", "folder")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


# --------------------------------------------------------------------------------------------- normalization
@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x/255 - mean)/std``, optionally divided once more (the 2019 winner's legacy scaling)."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    extra_divisor: float = 1.0  # 255 reproduces riair2019's double scaling (spec training.md §1.7)

    def __call__(self, images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Normalise a uint8 batch ``B×3×H×W`` on its own device; returns ``dtype``."""
        mean, std = _channel_stats(self.mean, self.std, self.extra_divisor, images.device)
        return ((images.to(torch.float32) - mean) / std).to(dtype)

    def mean_colour(self) -> tuple[int, int, int]:
        """The uint8 colour that normalises to zero (the TF-AutoAugment/Cutout fill)."""
        return tuple(int(round(m * 255)) for m in self.mean)  # type: ignore[return-value]


@functools.lru_cache(maxsize=32)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], divisor: float,
                   device: torch.device) -> tuple[Tensor, Tensor]:
    # Built once per device: a fresh host tensor per batch would mean a synchronising copy per step.
    m = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std).view(1, 3, 1, 1) * 255.0 * divisor
    return m.to(device), s.to(device)


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a small host tensor to ``device`` without stalling the GPU queue (pinned, non-blocking)."""
    if device.type == "cpu":
        return t
    # A copy from pageable memory waits for the stream to drain; a pinned one is queued like a kernel.
    return t.pin_memory().to(device, non_blocking=True)


_WINNER_MEAN = (0.49139968, 0.48215841, 0.44653091)
NORMALIZATIONS: dict[str, Normalization] = {
    n.name: n
    for n in (
        Normalization("cifar100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        Normalization("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        # The winner's constants: CIFAR-10 pixel mean/std, used for CIFAR-100 too (spec §4.3).
        Normalization("micronet2019", _WINNER_MEAN, (0.24703223, 0.24348513, 0.26158784)),
        # Fast AutoAugment's constants (CIFAR-10 mean, per-image-average std; used for CIFAR-100 too).
        Normalization("fastaa", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        # Only for evaluating the released 2019 checkpoint: same constants, then ÷255 again.
        Normalization("riair2019", _WINNER_MEAN, (0.24703223, 0.24348513, 0.26158784), 255.0),
    )
}


def get_normalization(name: str) -> Normalization:
    """Look up a normalization preset by name."""
    try:
        return NORMALIZATIONS[name]
    except KeyError:
        raise MicronetError(f"unknown normalization {name!r}; choose one of {', '.join(NORMALIZATIONS)}") from None


# --------------------------------------------------------------------------------------------- datasets
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


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds only what CIFAR batches contain (dicts, lists, numpy arrays): no code runs."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),  # protocol-5 pickles of arrays
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 store bytes this way
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(_io.BytesIO(f.read()), encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise MicronetError(f"cannot read CIFAR batch {path}: {exc}") from None
    if not isinstance(obj, dict) or "data" not in obj and "fine_label_names" not in obj and "label_names" not in obj:
        raise MicronetError(f"{path} is not a CIFAR python batch (expected a dict with 'data' and labels)")
    return obj


def _batch_tensors(path: Path, label_key: str) -> tuple[Tensor, Tensor]:
    d = _read_pickle(path)
    try:
        data = torch.as_tensor(d["data"], dtype=torch.uint8)
        labels = torch.as_tensor(list(d[label_key]), dtype=torch.int64)
    except KeyError as exc:
        raise MicronetError(f"CIFAR batch {path} lacks the key {exc}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise MicronetError(f"CIFAR batch {path}: expected N×3072 uint8 data and N labels, got {tuple(data.shape)}")
    return data.view(-1, 3, 32, 32), labels


def _load_cifar(root: Path, dataset: str, split: str) -> ImageSet:
    if dataset == "cifar100":
        base = root / "cifar-100-python"
        images, labels = _batch_tensors(base / ("train" if split == "train" else "test"), "fine_labels")
        classes = tuple(_read_pickle(base / "meta")["fine_label_names"])
    else:
        base = root / "cifar-10-batches-py"
        files = _CIFAR10_TRAIN if split == "train" else ("test_batch",)
        parts = [_batch_tensors(base / f, "labels") for f in files]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        classes = tuple(_read_pickle(base / "batches.meta")["label_names"])
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise MicronetError(f"{base}: labels outside 0..{len(classes) - 1}")
    return ImageSet(images.contiguous(), labels, classes)


def _load_folder(root: Path, split: str) -> ImageSet:
    # PIL rather than torchvision.io: torchvision 0.29 deprecates its image decoders.
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    base = root / ("training_set" if split == "train" else "test_set")
    classes = tuple(sorted(p.name for p in base.iterdir() if p.is_dir()))
    if not classes:
        raise MicronetError(f"{base} has no class folders; expected {base.name}/<class>/*.png")
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((base / name).iterdir()):
            if file.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(file) as im:
                    pixels = np.asarray(im.convert("RGB"))
            except (UnidentifiedImageError, OSError) as exc:
                raise MicronetError(f"cannot decode image {file}: {exc}") from None
            images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
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
    return ["training_set/<class>/", "test_set/<class>/"]


def _layout_present(root: Path, dataset: str) -> bool:
    if dataset == "folder":
        return (root / "training_set").is_dir() and (root / "test_set").is_dir()
    return all((root / f).is_file() for f in _expected_files(dataset))


def detect_layout(root: str | Path, dataset: str = "auto") -> str:
    """Which dataset layout ``root`` holds (``cifar100``, ``cifar10`` or ``folder``); raises if none."""
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
            "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}, or training_set/ + test_set/"
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
    return _load_folder(root, split) if layout == "folder" else _load_cifar(root, layout, split)


def split_holdout(data: ImageSet, holdout: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Stratified split into ``(train, validation)``; ``holdout`` is a fraction (<1) or an image count."""
    n = len(data)
    fraction = holdout if holdout < 1 else holdout / max(n, 1)
    if not 0 <= fraction < 1:
        raise MicronetError(f"holdout {holdout} leaves no training images out of {n}")
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in range(data.num_classes):
        members = torch.nonzero(data.labels == c).flatten()
        members = members[torch.randperm(len(members), generator=g)]
        k = int(round(len(members) * fraction))
        val_idx.append(members[:k])
        train_idx.append(members[k:])
    train = torch.sort(torch.cat(train_idx)).values
    val = torch.sort(torch.cat(val_idx)).values
    return data.subset(train), data.subset(val)


# --------------------------------------------------------------------------------------------- batch streams
def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (stable across Python runs, unlike ``hash``)."""
    digest = hashlib.blake2b("/".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


Augment = Callable[[Tensor, torch.Generator], Tensor]


def shard_indices(n: int, epoch: int, *, seed: int, shuffle: bool, rank: int, world_size: int,
                  even: bool = True) -> Tensor:
    """This rank's sample indices for ``epoch``: one shared permutation, strided over ranks.

    ``even`` pads with the first samples (like DistributedSampler) so every rank runs the same number of
    training steps; evaluation uses ``even=False`` so every image is counted exactly once.
    """
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))
    else:
        order = torch.arange(n)
    pad = (-n) % world_size if even else 0
    if pad:
        order = torch.cat([order, order[:pad]])
    return order[rank::world_size]


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole augmented batches keyed by ``(epoch, batch index)``."""

    def __init__(self, stream: BatchStream) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        return self.stream.make_batch(*key)


class _EpochSampler(torch.utils.data.Sampler):
    """Yields the ``(epoch, batch index)`` keys of the current epoch (set by the stream before iterating)."""

    def __init__(self) -> None:
        self.epoch, self.batches = 0, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter((self.epoch, k) for k in range(self.batches))

    def __len__(self) -> int:
        return self.batches


class BatchStream:
    """One rank's batches of an ImageSet, epoch by epoch, augmented deterministically on the data's device.

    When the data lives on a CUDA device (or ``num_workers`` is 0), batches are cut and augmented in
    the main process on that device; otherwise a DataLoader with pinned memory and persistent workers
    produces whole batches in parallel.
    """

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        *,
        shuffle: bool,
        augment: Augment | None = None,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        even_shards: bool = True,
        num_workers: int = 0,
    ) -> None:
        if batch_size < 1:
            raise MicronetError(f"batch size must be positive, got {batch_size}")
        self.data, self.batch_size, self.shuffle, self.augment = data, batch_size, shuffle, augment
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.even_shards = even_shards
        self._cached: tuple[int, Tensor] | None = None
        self.samples_per_rank = len(self._indices(0))
        self._loader: torch.utils.data.DataLoader | None = None
        self._sampler: _EpochSampler | None = None
        if num_workers > 0 and data.images.device.type == "cpu":
            self._sampler = _EpochSampler()
            self._loader = torch.utils.data.DataLoader(
                _BatchDataset(self),
                sampler=self._sampler,
                batch_size=None,
                num_workers=num_workers,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=True,
            )

    def __getstate__(self) -> dict:
        # Workers receive the stream by pickling (forkserver/spawn); they need the data, not the loader.
        return {**self.__dict__, "_loader": None, "_sampler": None}

    def __len__(self) -> int:
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return -(-self.samples_per_rank // self.batch_size)

    def _indices(self, epoch: int) -> Tensor:
        """This rank's sample order for ``epoch``, on the data's device (moved once per epoch)."""
        if self._cached is None or self._cached[0] != epoch:
            idx = shard_indices(len(self.data), epoch, seed=self.seed, shuffle=self.shuffle, rank=self.rank,
                                world_size=self.world_size, even=self.even_shards)
            self._cached = (epoch, host_to_device(idx, self.data.images.device))
        return self._cached[1]

    def make_batch(self, epoch: int, k: int) -> tuple[Tensor, Tensor]:
        """Batch ``k`` of ``epoch``: uint8 images (augmented) and labels, on the data's device."""
        idx = self._indices(epoch)[k * self.batch_size : (k + 1) * self.batch_size]
        images, labels = self.data.images[idx], self.data.labels[idx]
        if self.augment is not None:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, k, 1))
            images = self.augment(images, g)
        return images, labels

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate the batches of ``epoch``."""
        if self._loader is None:
            for k in range(len(self)):
                yield self.make_batch(epoch, k)
            return
        assert self._sampler is not None
        self._sampler.epoch, self._sampler.batches = epoch, len(self)
        yield from self._loader


def to_device(batch: tuple[Tensor, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """Move a uint8 batch to ``device`` without blocking the host (pinned memory makes this async)."""
    images, labels = batch
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True)



def checkpoint_normalization(path: str | Path, fmt: str) -> str:
    """Normalization preset a checkpoint expects: recorded in micronet checkpoints, the legacy double /255
    scaling for the 2019 winner's file (spec riair2019-format.md), CIFAR-100 statistics otherwise."""
    if fmt == "riair2019":
        return "riair2019"
    if fmt == "micronet":
        from micronet.io import read_header

        return read_header(path)["extra"].get("normalization", "cifar100")
    return "cifar100"


def test_images(root: str | Path, samples: int, normalization: str = "cifar100", dataset: str = "auto") -> Tensor:
    """The first ``samples`` test-set images under ``root`` as a normalised float batch (for verification,
    dynamic-network op averaging and the like)."""
    data = load_dataset(root, "test", dataset)
    return get_normalization(normalization)(data.images[:samples])


test_images.__test__ = False  # a library function, not a pytest test
