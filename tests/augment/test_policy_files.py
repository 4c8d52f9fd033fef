"""The shipped Fast-AA CIFAR-100 policy, its magnitude mapping (spec training.md §4.2, against PIL on a
hand-made image), policy-file metadata and weights, and the track rule."""

from __future__ import annotations

import json
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from micronet.errors import MicronetError
from micronet.training.augment import (
    PolicyAugment,
    PolicyTrackWarning,
    check_track,
    load_policy,
    parse_policy,
)
from micronet.training.policy_search import FASTAA_OPS
from micronet.training.policy_search.common import make_policy
from micronet.training.policy_search.show import policy_summary
from micronet.training.recipe import load_recipe

SHIPPED = "fa_shake26_2x96d_cifar100"


def test_the_shipped_fast_aa_policy_is_498_two_op_sub_policies_with_its_license():
    policy = load_policy(SHIPPED)
    assert len(policy.subpolicies) == 498 and {len(s) for s in policy.subpolicies} == {2}
    assert policy.levels == "fast-autoaugment" and policy.searched_on == "cifar100" and policy.weights is None
    counts = Counter(op.name for sub in policy.subpolicies for op in sub)
    # spec §4.2, op frequency in the list (996 ops in all)
    assert counts == {"Cutout": 154, "Sharpness": 94, "Color": 86, "Posterize": 83, "AutoContrast": 78,
                      "Contrast": 78, "ShearX": 65, "Invert": 55, "Brightness": 50, "ShearY": 47, "TranslateY": 43,
                      "Equalize": 43, "Solarize": 40, "Rotate": 40, "TranslateX": 40}
    assert set(counts) == set(FASTAA_OPS)
    assert "MIT License" in policy.metadata["license"] and "Kthyeon" in policy.metadata["license"]
    assert load_recipe("pyramidnet272-fastaa").augment.policy == SHIPPED


def hand_image() -> torch.Tensor:
    """32x32: a horizontal ramp in red, a vertical ramp in green, a bright off-centre square in blue."""
    x = torch.zeros(3, 32, 32, dtype=torch.uint8)
    x[0] = (torch.arange(32) * 7 + 20).to(torch.uint8)[None, :]
    x[1] = (torch.arange(32) * 5 + 40).to(torch.uint8)[:, None]
    x[2] = 30
    x[2, 6:14, 18:27] = 230
    return x


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _apply(op: str, level: float, n: int = 1) -> torch.Tensor:
    policy = make_policy([[[op, 1.0, level]]])
    return PolicyAugment(policy)(hand_image()[None].expand(n, -1, -1, -1).clone(), torch.Generator().manual_seed(0))


AFFINE = Image.Transform.AFFINE
# (op, level, spec §4.2 value = low + level·(high − low), PIL oracle for a value v, largest |difference|, share of
# pixels allowed to differ by more: nearest-neighbour rounding along edges, PIL's integer enhance maths)
CASES = [
    ("ShearX", 1.0, 0.3, lambda im, v: im.transform(im.size, AFFINE, (1, v, 0, 0, 1, 0)), 0, 0.06),
    ("ShearY", 0.0, -0.3, lambda im, v: im.transform(im.size, AFFINE, (1, 0, 0, v, 1, 0)), 0, 0.06),
    ("TranslateX", 7 / 9, 8.0, lambda im, v: im.transform(im.size, AFFINE, (1, 0, v, 0, 1, 0)), 0, 0.0),
    ("TranslateY", 2 / 9, -8.0, lambda im, v: im.transform(im.size, AFFINE, (1, 0, 0, 0, 1, v)), 0, 0.0),
    ("Rotate", 1.0, 30.0, lambda im, v: im.rotate(v), 0, 0.06),
    ("Solarize", 0.5, 128.0, lambda im, v: ImageOps.solarize(im, v), 0, 0.0),
    ("Posterize", 0.3, 5.0, lambda im, v: ImageOps.posterize(im, int(v)), 0, 0.0),  # int(4 + 0.3·4) = 5 bits
    ("Contrast", 1.0, 1.9, lambda im, v: ImageEnhance.Contrast(im).enhance(v), 2, 0.0),
    ("Color", 0.25, 0.55, lambda im, v: ImageEnhance.Color(im).enhance(v), 2, 0.0),
    ("Brightness", 0.75, 1.45, lambda im, v: ImageEnhance.Brightness(im).enhance(v), 2, 0.0),
    ("Sharpness", 1.0, 1.9, lambda im, v: ImageEnhance.Sharpness(im).enhance(v), 2, 0.0),
    ("AutoContrast", 0.3, None, lambda im, v: ImageOps.autocontrast(im), 1, 0.0),
    ("Invert", 0.7, None, lambda im, v: ImageOps.invert(im), 0, 0.0),
    ("Equalize", 0.1, None, lambda im, v: ImageOps.equalize(im), 1, 0.0),
]


@pytest.mark.parametrize(("op", "level", "value", "oracle", "tolerance", "edge_share"), CASES,
                         ids=[c[0] for c in CASES])
def test_each_fast_aa_op_maps_its_level_as_the_spec_table_says(op, level, value, oracle, tolerance, edge_share):
    out = _apply(op, level)[0].int()
    pil = _pil(hand_image())
    signed = op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
    candidates = [value, -value] if signed else [value]  # geometric ops get a random sign
    best = min(((out - _tensor(oracle(pil, v)).int()).abs().amax(0).gt(tolerance).float().mean().item())
               for v in candidates)
    assert best <= edge_share, (op, best)


def test_solarize_at_the_top_of_its_range_inverts_nothing():
    # level 1 -> threshold 256 (spec §4.2 range [0, 256]): PIL inverts no pixel; a search can propose it
    assert torch.equal(_apply("Solarize", 1.0)[0], _tensor(ImageOps.solarize(_pil(hand_image()), 256)))


def test_cutout_level_maps_to_a_fraction_of_the_image_size():
    # spec: side = level · 0.2 · 32 px, truncated; level 0.5 -> 3 px, filled with (125, 123, 114)
    out = _apply("Cutout", 0.5, n=64)
    changed = (out != hand_image()[None]).any(1).flatten(1).sum(1)
    assert changed.max().item() == 9 and changed.min().item() >= 3


def test_weighted_policies_draw_sub_policies_in_proportion_to_their_weights():
    policy = parse_policy({"policy": [[["Invert", 1.0, 0.5]], [["Identity", 1.0, 0.0]]], "weights": [3, 1]})
    x = torch.full((4000, 3, 1, 1), 10, dtype=torch.uint8)
    inverted = (PolicyAugment(policy)(x, torch.Generator().manual_seed(0)) == 245).all(1).float().mean().item()
    assert inverted == pytest.approx(0.75, abs=0.03)


@pytest.mark.parametrize(("obj", "message"), [
    ({"policy": [[["Spin", 0.5, 0.5]]]}, "unknown op 'Spin'"),
    ({"policy": [[["Rotate", 1.5, 0.5]]]}, "probability 1.5 of Rotate is not in"),
    ({"policy": [[["Rotate", 0.5, 0.5]]], "weights": [1, 2]}, "weights must be a list of 1"),
    ({"policy": [[["Rotate", 0.5, 0.5]]], "weights": [-1]}, "non-negative"),
    ({"policy": [[["Rotate", 0.5, 0.5]]], "searched_on": 5}, "searched_on"),
    ({"policy": [[["Rotate", 0.5, 0.5]]], "colour": 5}, "unknown keys"),
])
def test_bad_policy_files_are_one_line_errors(obj, message):
    with pytest.raises(MicronetError, match=message) as info:
        parse_policy(obj, "p")
    assert "\n" not in str(info.value)


def test_a_policy_searched_on_another_dataset_warns_and_strict_track_refuses(tmp_path):
    path = tmp_path / "c10.json"
    path.write_text(json.dumps({"searched_on": "cifar10", "policy": [[["Invert", 0.5, 0.5]]]}))
    with pytest.warns(PolicyTrackWarning, match="cifar100 track of the MicroNet Challenge"):
        load_recipe("micronet2019-densenet", sets=[f"augment.policy={path}"])
    with pytest.raises(MicronetError, match="--strict-track"):
        load_recipe("micronet2019-densenet", sets=[f"augment.policy={path}"], strict_track=True)
    with pytest.raises(MicronetError, match="autoaugment-cifar10"):
        check_track("autoaugment-cifar10", "cifar100", strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_recipe("pyramidnet272-fastaa", strict_track=True)  # searched on CIFAR-100: fine
        check_track(load_policy(path), "cifar10", strict=True)  # CIFAR-10 is not a track


def test_show_shares_are_shares_of_op_slots_and_sum_to_one():
    # Shipped: 498 two-op sub-policies, Cutout in 154 of the 996 op slots (the hand count pinned in test_cli).
    summary = policy_summary(load_policy(SHIPPED))
    assert summary["ops"]["Cutout"]["share"] == pytest.approx(154 / 996)
    assert sum(r["share"] for r in summary["ops"].values()) == pytest.approx(1.0)
    # Weighted, mixed lengths: slots are Rotate(w=3), Invert(w=3), Rotate(w=1) -> Rotate 4/7, Invert 3/7.
    policy = make_policy([[["Rotate", 0.5, 0.5], ["Invert", 0.5, 0.5]], [["Rotate", 0.5, 0.5]]], weights=[3.0, 1.0])
    ops = policy_summary(policy)["ops"]
    assert ops["Rotate"]["share"] == pytest.approx(4 / 7) and ops["Invert"]["share"] == pytest.approx(3 / 7)
