"""Stratified K splits and Fast AutoAugment's any-of-V reward."""

from __future__ import annotations

import pytest
import torch

from micronet.data import get_normalization, stratified_splits
from micronet.errors import MicronetError
from micronet.training.evaluate import evaluate
from micronet.training.loop import setup_runtime
from micronet.training.policy_search import SearchSettings, any_of_views_accuracy, train_model
from micronet.training.policy_search.common import baseline_augmentation, make_policy, with_policy
from tests.augment.conftest import CLASSES, TINY_MODEL, orientation_images


def test_splits_have_exact_stratified_sizes_and_partition_the_data():
    labels = torch.arange(4).repeat_interleave(torch.tensor([10, 20, 30, 45]))  # unequal classes
    splits = stratified_splits(labels, 5, 0.4, seed=3)
    assert len(splits) == 5
    for keep, held in splits:
        assert sorted(torch.cat([keep, held]).tolist()) == list(range(len(labels)))  # a partition
        # round(0.4 * class size) per class, by hand: 4, 8, 12, 18
        assert torch.bincount(labels[held], minlength=4).tolist() == [4, 8, 12, 18]
        assert torch.bincount(labels[keep], minlength=4).tolist() == [6, 12, 18, 27]
    assert len({tuple(h.tolist()) for _, h in splits}) == 5  # five different held-out sets


def test_splits_are_deterministic_per_seed():
    labels = torch.arange(3).repeat(30)
    a, b, c = (stratified_splits(labels, 3, 0.2, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, c))


@pytest.mark.parametrize(("splits", "fraction"), [(0, 0.4), (2, 0.0), (2, 1.0)])
def test_bad_split_arguments_are_one_line_errors(splits, fraction):
    with pytest.raises(MicronetError):
        stratified_splits(torch.arange(10), splits, fraction)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = orientation_images(40, seed=0)
    settings = SearchSettings(model=TINY_MODEL, epochs=2, batch_size=64, cutout=0, crop_padding=2)
    rt, norm = setup_runtime("cpu"), get_normalization("fastaa")
    model = train_model(settings.model, data, settings, rt, norm, baseline_augmentation(settings), seed=0)
    return model, orientation_images(20, seed=1), settings, rt, norm


def test_any_of_views_with_the_identity_policy_is_plain_accuracy(trained):
    model, held, settings, rt, norm = trained
    identity = with_policy(make_policy([[["Identity", 1.0, 0.0]]]), None)
    reward = any_of_views_accuracy(model, held, identity, 5, 0, norm, rt, batch_size=32)
    plain = evaluate(model, held, norm, device="cpu")["top1"] / 100  # the library's evaluation path, not ours
    assert reward == pytest.approx(plain, abs=1e-9)
    assert 1 / CLASSES < reward < 1  # a learned, imperfect model: the comparison is not vacuous


def test_any_of_views_is_never_below_a_single_view_and_grows_with_views(trained):
    model, held, settings, rt, norm = trained
    augment = with_policy(make_policy([[["Rotate", 0.7, 0.9], ["Color", 0.5, 0.8]]]), baseline_augmentation(settings))
    rewards = [any_of_views_accuracy(model, held, augment, v, 7, norm, rt, batch_size=32) for v in (1, 2, 5)]
    assert rewards[0] <= rewards[1] <= rewards[2]
    assert rewards[2] > rewards[0]  # random rotations: extra views do rescue some images
