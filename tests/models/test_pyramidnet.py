"""PyramidNet bottleneck + ShakeDrop (spec training.md §2.4)."""

import torch
import torch.fx

from micronet.models import create
from micronet.models.pyramidnet import block_widths


def test_pyramidnet272_widths_and_drop_schedule():
    widths = block_widths(272, 200)
    assert len(widths) == 90
    assert (widths[0], widths[29]) == (18, 83)
    assert (widths[30], widths[59]) == (85, 149)
    assert (widths[60], widths[89]) == (152, 216)
    with torch.device("meta"):
        model = create("pyramidnet272_a200")
    assert model.fc.in_features == 864
    blocks = [*model.layer1, *model.layer2, *model.layer3]
    assert [b.shake_drop.p_drop for b in blocks] == [0.5 * (i + 1) / 90 for i in range(90)]
    assert blocks[30].conv2.stride == (2, 2) and blocks[60].conv2.stride == (2, 2)


def test_shortcut_pools_and_zero_pads():
    model = create("pyramidnet:depth=11,alpha=12").eval()
    block = model.layer2[0]
    x = torch.randn(2, block.in_channels, 32, 32)
    shortcut = block.shortcut(x)
    assert shortcut.shape == (2, block.out_channels, 16, 16)
    torch.testing.assert_close(shortcut[:, : block.in_channels], torch.nn.functional.avg_pool2d(x, 2))
    assert torch.all(shortcut[:, block.in_channels:] == 0)
    assert sum(p.numel() for p in block.downsample.parameters()) == 0


def test_forward_shapes_tiny():
    model = create("pyramidnet:depth=11,alpha=12", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    assert model.train()(x).shape == (2, 10)
    assert model.eval()(x).shape == (2, 10)


def test_fx_traceable_eval_and_train():
    model = create("pyramidnet:depth=20,alpha=24").eval()
    x = torch.randn(2, 3, 32, 32)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x))
    # Training mode keeps ShakeDrop as one opaque call per block (its custom backward survives).
    train_graph = torch.fx.symbolic_trace(model.train())
    calls = [n for n in train_graph.graph.nodes if n.op == "call_function" and "shake_drop" in str(n.target)]
    assert len(calls) == 6
    assert train_graph(x).shape == (2, 100)
