"""The 2019 winner's merged format: import, score, and react to edits of the file's codes."""

from fractions import Fraction

import pytest
import torch

from micronet.compress.integer_modules import ChannelAffine, IntConv2d, IntLinear, RoundClamp
from micronet.errors import MicronetError
from micronet.io import detect_format, load_model
from micronet.io.riair2019 import build_riair2019, expected_shapes, random_riair2019_state
from micronet.scoring import score


@pytest.fixture(scope="module")
def state():
    return random_riair2019_state(seed=1)


@pytest.fixture(scope="module")
def path(state, tmp_path_factory):
    p = tmp_path_factory.mktemp("riair") / "densenet-100.pth.tar"
    torch.save(state, p)
    return p


def test_layout_has_402_tensors():
    shapes = expected_shapes()
    assert len(shapes) == 402
    assert shapes["dense2.0.conv1.weight"] == (48, 108, 1, 1)
    assert shapes["trans2.conv1.weight"] == (150, 300, 1, 1)
    assert shapes["fc.weight"] == (100, 342)


def test_import_builds_integer_form(path):
    assert detect_format(path) == "riair2019"
    model = load_model(path)
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(IntConv2d) == 99 and kinds.count(IntLinear) == 1
    assert kinds.count(ChannelAffine) == 151 and kinds.count(RoundClamp) == 98
    assert model.conv1.weight_bits == 4 and model.fc.weight_bits == 6
    assert model.dense1[0].scale3.bias is None  # all-zero biases are dropped
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    legacy = load_model(path, legacy_input=True)
    assert legacy(torch.rand(1, 3, 32, 32)).shape == (1, 100)


def _nnz(state, keys):
    return sum(int(state[k].count_nonzero()) for k in keys)


def test_scores_by_the_winners_conventions(state, path):
    model = load_model(path)
    report = score(model, policy="riair2019-t4")
    kinds = report.by_kind()
    convs = [k for k in state if k.endswith(("conv1.weight", "conv2.weight"))]
    conv_numel = sum(state[k].numel() for k in convs)
    # (N + nnz * 4) / 32 per conv (mask always), (N + nnz * 6) / 32 for the FC.
    assert kinds["conv"]["params"] == pytest.approx(float(Fraction(conv_numel + 4 * _nnz(state, convs), 32)))
    assert kinds["linear"]["params"] == pytest.approx(
        float(Fraction(34_200 + 6 * _nnz(state, ["fc.weight"]), 32))
    )
    # Scale layers counted by their channel dimension (fixing the published counter's slip): 12,523 params.
    assert kinds["affine"]["params"] == 12_523
    assert not report.unknown_ops
    # The policy variants order as in the winner's Score.md: tree < fixed-length < FP32 accumulation.
    t = {i: score(model, policy=f"riair2019-t{i}").ops for i in range(7)}
    assert t[0] < t[5] < t[4] < t[1] < t[6] < t[3] < t[2]
    assert score(model, policy="official").score > report.score


def test_zeroing_weights_and_narrowing_codes(state):
    base = score(build_riair2019(state), policy="riair2019-t2")
    key = "dense2.3.conv2.weight"
    edited = dict(state)
    nnz = int(state[key].count_nonzero())
    edited[key] = torch.zeros_like(state[key])
    zeroed = score(build_riair2019(edited), policy="riair2019-t2")
    # The 4-bit values disappear (the mask stays); mults at 4 bits and FP32 adds go with them.
    assert base.params - zeroed.params == Fraction(nnz * 4, 32)
    assert base.mults - zeroed.mults == Fraction(nnz * 16 * 16 * 4, 32)
    assert (
        base.adds - zeroed.adds
        == sum(max(n - 1, 0) for n in state[key].reshape(12, -1).ne(0).sum(1).tolist()) * 16 * 16
    )
    # Narrowing every conv's codes to [-4, 3] makes them 3-bit: 1 bit less per stored nonzero.
    narrow = {
        k: (v.clamp(-4, 3) if k.endswith(("conv1.weight", "conv2.weight")) else v) for k, v in state.items()
    }
    model = build_riair2019(narrow)
    assert model.dense1[0].conv1.weight_bits == 3
    convs = [k for k in state if k.endswith(("conv1.weight", "conv2.weight"))]
    narrowed = score(model, policy="riair2019-t2")
    assert base.params - narrowed.params == Fraction(_nnz(narrow, convs), 32)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.pop("dense3.15.conv2.weight"), "missing dense3.15.conv2.weight"),
        (lambda s: s.__setitem__("fc.weight", torch.zeros(10, 342)), "fc.weight has shape"),
        (lambda s: s.__setitem__("conv1.weight", s["conv1.weight"] + 0.5), "integer weight codes"),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(1)), "unexpected extra.weight"),
    ],
)
def test_bad_layouts_are_one_line_errors(state, mutate, message):
    broken = dict(state)
    mutate(broken)
    with pytest.raises(MicronetError, match=message) as err:
        build_riair2019(broken, source="x.pth")
    assert "\n" not in str(err.value)
