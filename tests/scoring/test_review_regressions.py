"""Regressions for review findings: block-mask op counts, caller's model untouched, one-line errors."""

import pytest
import torch
from torch import nn

from micronet.compress import QuantConfig, SparsityConfig, deploy_form, prune_, quantize_
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
