"""Tiny generated datasets in the real on-disk formats (CIFAR python pickles, image folders).

Each class is a coloured blob of its own colour at a random place on a noisy background: a tiny
DenseNet learns it within a few CPU epochs, so accuracy far above chance shows training works.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.threads import one_thread_per_test  # noqa: F401  (autouse: one thread per test)

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (250, 190, 190), (0, 128, 128)]


def blob_images(labels: list[int], seed: int, size: int = 32) -> np.ndarray:
    """uint8 N×3×size×size images: class colour disc (radius 7) on a dim noise background."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    images = rng.integers(0, 90, size=(n, 3, size, size), dtype=np.int64)
    yy, xx = np.mgrid[0:size, 0:size]
    for i, label in enumerate(labels):
        cy, cx = rng.integers(8, size - 8, size=2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 49
        colour = PALETTE[label % len(PALETTE)]
        for c in range(3):
            images[i, c][disc] = colour[c]
    return images.astype(np.uint8)


def _labels(per_class: int, classes: int, seed: int) -> list[int]:
    labels = [c for c in range(classes) for _ in range(per_class)]
    np.random.default_rng(seed).shuffle(labels)
    return labels


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, train_per_class: int = 64, test_per_class: int = 20) -> Path:
    """``root/cifar-10-batches-py`` exactly as torchvision lays it out (5 train batches, test, meta)."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    labels = _labels(train_per_class, 10, 1)
    images = blob_images(labels, 2).reshape(len(labels), -1)
    for i, part in enumerate(np.array_split(np.arange(len(labels)), 5)):
        _dump(base / f"data_batch_{i + 1}", {"batch_label": f"training batch {i + 1} of 5",
                                             "labels": [labels[j] for j in part], "data": images[part],
                                             "filenames": [f"img_{j}.png" for j in part]})
    test_labels = _labels(test_per_class, 10, 3)
    _dump(base / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test_labels,
                                "data": blob_images(test_labels, 4).reshape(len(test_labels), -1),
                                "filenames": [f"t_{j}.png" for j in range(len(test_labels))]})
    _dump(base / "batches.meta", {"label_names": [f"class{c}" for c in range(10)], "num_cases_per_batch": 10000,
                                  "num_vis": 3072})
    return root


def write_cifar100(root: Path, train_per_class: int = 3, test_per_class: int = 1) -> Path:
    """``root/cifar-100-python/{train,test,meta}`` with fine and coarse labels."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    for split, per_class, seed in (("train", train_per_class, 5), ("test", test_per_class, 6)):
        labels = _labels(per_class, 100, seed)
        _dump(base / split, {"filenames": [f"{split}_{j}.png" for j in range(len(labels))],
                             "batch_label": f"{split}ing batch 1 of 1", "fine_labels": labels,
                             "coarse_labels": [c // 5 for c in labels],
                             "data": blob_images(labels, seed + 10).reshape(len(labels), -1)})
    _dump(base / "meta", {"fine_label_names": [f"fine{c}" for c in range(100)],
                          "coarse_label_names": [f"coarse{c}" for c in range(20)]})
    return root


def write_folder(root: Path, per_class: int = 4, classes: int = 3) -> Path:
    """``root/training_set/<class>/*.png`` and ``root/test_set/<class>/*.png``."""
    from PIL import Image

    for split, seed in (("training_set", 7), ("test_set", 8)):
        labels = _labels(per_class, classes, seed)
        images = blob_images(labels, seed + 1)
        for j, (label, image) in enumerate(zip(labels, images)):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{j}.png")
    return root




@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> Path:
    """A tiny learnable CIFAR-10-format dataset (640 train / 200 test images)."""
    return write_cifar10(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory) -> Path:
    """A tiny CIFAR-100-format dataset (300 train / 100 test images)."""
    return write_cifar100(tmp_path_factory.mktemp("cifar100"))


@pytest.fixture(scope="session")
def folder_root(tmp_path_factory) -> Path:
    """A tiny image-folder dataset (3 classes)."""
    return write_folder(tmp_path_factory.mktemp("folder"))
