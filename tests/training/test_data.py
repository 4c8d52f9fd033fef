"""Datasets load from the real on-disk formats; splits, shards and batch streams behave as documented."""

from __future__ import annotations

import pickle

import pytest
import torch

from micronet.data import detect_layout, get_normalization, load_dataset, split_holdout
from micronet.errors import MicronetError
from micronet.training.augment import Augmentation, AugmentConfig
from micronet.training.batches import BatchStream, shard_indices


def test_cifar10_pickles_load_as_uint8_tensors(cifar10_root):
    train, test = load_dataset(cifar10_root, "train"), load_dataset(cifar10_root, "test")
    assert detect_layout(cifar10_root) == "cifar10"
    assert train.images.shape == (640, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (200, 3, 32, 32) and train.labels.dtype == torch.int64
    assert train.classes[0] == "class0" and torch.equal(torch.bincount(train.labels), torch.full((10,), 64))


def test_cifar100_pickles_use_fine_labels(cifar100_root):
    train = load_dataset(cifar100_root, "train", "cifar100")
    assert train.num_classes == 100 and train.labels.max() == 99 and len(train) == 300
    assert detect_layout(cifar100_root) == "cifar100"


def test_image_folders_load_with_sorted_class_names(folder_root):
    train = load_dataset(folder_root, "train")
    assert detect_layout(folder_root) == "folder"
    assert train.classes == ("c0", "c1", "c2") and train.images.shape == (12, 3, 32, 32)


def test_pixels_survive_the_pickle_round_trip(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    data = torch.arange(2 * 3072).remainder(256).to(torch.uint8).view(2, 3072).numpy()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump({"data": data, "labels": [0, 1]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["a", "b"]}, f)
    test = load_dataset(tmp_path, "test")
    assert torch.equal(test.images.view(2, -1), torch.from_numpy(data))  # channel-major, row-major as in CIFAR


def test_missing_root_and_wrong_layout_say_what_was_expected(tmp_path):
    with pytest.raises(MicronetError, match="does not exist"):
        load_dataset(tmp_path / "nope", "train")
    (tmp_path / "random").mkdir()
    with pytest.raises(MicronetError, match="cifar-100-python"):
        load_dataset(tmp_path / "random", "train")
    with pytest.raises(MicronetError, match="missing cifar-100-python/train"):
        load_dataset(tmp_path / "random", "train", "cifar100")


def test_pickles_that_would_run_code_are_refused(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        with open(base / name, "wb") as f:
            pickle.dump({"data": print, "labels": []}, f)  # a callable by reference: never to be resolved
    with pytest.raises(MicronetError, match="refusing to load builtins.print"):
        load_dataset(tmp_path, "train")


def test_holdout_is_stratified_and_seeded(cifar10_root):
    full = load_dataset(cifar10_root, "train")
    train, val = split_holdout(full, 0.25, seed=3)
    assert len(val) == 160 and len(train) == 480
    assert torch.equal(torch.bincount(val.labels), torch.full((10,), 16))
    again = split_holdout(full, 0.25, seed=3)[1]
    assert torch.equal(again.images, val.images)
    assert not torch.equal(split_holdout(full, 0.25, seed=4)[1].images, val.images)
    assert len(split_holdout(full, 100)[1]) == 100  # a count works too


def test_shards_partition_the_epoch_like_distributed_sampler():
    shards = [shard_indices(10, 0, seed=1, shuffle=True, rank=r, world_size=3) for r in range(3)]
    assert {len(s) for s in shards} == {4}  # padded to equal length
    assert set(torch.cat(shards).tolist()) == set(range(10))
    exact = [shard_indices(10, 0, seed=1, shuffle=False, rank=r, world_size=3, even=False) for r in range(3)]
    assert sorted(torch.cat(exact).tolist()) == list(range(10))


def test_batches_depend_only_on_seed_epoch_rank_and_index(cifar10_root):
    data = load_dataset(cifar10_root, "train")
    aug = Augmentation(AugmentConfig(policy="micronet2019", cutout=16))
    a = BatchStream(data, 64, shuffle=True, augment=aug, seed=9)
    first = list(a.epoch(1))
    assert len(first) == 10
    assert torch.equal(a.make_batch(1, 3)[0], first[3][0])  # any batch can be rebuilt on its own
    assert not torch.equal(first[0][0], next(iter(a.epoch(2)))[0])
    workers = BatchStream(data, 64, shuffle=True, augment=aug, seed=9, num_workers=2)
    for (x1, y1), (x2, y2) in zip(first, workers.epoch(1)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_legacy_normalization_divides_by_255_once_more():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    winner, legacy = get_normalization("micronet2019"), get_normalization("riair2019")
    assert torch.allclose(legacy(x) * 255, winner(x), atol=1e-5)
    assert winner.mean_colour() == (125, 123, 114)
    with pytest.raises(MicronetError, match="unknown normalization"):
        get_normalization("imagenet")
