"""Tiny files in each exact published format of the CIFAR-10.2 study's datasets.

* CIFAR-10.2: ``cifar102_{train,test}.npz`` with ``images`` (N, 32, 32, 3) uint8, ``labels`` int64,
  ``label_names`` (and an extra key the reader must ignore).
* CIFAR-10.1: ``cifar10.1_v6_data.npy`` (N, 32, 32, 3) uint8 + ``cifar10.1_v6_labels.npy`` (v4 likewise).
* The study's ``NAME_{train,test}_py27`` pickles: ``data`` (N, 3072) uint8 channel-planar, ``labels`` list.
  ``py2_pickle`` writes them as Python 2's cPickle did (keys and array bytes as BINSTRING opcodes, i.e.
  Python-2 ``str``); ``bytes_keys=True`` writes them as a Python 3 writer with ``b"data"`` keys would.

Pixel values encode (image, channel, row, column) so channel order and orientation are checkable.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np

from tests.threads import one_thread_per_test  # noqa: F401  (autouse: one thread per test)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def pattern_images(n: int, seed: int) -> np.ndarray:
    """uint8 (n, 3, 32, 32): channel c holds 80*c + row + column + image-specific noise, mod 256."""
    rng = np.random.default_rng(seed)
    c = np.arange(3).reshape(1, 3, 1, 1)
    yy = np.arange(32).reshape(1, 1, 32, 1)
    xx = np.arange(32).reshape(1, 1, 1, 32)
    base = 80 * c + 3 * yy + xx + rng.integers(0, 20, size=(n, 1, 1, 1))
    return (base % 256).astype(np.uint8)


def balanced_labels(n: int, seed: int) -> np.ndarray:
    labels = np.arange(n) % 10
    np.random.default_rng(seed).shuffle(labels)
    return labels.astype(np.int64)


class _Py2Pickler(pickle._Pickler):
    """Python 2 cPickle's protocol-2 output: ``str`` (and byte strings) as BINSTRING opcodes."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def py2_pickle(obj) -> bytes:
    """``obj`` pickled as Python 2.7 would have (protocol 2, str keys as BINSTRING)."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def write_npz(path: Path, n: int, seed: int, **override) -> tuple[np.ndarray, np.ndarray]:
    images = pattern_images(n, seed)  # N×3×H×W; the file holds N×H×W×3
    labels = balanced_labels(n, seed)
    arrays = {"images": images.transpose(0, 2, 3, 1).copy(), "labels": labels, "label_names": np.array(CLASSES),
              "extra_key_ignored": np.zeros(3)}
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return images, labels


def write_cifar102_npz(root: Path, train: int = 40, test: int = 20) -> Path:
    write_npz(root / "cifar102_train.npz", train, 1)
    write_npz(root / "cifar102_test.npz", test, 2)
    return root


def write_cifar101(root: Path, version: str = "v6", n: int = 20) -> Path:
    images = pattern_images(n, 3 if version == "v6" else 4)
    np.save(root / f"cifar10.1_{version}_data.npy", images.transpose(0, 2, 3, 1).copy())
    np.save(root / f"cifar10.1_{version}_labels.npy", balanced_labels(n, 5))
    return root


def write_py27(root: Path, name: str, train: int = 30, test: int = 10, bytes_keys: bool = False) -> Path:
    for split, n, seed in (("train", train, 6), ("test", test, 7)):
        data = pattern_images(n, seed).reshape(n, 3072)
        labels = [int(v) for v in balanced_labels(n, seed)]
        if bytes_keys:
            blob = pickle.dumps({b"data": data, b"labels": labels, b"batch_label": b"x"}, protocol=2)
        else:
            blob = py2_pickle({"data": data, "labels": labels, "batch_label": "x"})
        (root / f"{name}_{split}_py27").write_bytes(blob)
    return root
