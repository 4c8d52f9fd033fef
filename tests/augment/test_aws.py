"""AWS AutoAugment: the 36-op space, PPO on a stub reward (monotone rise, KL stop, exact resume), a tiny real run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from micronet.data import get_normalization
from micronet.training.augment import fa_magnitude, load_policy
from micronet.training.loop import setup_runtime
from micronet.training.policy_search import AWS_OPS, SearchSettings, open_search, ppo_search, search_aws
from micronet.training.policy_search.aws import N_OPS, STATE_FILE
from micronet.training.policy_search.common import data_identity
from tests.augment.conftest import TINY_MODEL, orientation_images

COLOUR = {"Color", "Contrast", "Brightness", "Sharpness"}
HELPFUL = torch.tensor([AWS_OPS[a // N_OPS][0] in COLOUR and AWS_OPS[a % N_OPS][0] in COLOUR
                        for a in range(N_OPS * N_OPS)])


def stub_reward(action, loop, episode) -> float:
    """Accuracy-like: 0.5 for the uniform policy and unhelpful pairs, 0.6 for pairs of two colour ops."""
    return 0.5 if action is None else 0.5 + 0.1 * float(HELPFUL[action])


def test_the_search_space_is_11_ops_at_3_strengths_plus_3_fixed_ops():
    names = [name for name, _ in AWS_OPS]
    assert len(AWS_OPS) == 36 and len(set(AWS_OPS)) == 36
    assert {n for n in names if names.count(n) == 3} == {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                                                        "Color", "Solarize", "Posterize", "Contrast", "Sharpness",
                                                        "Brightness"}
    assert {n for n in names if names.count(n) == 1} == {"AutoContrast", "Equalize", "Invert"}
    magnitudes = {}
    for name, level in AWS_OPS:
        magnitudes.setdefault(name, []).append(round(fa_magnitude(name, level, 32), 6))
    # The official search space's strengths, by hand: shear 0.1/0.2/0.3, translate 0.15/0.3/0.45 of 32 px,
    # rotate 10/20/30 degrees, colour 0.3/0.6/0.9, solarize 26/102/179, posterize 4/5/6 bits, enhance 1.3/1.6/1.9.
    assert magnitudes["ShearX"] == [0.1, 0.2, 0.3] and magnitudes["Rotate"] == [10, 20, 30]
    assert magnitudes["TranslateY"] == [4.8, 9.6, 14.4] and magnitudes["Color"] == [0.3, 0.6, 0.9]
    assert magnitudes["Solarize"] == [26, 102, 179] and magnitudes["Posterize"] == [4, 5, 6]
    assert magnitudes["Contrast"] == magnitudes["Sharpness"] == magnitudes["Brightness"] == [1.3, 1.6, 1.9]


def _run(out, loops, **kw):
    settings = SearchSettings(method="aws", loops=loops, episodes=8, seed=kw.pop("seed", 0), **kw)
    return ppo_search(stub_reward, settings, out)


def test_ppo_raises_the_helpful_pairs_probability_monotonically(tmp_path):
    mass = [float(HELPFUL.float().mean())]  # uniform start: 144 / 1296
    for loops in range(1, 13):
        policy, _ = _run(tmp_path, loops)
        mass.append(float(policy.probs()[HELPFUL].sum()))
    assert mass[0] == pytest.approx(1 / 9)
    assert all(b > a for a, b in zip(mass, mass[1:])), mass
    assert mass[-1] > 0.3  # measured 0.36 after 12 loops (seeds 1-3: 0.23-0.33, never decreasing either)


def test_ppo_stops_its_steps_at_the_kl_bound(tmp_path):
    _run(tmp_path / "tight", 3, max_kl=1e-6, ppo_epochs=10)
    _run(tmp_path / "loose", 3, max_kl=10.0, ppo_epochs=10)
    tight = [json.loads(x) for x in (tmp_path / "tight" / "loops.jsonl").read_text().splitlines()]
    loose = [json.loads(x) for x in (tmp_path / "loose" / "loops.jsonl").read_text().splitlines()]
    assert [r["ppo_steps"] for r in tight] == [1, 1, 1] and all(r["kl"] > 1e-6 for r in tight)
    assert [r["ppo_steps"] for r in loose] == [10, 10, 10]


def test_a_resumed_ppo_search_is_bit_identical(tmp_path):
    _run(tmp_path / "straight", 6)
    _run(tmp_path / "resumed", 3)
    _run(tmp_path / "resumed", 6)
    a, b = (load_file(str(tmp_path / d / STATE_FILE)) for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "rng.cpu")
    assert (tmp_path / "straight" / "loops.jsonl").read_text() == (tmp_path / "resumed" / "loops.jsonl").read_text()


def test_a_tiny_real_aws_search_writes_a_weighted_policy(tmp_path):
    data = orientation_images(10, seed=6)
    settings = SearchSettings(method="aws", model=TINY_MODEL, epochs=1, batch_size=32, cutout=0, crop_padding=2,
                              loops=1, episodes=2, finetune_epochs=1, keep=20, seed=1)
    open_search(tmp_path, settings, data_identity(data), resume=False)
    path = search_aws(data, settings, tmp_path, setup_runtime("cpu"), get_normalization("fastaa"),
                      searched_on="orientation", progress=False)
    policy = load_policy(path)
    assert len(policy.subpolicies) == 20 and policy.weights is not None and policy.searched_on == "orientation"
    assert list(policy.weights) == sorted(policy.weights, reverse=True)
    assert all(len(sub) == 2 and sub[0].probability == sub[1].probability == 1.0 for sub in policy.subpolicies)
    assert len(policy.metadata["metadata"]["loop_rewards"]) == 1
