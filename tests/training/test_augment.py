"""Each augmentation op does what spec training.md §4 says, on known images; pipelines are seeded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from micronet.errors import MicronetError
from micronet.training.augment import (
    MEAN_COLOUR,
    OPS,
    Augmentation,
    AugmentConfig,
    PolicyAugment,
    cutout,
    fa_magnitude,
    load_policy,
    pad_crop,
    parse_policy,
    random_flip,
    tf_magnitude,
)


def gradient_image(b: int = 1) -> torch.Tensor:
    """Pixel value = 8·column (0..248) in every channel, so each column has a known value."""
    row = (torch.arange(32) * 8).to(torch.uint8)
    return row.view(1, 1, 1, 32).expand(b, 3, 32, 32).clone()


def random_image(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


G = torch.Generator


def test_winner_policy_magnitudes_match_spec_table():
    policy = load_policy("micronet2019")
    rows = {op.name: (op.probability, tf_magnitude(op.name, op.level)) for (op,) in policy.subpolicies}
    assert len(policy.subpolicies) == 15 and policy.fill == MEAN_COLOUR
    assert rows["Solarize"] == (0.4, 154.0)
    assert rows["Posterize"] == (0.2, 4.0)
    assert rows["Rotate"] == (0.5, 3.0)
    assert rows["TranslateX"] == (0.4, 3.0) and rows["TranslateY"] == (0.6, 8.0)
    assert rows["Cutout"] == (0.3, 6.0)
    assert rows["Contrast"][1] == pytest.approx(0.82) and rows["Sharpness"][1] == pytest.approx(0.64)
    assert rows["ShearY"][1] == pytest.approx(0.12) and rows["ShearX"][1] == pytest.approx(0.09)
    assert rows["Color"][1] == pytest.approx(1.0) and rows["Brightness"][1] == pytest.approx(1.0)


def test_solarize_inverts_pixels_at_or_above_threshold():
    x = gradient_image()
    y = OPS["Solarize"](x, 154.0, MEAN_COLOUR, G())
    above = x >= 154
    assert torch.equal(y[above], 255 - x[above])
    assert torch.equal(y[~above], x[~above])


def test_posterize_keeps_four_bits():
    x = random_image()
    y = OPS["Posterize"](x, 4.0, MEAN_COLOUR, G())
    assert torch.equal(y, x & 0xF0)


def test_invert_and_level_5_enhancers_are_what_the_spec_says():
    x = random_image()
    assert torch.equal(OPS["Invert"](x, 0.0, MEAN_COLOUR, G()), 255 - x)
    for op in ("Color", "Brightness"):  # factor 1.0: the winner's two no-op tuples
        assert torch.equal(OPS[op](x, tf_magnitude(op, 5), MEAN_COLOUR, G()), x)


def test_translate_moves_content_and_fills_with_mean_colour():
    x = gradient_image()
    y = OPS["TranslateX"](x, 3.0, MEAN_COLOUR, G())  # PIL (1, 0, 3, 0, 1, 0): content moves 3 px left
    assert torch.equal(y[..., :29], x[..., 3:])
    assert torch.equal(y[0, :, :, 29:], torch.tensor(MEAN_COLOUR, dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 3))


def test_rotate_and_shear_match_pil_conventions():
    x = random_image(1)
    pil = Image.fromarray(x[0].permute(1, 2, 0).numpy())
    rotated = torch.from_numpy(np.array(pil.rotate(3, fillcolor=(0, 0, 0)))).permute(2, 0, 1)
    assert torch.equal(OPS["Rotate"](x, 3.0, (0, 0, 0), G())[0], rotated)
    sheared = torch.from_numpy(np.array(pil.transform(pil.size, Image.AFFINE, (1, 0.09, 0, 0, 1, 0),
                                                      fillcolor=(0, 0, 0)))).permute(2, 0, 1)
    differ = (OPS["ShearX"](x, 0.09, (0, 0, 0), G())[0] != sheared).any(0).sum().item()
    assert differ < 32 * 32 * 0.05  # nearest-neighbour rounding differs only along a few edges


def test_cutout_is_a_fixed_size_square_clipped_at_the_border():
    x = torch.zeros(256, 3, 32, 32, dtype=torch.uint8)
    y = cutout(x, 16, G().manual_seed(0), MEAN_COLOUR)
    patch = (y != 0).any(1)  # [B, H, W]
    assert torch.equal(y[:, 0][patch[:, None].expand(-1, 1, -1, -1)[:, 0]].unique(), torch.tensor([125]))
    sizes = patch.sum((1, 2))
    rows, cols = patch.any(2).sum(1), patch.any(1).sum(1)
    assert torch.equal(sizes, rows * cols)  # a rectangle
    assert rows.max() == 16 and cols.max() == 16 and (sizes == 256).any()
    assert (sizes < 256).any()  # patches that cross the border are clipped, not moved
    policy_patch = (OPS["Cutout"](x[:64], tf_magnitude("Cutout", 3), MEAN_COLOUR, G().manual_seed(1)) != 0).any(1)
    assert policy_patch.any(2).sum(1).max() == 6


def test_pad_crop_offsets_cover_zero_to_twice_the_padding():
    x = ((torch.arange(32) + 1) * 7).to(torch.uint8).view(1, 1, 1, 32).expand(512, 3, 32, 32).clone()
    y = pad_crop(x, 4, G().manual_seed(0), (0, 0, 0))
    offsets = []
    for row in y[:, 0, 16, :]:  # the middle row is inside the image for every vertical offset
        j0 = int(row.nonzero()[0])
        source_col = int(row[j0]) // 7 - 1
        offsets.append(source_col - j0 + 4)  # horizontal crop offset into the padded image
    assert set(offsets) == set(range(9))  # 0..2·padding inclusive
    assert y.shape == x.shape and y.dtype == torch.uint8


def test_flip_mirrors_about_half_the_images():
    x = random_image(400)
    y = random_flip(x, G().manual_seed(0))
    same = (y == x).flatten(1).all(1)
    mirrored = (y == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 150 < int(mirrored.sum()) < 250


def test_ops_per_image_applies_sub_policies_in_sequence():
    invert_always = parse_policy({"levels": "tf-autoaugment", "policy": [[["Invert", 1.0, 0]]]})
    x = random_image()
    assert torch.equal(PolicyAugment(invert_always, 1)(x, G().manual_seed(0)), 255 - x)
    assert torch.equal(PolicyAugment(invert_always, 2)(x, G().manual_seed(0)), x)  # applied twice


def test_probability_zero_never_applies():
    never = parse_policy([[["Invert", 0.0, 0.5], ["Solarize", 0.0, 0.5]]])
    x = random_image()
    assert torch.equal(PolicyAugment(never)(x, G().manual_seed(0)), x)


def test_fast_aa_levels_map_onto_their_ranges():
    assert fa_magnitude("Posterize", 0.0) == 4 and fa_magnitude("Posterize", 1.0) == 8
    assert fa_magnitude("Solarize", 0.5) == 128
    assert fa_magnitude("TranslateX", 1.0, 32) == pytest.approx(0.45 * 32)
    assert fa_magnitude("Rotate", 0.0) == -30 and fa_magnitude("Contrast", 1.0) == pytest.approx(1.9)
    assert fa_magnitude("Cutout", 1.0, 32) == pytest.approx(6.4)


def test_policy_file_loads_from_a_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([[["ShearX", 0.5, 0.7], ["Cutout", 0.9, 0.3]], [["Equalize", 0.2, 0.0]]]))
    policy = load_policy(path)
    assert policy.levels == "fast-autoaugment" and policy.fill == (0, 0, 0)
    assert [len(s) for s in policy.subpolicies] == [2, 1]


@pytest.mark.parametrize("bad, message", [
    ([[["Warp", 0.5, 0.5]]], "unknown op 'Warp'"),
    ([[["Invert", 1.5, 0.5]]], "probability 1.5"),
    ([[["Rotate", 0.5, 3]]], "level 3"),
    ({"levels": "tf-autoaugment", "policy": []}, "non-empty"),
    ({"levels": "mine", "policy": [[["Invert", 0.5, 1]]]}, "levels must be"),
])
def test_bad_policies_are_rejected_with_a_clear_message(bad, message):
    with pytest.raises(MicronetError, match=message):
        parse_policy(bad)


def test_unknown_policy_name_lists_the_shipped_ones():
    with pytest.raises(MicronetError, match="micronet2019"):
        load_policy("no-such-policy")


@pytest.mark.parametrize("policy", ["micronet2019", "autoaugment-cifar10", "randaugment", "trivialaugment"])
def test_pipelines_are_deterministic_given_the_generator(policy):
    aug = Augmentation(AugmentConfig(policy=policy, ops_per_image=2 if policy == "micronet2019" else 1, cutout=16))
    x = random_image(16)
    a = aug(x, G().manual_seed(5))
    assert torch.equal(a, aug(x, G().manual_seed(5)))
    assert not torch.equal(a, aug(x, G().manual_seed(6)))
    assert a.shape == x.shape and a.dtype == torch.uint8


def test_shear_moves_pixels_as_pil_does():
    # PIL: output(x, y) = input(x + s*y, y); the op is checked against PIL itself, pixel by pixel.
    import numpy as np
    from PIL import Image

    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    x[..., 30, 10] = 255
    x[..., 5, 20] = 255
    pil = Image.fromarray(x[0].permute(1, 2, 0).numpy()).transform(
        (32, 32), Image.Transform.AFFINE, (1, 0.1, 0, 0, 1, 0), resample=Image.Resampling.NEAREST)
    expected = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
    y = OPS["ShearX"](x, 0.1, (0, 0, 0), G())
    assert torch.equal(y[0].nonzero(), expected.nonzero())
    assert int(y[0, 0, 30].nonzero()[0]) == 10 - round(0.1 * 30)
