"""Wide ResNet (spec training.md §2.7)."""

import torch
import torch.fx
import torch.nn as nn

from micronet.models import create


def test_wrn28_10_layout():
    with torch.device("meta"):
        model = create("wrn28_10")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 25 + 3  # stem + 2 per block + 3 projection shortcuts
    assert all(c.bias is None for c in convs)
    assert model.fc.in_features == 640
    first = model.layer2[0]
    assert first.conv1.stride == (2, 2) and first.conv2.stride == (1, 1) and first.shortcut.stride == (2, 2)
    assert isinstance(model.layer2[1].shortcut, nn.Identity)


def test_forward_shape_and_fx_trace_tiny():
    model = create("wrn:depth=10,width=2", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), out)
