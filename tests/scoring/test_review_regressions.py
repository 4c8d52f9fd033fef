"""Regressions for review findings: block-mask op counts, caller's model untouched, one-line errors."""

import subprocess
import sys
from fractions import Fraction

import pytest
import torch
from torch import nn

from micronet.compress import QuantConfig, SparsityConfig, deploy_form, prune_, quantize_
from micronet.data import get_normalization
from micronet.errors import MicronetError
from micronet.models import create
from micronet.scoring import score


def test_block_mask_multiplies_every_value_stored_in_a_kept_block():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(16, 4)).eval()
    prune_(net, SparsityConfig(0.5, block=(4, 4)))
    quantize_(net, QuantConfig(weight_bits=4, act_bits=None))
    assert int(net[0].weight.count_nonzero()) < 1152  # some codes inside kept blocks rounded to zero
    row = next(r for r in score(net, input_size=8, in_channels=16).to_dict()["layers"] if r["kind"] == "conv")
    assert row["mults"] == 1152 * 64  # 8 of 16 blocks x 144 values, 64 positions, 32-bit (float) input
    assert row["params"] == (1152 * 4 + 16) / 32  # 4-bit values of kept blocks + one bit per block


def test_scoring_a_float_dynamic_model_leaves_it_untouched():
    torch.manual_seed(0)
    model = create("pyramidskipnet:depth=20,alpha=12").eval()
    model(torch.randn(4, 3, 32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rates = model.gate_rates()
    rng = torch.get_rng_state()
    score(model, samples=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.gate_rates() == rates and not model.training
    assert torch.equal(torch.get_rng_state(), rng)


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("compressed", [False, True], ids=["float", "compressed"])
def test_scoring_leaves_every_parameter_and_buffer_bit_for_bit(compressed):
    # The deploy form shares the caller's weights (memory); nothing the scorer runs may write them.
    torch.manual_seed(0)
    model = create("pyramidnet:depth=11,alpha=8").eval()
    if compressed:
        prune_(model, SparsityConfig(0.5))
        quantize_(model, QuantConfig(weight_bits=4, act_bits=4), calibration_data=torch.randn(4, 3, 32, 32))
    before = {k: v.detach().clone() for k, v in _tensors(model).items()}
    score(model)
    after = _tensors(model)
    assert before.keys() == after.keys()
    assert all(before[k].dtype == v.dtype and torch.equal(before[k], v) for k, v in after.items())


class _ClampsItsWeights(nn.Module):
    """A forward that rewrites its own parameter in place (as some weight-clipping layers do)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)

    def forward(self, x):
        self.conv.weight.data.clamp_(-0.05, 0.05)
        return self.fc(self.conv(x).mean((2, 3)))


def test_a_model_that_writes_its_own_weights_is_scored_and_left_bit_for_bit():
    torch.manual_seed(0)
    model = _ClampsItsWeights().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert float(model.conv.weight.detach().abs().max()) > 0.05  # the clamp would change it
    report = score(model, input_size=8)
    assert report.params == 4 * 27 + 4 + 4 * 5 + 5  # hand count: conv 3->4 3x3 with bias, fc 4->5 with bias
    assert report.ops > 0 and report.complete
    # a one-shot iterator of examples is read again when scoring starts over on a copy of its own
    from_data = score(model, input_size=8, data=iter([torch.randn(1, 3, 8, 8) for _ in range(2)]), samples=2)
    assert from_data.samples == 2 and from_data.ops == report.ops
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _ForeachDecay(nn.Module):
    """A forward that scales its weights in place through a tensor-list op (``_foreach_mul_``)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)

    def forward(self, x):
        torch._foreach_mul_([self.conv.weight.data, self.fc.weight.data], 0.5)
        return self.fc(self.conv(x).mean((2, 3)))


class _ClipsItsGain(nn.Module):
    """A quantized model whose forward clips a root parameter in place; scored from pixels."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 5)
        self.gain = nn.Parameter(torch.full((4,), 2.0))

    def forward(self, x):
        self.gain.data.clamp_(max=1.0)
        return self.fc(self.conv(x).mean((2, 3)) * self.gain)


def test_tensor_list_writes_and_pixel_scoring_leave_the_caller_bit_for_bit():
    torch.manual_seed(0)
    model = _ForeachDecay().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert score(model, input_size=8).params == 4 * 27 + 4 + 4 * 5 + 5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    clips = _ClipsItsGain().eval()
    quantize_(clips, QuantConfig(weight_bits=4, act_bits=None))
    score(clips, input="pixels", normalization=get_normalization("cifar100"))
    assert clips.gain.tolist() == [2.0] * 4
    # the public deploy form owns its tensors: running it leaves the caller alone
    plain = _ClampsItsWeights().eval()
    weight = plain.conv.weight.detach().clone()
    deploy_form(plain)(torch.randn(1, 3, 8, 8))
    assert torch.equal(plain.conv.weight, weight)


def test_a_batchnorm_after_a_torch_ao_qat_conv_keeps_its_fake_quantized_weight():
    tq = torch.ao.quantization
    qconfig = tq.QConfig(
        activation=tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=15),
        weight=tq.FakeQuantize.with_args(observer=tq.MovingAveragePerChannelMinMaxObserver, quant_min=-8,
                                         quant_max=7, dtype=torch.qint8, qscheme=torch.per_channel_symmetric))
    rows = []
    for bn in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16) if bn else nn.Identity(), nn.ReLU())
        net.qconfig = qconfig
        tq.prepare_qat(net.train(), inplace=True)
        net(torch.randn(4, 3, 8, 8))
        rows.append([r for r in score(net.eval(), input_size=8).layers if r.kind == "conv"][0])
    # a subclass (QAT conv) is never folded into a plain float copy: its weight stays 4-bit with or without a BN
    assert rows[0].weight_bits == rows[1].weight_bits == 4


def test_integer_form_keeps_float64_and_ignores_size_arithmetic():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 16, 5)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            y = nn.functional.avg_pool2d(y, 8)
            return self.fc(y.reshape(y.size(0), y.size(1) * 16))  # size arithmetic, not a tensor scale

    net = Net().double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert (deploy_form(net)(x) - net(x)).abs().max() < 1e-12


def test_bad_input_size_is_a_one_line_error():
    with pytest.raises(MicronetError, match="forward pass failed at input size 2"):
        score(create("densenet_bc:depth=10,growth=4"), input_size=2)


def test_scoring_never_imports_torch_dynamo():
    # torch wraps a dispatch mode's handler in torch._dynamo.disable unless told not to; that import drags in
    # sympy, triton and torch.distributed: ~150 MB of resident memory and ~1 s on a process's first score.
    code = ("import sys; from micronet.models import create; from micronet.scoring import score; "
            "score(create('densenet_bc:depth=10,growth=4')); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


class _TwoMaskedWeights(nn.Module):
    """Functional pruning code: two weights of one shape masked in one module's forward, two plain constants."""

    def __init__(self, constants: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1, self.w2 = nn.Parameter(torch.randn(8, 8, generator=g)), nn.Parameter(torch.randn(8, 8, generator=g))
        checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
        self.register_buffer("m1", checker.float())  # 32 of 64 kept, no row or column empty
        self.register_buffer("m2", 1 - checker.float())
        self.constants = constants
        self.a, self.b = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)  # plain attributes

    def forward(self, x):
        if self.constants:
            return x @ self.a @ self.b
        return x @ (self.w1 * self.m1) @ (self.w2 * self.m2)


def test_two_derived_weights_or_constants_of_one_shape_in_one_module_are_both_charged():
    # Hand count, element masks (mask="always"): each masked weight stores 32 nonzeros at 32 bits + 64 mask bits,
    # 1,088 bits; two of them 2,176 bits = 68 params. Two dense 8x8 constants: 128 values = 128 params. Before,
    # both pairs shared one name ("<mul (8, 8)>", "<constant (8, 8)>") and only the first was charged.
    assert score(_TwoMaskedWeights(), input_shape=(1, 8), mask="always").params == 68
    assert score(_TwoMaskedWeights(constants=True), input_shape=(1, 8)).params == 128


class _CachesADerivedWeight(nn.Module):
    """Makes a derived weight on its first forward and keeps it (a cache); derives another one every forward."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1, self.w2 = nn.Parameter(torch.randn(8, 8, generator=g)), nn.Parameter(torch.randn(8, 8, generator=g))
        with torch.no_grad():
            self.w1[:, :4] = 0  # half of w1 is zero
        self.cache = None

    def forward(self, x):
        if self.cache is None:
            self.cache = self.w2 * 2.0
        return x @ (self.w1 * 1.0) @ self.cache


@pytest.mark.parametrize("samples", [1, 2, 3])
def test_a_tensor_cached_in_one_traced_forward_is_the_same_tensor_in_the_next(samples):
    # Found by a review: the cache kept its first trace's uid, which the second trace gave to w1 * 1.0, so its
    # nonzeros were read from the wrong tensor (240 mults instead of 288). Hand count, 3 positions: x @ (w1 * 1)
    # multiplies w1's 32 nonzeros, @ cache all 64: 3 x 96 = 288 mults. Stored (official: w1's four empty rows
    # of inputs cost a bit each): 32 x 32 + 8 bits, and the cache dense 64 x 32 bits, once: 3,080 bits.
    report = score(_CachesADerivedWeight(), input_shape=(1, 3, 8), samples=samples)
    layer = report.to_dict()["layers"][0]
    assert (layer["mults_raw"], report.params) == (288, Fraction(3080, 32))
