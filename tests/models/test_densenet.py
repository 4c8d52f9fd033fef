"""DenseNet-BC (spec training.md §2.1)."""

import math

import torch
import torch.fx
import torch.nn as nn

from micronet.models import DenseNet, count_params, create


def test_densenet100_channel_plan():
    model = create("densenet100_k12")
    assert model.conv_stem.out_channels == 24
    assert len(model.block1) == len(model.block2) == len(model.block3) == 16
    assert (model.trans1.conv.in_channels, model.trans1.conv.out_channels) == (216, 108)
    assert (model.trans2.conv.in_channels, model.trans2.conv.out_channels) == (300, 150)
    assert model.fc.in_features == 342
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 99 and sum(c.weight.numel() for c in convs) == 741_744
    assert all(c.bias is None for c in convs)
    assert model.block1[0].conv1.out_channels == 48  # bottleneck width 4k


def test_he_fan_out_init():
    torch.manual_seed(0)
    model = create("densenet_bc:depth=40,growth=24")
    conv = model.block2[3].conv2  # 3x3, 96 -> 24
    assert math.isclose(conv.weight.std().item(), math.sqrt(2 / (9 * 24)), rel_tol=0.05)
    assert torch.all(model.block2[3].bn2.weight == 1) and torch.all(model.block2[3].bn2.bias == 0)


def test_forward_shapes_tiny():
    x = torch.randn(2, 3, 32, 32)
    assert create("densenet_bc:depth=10,growth=4").eval()(x).shape == (2, 100)
    plain = DenseNet(depth=13, growth=4, compression=1.0, bottleneck=False, num_classes=10)
    assert len(plain.block1) == 3 and plain(x).shape == (2, 10)
    assert count_params(plain) > 0


def test_fx_traceable_and_equal():
    model = create("densenet_bc:depth=16,growth=6").eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(traced(x), model(x))
