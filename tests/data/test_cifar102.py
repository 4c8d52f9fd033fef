"""The CIFAR-10.2 study's datasets load from their exact published formats, and damaged files fail in one line."""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np
import pytest
import torch

from micronet.data import DATASETS, detect_layout, load_dataset, subsample
from micronet.data.readers import CIFAR10_CLASSES
from micronet.errors import MicronetError
from tests.data.conftest import (
    CLASSES,
    pattern_images,
    py2_pickle,
    write_cifar101,
    write_cifar102_npz,
    write_npz,
    write_py27,
)


def _oracle(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(pattern_images(n, seed))


def test_every_study_dataset_is_a_choice():
    assert {"cifar102", "cifar101", "cifar101_v4", "cifar10_10k", "cifar10_30k", "cifar102_30k"} <= set(DATASETS)


def test_cifar102_npz_loads_channels_first_with_its_label_names(tmp_path):
    write_cifar102_npz(tmp_path, train=40, test=20)
    train, test = load_dataset(tmp_path, "train", "cifar102"), load_dataset(tmp_path, "test")
    assert detect_layout(tmp_path) == "cifar102"
    assert train.images.shape == (40, 3, 32, 32) and train.images.dtype == torch.uint8 and len(test) == 20
    # Channel c, row y, column x holds 80c + 3y + x + noise: the channels-last file became channels-first.
    assert torch.equal(train.images, _oracle(40, 1)) and torch.equal(test.images, _oracle(20, 2))
    assert train.classes == tuple(CLASSES) and train.num_classes == 10
    assert train.labels.dtype == torch.int64 and torch.equal(torch.bincount(train.labels), torch.full((10,), 4))


@pytest.mark.parametrize("version, name", [("v6", "cifar101"), ("v4", "cifar101_v4")])
def test_cifar101_npy_pairs_are_test_only(tmp_path, version, name):
    write_cifar101(tmp_path, version, n=20)
    test = load_dataset(tmp_path, "test", name)
    assert torch.equal(test.images, _oracle(20, 3 if version == "v6" else 4))
    assert test.num_classes == 10 and test.labels.max() <= 9
    with pytest.raises(MicronetError, match=f"{name} has no train split.*--also-on {name}"):
        load_dataset(tmp_path, "train", name)


@pytest.mark.parametrize("bytes_keys", [False, True], ids=["py27-str-keys", "py3-bytes-keys"])
@pytest.mark.parametrize("name", ["cifar10_10k", "cifar10_30k", "cifar102", "cifar102_30k"])
def test_study_pickles_load_with_str_or_bytes_keys(tmp_path, name, bytes_keys):
    write_py27(tmp_path, name, train=30, test=10, bytes_keys=bytes_keys)
    train, test = load_dataset(tmp_path, "train", name), load_dataset(tmp_path, "test", name)
    assert torch.equal(train.images, _oracle(30, 6)) and torch.equal(test.images, _oracle(10, 7))
    assert train.classes == tuple(CLASSES) and len(test) == 10 and 0 <= int(train.labels.min())


def test_the_studys_min_overlap_file_names_are_cifar102(tmp_path):
    for split, n in (("train", 20), ("test", 10)):
        data = pattern_images(n, 9).reshape(n, 3072)
        (tmp_path / f"cifar102_min_overlap_{split}_v4_py27").write_bytes(py2_pickle({"data": data,
                                                                                     "labels": [0] * n}))
    assert detect_layout(tmp_path) == "cifar102" and len(load_dataset(tmp_path, "train")) == 20


def test_cifar10_batches_with_bytes_keys_load_too(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    data = pattern_images(4, 0).reshape(4, 3072)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (base / name).write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1, 2, 3]}, protocol=2))
    (base / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in CLASSES]}, protocol=2))
    test = load_dataset(tmp_path, "test")
    assert torch.equal(test.images, _oracle(4, 0)) and test.num_classes == 10


def _npz(tmp_path, n=10, **override):
    write_npz(tmp_path / "cifar102_train.npz", n, 1, **override)
    write_npz(tmp_path / "cifar102_test.npz", 4, 2)
    return tmp_path


@pytest.mark.parametrize("override, message", [
    ({"labels": None}, "cifar102_train.npz lacks the key 'labels'"),
    ({"images": None}, "lacks the key 'images'"),
    ({"images": np.zeros((10, 32, 32, 3), np.float32)}, "key 'images': expected dtype uint8, got float32"),
    ({"images": np.zeros((10, 3, 32, 32), np.uint8)}, r"key 'images': expected shape \(N, 32, 32, 3\)"),
    ({"labels": np.full(10, 10)}, r"key 'labels': labels outside 0..9 \(found 10..10\)"),
    ({"labels": np.full(10, -1)}, "labels outside 0..9"),
    ({"labels": np.zeros(10, np.float64)}, "labels must be an integer array, got float64"),
    ({"labels": np.zeros(9, np.int64)}, r"expected 10 labels \(one per image\)"),
    ({"label_names": np.array(CLASSES[:9])}, "expected 10 label names, got 9"),
])
def test_malformed_npz_files_name_the_file_and_the_key(tmp_path, override, message):
    root = _npz(tmp_path, **override)
    with pytest.raises(MicronetError, match=message) as info:
        load_dataset(root, "train", "cifar102")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("names", [None, np.array([{"a": 1}] * 10, dtype=object)])
def test_label_names_absent_or_pickled_fall_back_to_cifar10_order(tmp_path, names):
    # label_names is optional, and an object array would need pickle: the class order is then CIFAR-10's.
    data = load_dataset(_npz(tmp_path, label_names=names), "train", "cifar102")
    assert data.classes == CIFAR10_CLASSES and len(data) == 10


def test_one_version_of_a_dataset_per_folder(tmp_path):
    root = _npz(tmp_path)
    (root / "cifar102_test.npz").unlink()
    (root / "cifar102_test_py27").write_bytes((root / "cifar102_train.npz").read_bytes())
    with pytest.raises(MicronetError, match="two versions of cifar102"):
        load_dataset(root, "test", "cifar102")


def test_a_test_only_folder_is_enough_for_evaluation(tmp_path):
    root = _npz(tmp_path)
    (root / "cifar102_train.npz").unlink()
    assert len(load_dataset(root, "test", "cifar102")) > 0
    with pytest.raises(MicronetError, match="missing cifar102_train.npz"):
        load_dataset(root, "train", "cifar102")


def test_damaged_npz_archives_fail_in_one_line(tmp_path):
    root = _npz(tmp_path)
    path = root / "cifar102_train.npz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(MicronetError, match="cannot read .*cifar102_train.npz"):
        load_dataset(root, "train", "cifar102")
    path.write_bytes(b"not a zip at all")
    with pytest.raises(MicronetError, match="cifar102_train.npz"):
        load_dataset(root, "train", "cifar102")
    # A header that claims more data than the member holds: refused before allocating.
    header = np.lib.format.header_data_from_array_1_0(np.zeros((10**6, 32, 32, 3), np.uint8))
    with zipfile.ZipFile(path, "w") as z:
        images = io.BytesIO()
        np.lib.format.write_array_header_1_0(images, header)
        z.writestr("images.npy", images.getvalue() + b"\0" * 100)
        for key in ("labels", "label_names"):
            inner = io.BytesIO()
            np.save(inner, np.zeros(10, np.int64))
            z.writestr(f"{key}.npy", inner.getvalue())
    with pytest.raises(MicronetError, match="key 'images': header declares 3,072,000,000 bytes of data but 100"):
        load_dataset(root, "train", "cifar102")


@pytest.mark.parametrize("case, message", [
    ("truncated", "cannot read pickle"),
    ("no-labels", "lacks the key 'labels'"),
    ("flat-data", r"key 'data': expected shape \(N, 3072\)"),
    ("string-labels", "labels must be integers"),
    ("huge-label", "labels outside 0..9"),
    ("code", r"refusing to load (__builtin__|builtins)\.print"),
    ("not-a-dict", "expected a dict, got list"),
])
def test_malformed_py27_pickles_name_the_file_and_what_is_wrong(tmp_path, case, message):
    write_py27(tmp_path, "cifar10_10k", train=10, test=4)
    path = tmp_path / "cifar10_10k_train_py27"
    data = pattern_images(10, 0).reshape(10, 3072)
    blob = {
        "truncated": path.read_bytes()[:200],
        "no-labels": py2_pickle({"data": data}),
        "flat-data": py2_pickle({"data": data.reshape(-1), "labels": [0] * 10}),
        "string-labels": py2_pickle({"data": data, "labels": ["cat"] * 10}),
        "huge-label": py2_pickle({"data": data, "labels": [2**70] * 10}),
        "code": pickle.dumps({"data": print, "labels": []}, protocol=2),
        "not-a-dict": pickle.dumps([data], protocol=2),
    }[case]
    path.write_bytes(blob)
    with pytest.raises(MicronetError, match=message) as info:
        load_dataset(tmp_path, "train", "cifar10_10k")
    assert "cifar10_10k_train_py27" in str(info.value) and "\n" not in str(info.value)


def test_npy_with_a_lying_header_is_refused(tmp_path):
    write_cifar101(tmp_path, "v6", n=20)
    path = tmp_path / "cifar10.1_v6_data.npy"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(MicronetError, match="cifar10.1_v6_data.npy: header declares 61,440 bytes of data"):
        load_dataset(tmp_path, "test", "cifar101")


def test_missing_files_say_which(tmp_path):
    with pytest.raises(MicronetError, match="not a cifar102 root: missing .*cifar102_train.npz.*cifar102_test.npz"):
        load_dataset(tmp_path, "train", "cifar102")
    (tmp_path / "cifar102_test.npz").write_bytes(b"")  # a test-only folder: the train split says what it lacks
    with pytest.raises(MicronetError, match="not a cifar102 root: missing cifar102_train.npz"):
        load_dataset(tmp_path, "train", "cifar102")


def test_subsample_is_stratified_exact_and_seeded(tmp_path):
    write_cifar102_npz(tmp_path, train=100, test=10)  # 10 images per class
    full = load_dataset(tmp_path, "train", "cifar102")
    small = subsample(full, 35, seed=1)
    counts = torch.bincount(small.labels, minlength=10)
    assert len(small) == 35 and int(counts.min()) == 3 and int(counts.max()) == 4  # 3.5 per class, split 5/5
    assert torch.equal(subsample(full, 35, seed=1).images, small.images)
    assert not torch.equal(subsample(full, 35, seed=2).images, small.images)
    with pytest.raises(MicronetError, match="subsample must be an image count in 1..100"):
        subsample(full, 101)
