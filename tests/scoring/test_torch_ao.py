"""torch.ao quantization as researchers use it: QAT fake-quant is priced at its bits, scoring never changes
the model, and the freebie is refused."""

import copy
import warnings

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn

from micronet.compress import QuantConfig, quantize_
from micronet.errors import MicronetError
from micronet.scoring import score


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.relu1 = nn.Conv2d(3, 16, 3, padding=1), nn.ReLU()
        self.conv2, self.relu2 = nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))), 1))


def _qat4(base: nn.Module) -> nn.Module:
    model = copy.deepcopy(base).train()
    weight = tq.FakeQuantize.with_args(observer=tq.MovingAveragePerChannelMinMaxObserver, quant_min=-8, quant_max=7,
                                       dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    act = tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=15,
                                    dtype=torch.quint8)
    model.qconfig = tq.QConfig(activation=act, weight=weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager API deprecation notice
        tq.prepare_qat(model, inplace=True)
    model(torch.randn(8, 3, 32, 32))  # one QAT step's worth of observation
    return model.eval()


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    base = Net()
    own = copy.deepcopy(base)
    quantize_(own, QuantConfig(weight_bits=4, act_bits=4), calibration_data=torch.randn(8, 3, 32, 32))
    return _qat4(base), own.eval()


def test_4bit_qat_scores_like_micronets_own_4bit_quantization(pair):
    qat, own = pair
    a, b = score(qat), score(own)
    # What differs: torch.ao also quantizes the FC and the pooled activations (micronet's keeps them float),
    # and charges each fake-quantizer's scale and zero-point, where micronet folds scales into affines.
    assert a.quantized and a.complete
    assert a.score == pytest.approx(b.score, rel=0.02)
    conv = [r for r in a.layers if r.kind == "conv"]
    assert conv and all(r.weight_bits == 4 and r.input_bits in (4, 32) for r in conv)
    assert a.params > 0 and a.by_kind()["quant"]["params"] > 0  # scales and zero-points are stored


def test_scoring_leaves_every_buffer_of_the_qat_model_unchanged(pair):
    qat, _ = pair
    before = {k: v.clone() for k, v in qat.state_dict().items()}
    score(qat)
    after = qat.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_the_freebie_is_refused_for_a_torch_ao_quantized_model(pair):
    qat, _ = pair
    with pytest.raises(MicronetError, match="freebie"):
        score(qat, "freebie16")


def test_half_precision_weights_are_charged_at_16_bits():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).eval()
    full, half = score(model, input_shape=(1, 12)), score(copy.deepcopy(model).half(), input_shape=(1, 12))
    assert full.params == 52 and half.params == 26


class Stubbed(Net):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()

    def forward(self, x):
        return self.dequant(super().forward(self.quant(x)))


def test_converted_int8_model_scores_like_micronets_w8a8():
    torch.manual_seed(0)
    base = Stubbed().eval()
    own = copy.deepcopy(base)
    # W8A8 everywhere, as torch.ao's eager convert does (the image and the FC included).
    config = QuantConfig(weight_bits=8, act_bits=8, fc_weight_bits=8, quantize_first_input=True,
                         quantize_fc_input=True)
    quantize_(own, config, calibration_data=torch.randn(8, 3, 32, 32))
    converted = copy.deepcopy(base)
    converted.qconfig = tq.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq.prepare(converted, inplace=True)
        converted(torch.randn(8, 3, 32, 32))
        tq.convert(converted, inplace=True)
    a, b = score(converted), score(own.eval())
    # What differs: the converted model requantises every layer's output with a stored output scale and
    # runs ReLU/pool on int8 codes; micronet's folds the scales into per-channel affines on float outputs.
    assert a.complete and a.quantized and a.params > 0
    conv = [r for r in a.layers if r.kind == "conv"]
    assert conv and all(r.weight_bits == 8 and r.input_bits == 8 for r in conv)
    assert a.score == pytest.approx(b.score, rel=0.02)


def test_quantize_dynamic_is_never_scored_with_zero_params():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dyn = tq.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    r = score(dyn, input_shape=(1, 12))
    assert r.complete and r.quantized
    # int8 weight codes (12x8 + 8x4), fp32 biases, one scale + zero-point per tensor
    linear = r.by_kind()["linear"]
    assert linear["params"] == ((12 * 8 + 8 * 4) * 8 + (8 + 4) * 32 + 2 * (32 + 8)) / 32
    assert linear["mults_raw"] == 12 * 8 + 8 * 4


def _fused_qat(base: nn.Module, fake_quant_on: bool) -> nn.Module:
    """torch.ao's default x86 QAT (fused moving-average fake-quantizers), optionally switched off."""
    model = copy.deepcopy(base).train()
    model.qconfig = tq.get_default_qat_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager API deprecation notice
        tq.prepare_qat(model, inplace=True)
    model(torch.randn(8, 3, 32, 32))
    if not fake_quant_on:
        model.apply(tq.disable_fake_quant)
    return model.eval()


def test_disabled_fused_fake_quant_scores_like_the_float_net_and_allows_the_freebie():
    torch.manual_seed(0)
    base = Net().eval()
    off, on = _fused_qat(base, False), _fused_qat(base, True)
    assert any(m.fake_quant_enabled.item() == 0 for m in off.modules() if isinstance(m, tq.FakeQuantizeBase))
    float_report, off_report = score(base), score(off)
    assert off_report.params == float_report.params and off_report.ops == float_report.ops
    assert not off_report.quantized
    score(off, "freebie16")  # a float model in all but name: the freebie is allowed
    on_report = score(on)
    assert on_report.quantized and on_report.params != float_report.params
    with pytest.raises(MicronetError, match="freebie"):
        score(on, "freebie16")
