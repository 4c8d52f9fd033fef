"""The CIFAR-10.2 study's datasets, read from their published files (never downloaded).

======================  ==================================================================  ==============
name                    files under ``--data-root``                                          train / test
======================  ==================================================================  ==============
``cifar102``            ``cifar102_{train,test}.npz`` (``images`` N×32×32×3 uint8, ``labels``     10,000 / 2,000
                        int 0..9, ``label_names``; other keys ignored), or the study's pickles
                        ``cifar102_{train,test}_py27`` / ``cifar102_min_overlap_{train,test}_v4_py27``   8,000 / 2,000
``cifar101``            ``cifar10.1_v6_{data,labels}.npy`` (CIFAR-10.1 v6; test only)            – / 2,000
``cifar101_v4``         ``cifar10.1_v4_{data,labels}.npy`` (CIFAR-10.1 v4; test only)            – / 2,021
``cifar10_10k``         ``cifar10_10k_{train,test}_py27``                                          8,000 / 2,000
``cifar10_30k``         ``cifar10_30k_{train,test}_py27``                                         24,000 / 6,000
``cifar102_30k``        ``cifar102_30k_{train,test}_py27``                                        24,000 / 6,000
======================  ==================================================================  ==============

The ``_py27`` files are CIFAR-style pickles (``data`` N×3072 uint8 channel-planar, ``labels``) written by
Python 2 (str keys) or re-written by Python 3 (bytes keys); both load. All ten-class sets use CIFAR-10's
class order (the npz's ``label_names`` when present as a string array). The sizes are those of the published
files; smaller files load too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from micronet.data.readers import (
    CIFAR10_CLASSES,
    as_class_names,
    as_images,
    as_labels,
    read_npy,
    read_npz,
    read_pickle,
)
from micronet.errors import MicronetError

Loaded = tuple[Tensor, Tensor, tuple[str, ...]]


@dataclass(frozen=True)
class FileLayout:
    """One dataset's files: per split, alternative file sets (the first one present is read) and a reader."""

    name: str
    splits: dict[str, tuple[tuple[str, ...], ...]]  # split -> alternatives -> file names
    read: Callable[[Path, tuple[str, ...]], Loaded]

    def _present(self, root: Path, split: str) -> list[int]:
        """Indices of the alternatives whose files all exist for ``split``."""
        return [i for i, names in enumerate(self.splits.get(split, ()))
                if all((root / n).is_file() for n in names)]

    def files_for(self, root: Path, split: str) -> tuple[str, ...] | None:
        """The first alternative whose files all exist for ``split`` (None if none, or no such split).

        Alternatives are versions of the dataset (e.g. the published npz files vs the study's own pickles):
        a split is never read from one version while another split under ``root`` exists only in another.
        """
        found = self._present(root, split)
        if not found:
            return None
        index = found[0]
        for other in self.splits:
            there = self._present(root, other)
            if other != split and there and index not in there:
                mine, theirs = self.splits[split][index], self.splits[other][there[0]]
                raise MicronetError(f"{root} holds two versions of {self.name}: {split} in {'+'.join(mine)} but "
                                    f"{other} only in {'+'.join(theirs)}; keep one version's files")
        return self.splits[split][index]

    def present(self, root: Path) -> bool:
        """Whether any split of this dataset is present under ``root`` (a test-only folder is one too)."""
        return any(self._present(root, split) for split in self.splits)

    def expected(self) -> list[str]:
        """The file names of the first alternative of each split (for error messages)."""
        return [n for alternatives in self.splits.values() for n in alternatives[0]]

    def load(self, root: Path, split: str) -> Loaded:
        """``(images N×3×32×32 uint8, labels int64, class names)`` of ``split``."""
        if split not in self.splits:
            raise MicronetError(f"{self.name} has no {split} split (it is a test-only set: evaluate on it with "
                                f"`micronet eval ... --also-on {self.name}`)")
        names = self.files_for(root, split)
        if names is None:
            wanted = " or ".join("+".join(alt) for alt in self.splits[split])
            raise MicronetError(f"{root} is not a {self.name} root: missing {wanted}")
        return self.read(root, names)


def _read_npz(root: Path, names: tuple[str, ...]) -> Loaded:
    path = root / names[0]
    arrays = read_npz(path, ("images", "labels"))
    images = as_images(f"{path} key 'images'", arrays["images"], "nhwc")
    try:  # optional, and some writers store it as an object array (pickle): then CIFAR-10's class order
        names = read_npz(path, ("label_names",))["label_names"]
    except MicronetError:
        names = CIFAR10_CLASSES
    classes = as_class_names(f"{path} key 'label_names'", names, len(CIFAR10_CLASSES))
    labels = as_labels(f"{path} key 'labels'", arrays["labels"], images.shape[0], len(classes))
    return images, labels, classes


def _read_npy_pair(root: Path, names: tuple[str, ...]) -> Loaded:
    data_path, labels_path = root / names[0], root / names[1]
    images = as_images(str(data_path), read_npy(data_path), "nhwc")
    labels = as_labels(str(labels_path), read_npy(labels_path), images.shape[0], len(CIFAR10_CLASSES))
    return images, labels, CIFAR10_CLASSES


def _read_py27(root: Path, names: tuple[str, ...]) -> Loaded:
    path = root / names[0]
    batch = read_pickle(path)
    for key in ("data", "labels"):
        if key not in batch:
            raise MicronetError(f"{path} lacks the key {key!r} (has {', '.join(sorted(batch)) or 'nothing'})")
    images = as_images(f"{path} key 'data'", batch["data"], "planar")
    labels = as_labels(f"{path} key 'labels'", batch["labels"], images.shape[0], len(CIFAR10_CLASSES))
    return images, labels, CIFAR10_CLASSES


def _py27(name: str) -> dict[str, tuple[tuple[str, ...], ...]]:
    return {split: ((f"{name}_{split}_py27",),) for split in ("train", "test")}


def _cifar102_read(root: Path, names: tuple[str, ...]) -> Loaded:
    return (_read_npz if names[0].endswith(".npz") else _read_py27)(root, names)


LAYOUTS: dict[str, FileLayout] = {
    layout.name: layout
    for layout in (
        FileLayout("cifar102", {
            split: ((f"cifar102_{split}.npz",), (f"cifar102_{split}_py27",),
                    (f"cifar102_min_overlap_{split}_v4_py27",))
            for split in ("train", "test")
        }, _cifar102_read),
        FileLayout("cifar101", {"test": (("cifar10.1_v6_data.npy", "cifar10.1_v6_labels.npy"),)}, _read_npy_pair),
        FileLayout("cifar101_v4", {"test": (("cifar10.1_v4_data.npy", "cifar10.1_v4_labels.npy"),)},
                   _read_npy_pair),
        FileLayout("cifar10_10k", _py27("cifar10_10k"), _read_py27),
        FileLayout("cifar10_30k", _py27("cifar10_30k"), _read_py27),
        FileLayout("cifar102_30k", _py27("cifar102_30k"), _read_py27),
    )
}
