"""PyramidNet + SkipNet gates (spec training.md §2.6): gate layout, STE training, real skipping in eval."""

import math

import pytest
import torch
import torch.fx
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from micronet.models import PyramidSkipNet, count_params, create

TINY = "pyramidskipnet:depth=20,alpha=12"  # 2 blocks per stage, 3 gates


class _ConvCounter(TorchDispatchMode):
    """Counts aten convolutions and records their batch sizes."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.batches.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


class _FixedController(nn.Module):
    """Stands in for the LSTM controller: the same per-sample execution probabilities at every gate."""

    def __init__(self, probs):
        super().__init__()
        self.probs = torch.tensor(probs)

    def forward(self, features, state):
        return self.probs.clone(), state


def _tiny(probs=None):
    torch.manual_seed(0)
    model = create(TINY, num_classes=10)
    if probs is not None:
        model.controller = _FixedController(probs)
    return model


def _gated_blocks(model):
    return [*model.layer2, *model.layer3][1:]


def test_gate_layout():
    with torch.device("meta"):
        big = create("pyramidskipnet272_a200")
        plain = create("pyramidnet272_a200")
    assert big.num_gates == 59
    assert count_params(big) - count_params(plain) == 353_921
    assert count_params(big.controller) == 891
    assert [g.conv.in_channels for g in big.gates] == [b.out_channels for b in [*big.layer2, *big.layer3][:-1]]
    assert _tiny().num_gates == 3


def test_skipped_blocks_issue_no_convolution_in_eval():
    model = _tiny([0.1, 0.2, 0.3, 0.4]).eval()
    counter = _ConvCounter()
    with torch.no_grad(), counter:
        out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    ungated = 1 + 3 * (2 + 1)  # stem, stage 1, first block of stage 2
    assert len(counter.batches) == ungated + model.num_gates  # only the gates' own 1x1 convs on top
    assert model.gate_rates() == [0.0, 0.0, 0.0]


def test_open_gates_run_every_block_in_eval():
    model = _tiny([0.9, 0.6, 0.7, 0.8]).eval()
    counter = _ConvCounter()
    with torch.no_grad(), counter:
        model(torch.randn(4, 3, 32, 32))
    assert len(counter.batches) == 1 + 3 * 6 + model.num_gates
    assert model.gate_rates() == [1.0, 1.0, 1.0]


def test_eval_runs_each_block_on_its_sub_batch_only():
    torch.manual_seed(3)
    x = torch.randn(4, 3, 32, 32)
    model = _tiny([0.9, 0.1, 0.1, 0.9]).eval()
    calls = []
    for block in _gated_blocks(model):
        block.conv1.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        out = model(x)
    assert calls == [2, 2, 2]
    assert model.gate_rates() == [0.5, 0.5, 0.5]
    # Sample by sample the result equals running it alone with its gate decision.
    with torch.no_grad():
        on_alone = _tiny([0.9]).eval()(x[:1])
        off_alone = _tiny([0.1]).eval()(x[1:2])
    torch.testing.assert_close(out[0:1], on_alone)
    torch.testing.assert_close(out[1:2], off_alone)


def test_gate_rates_accumulate_and_reset():
    model = _tiny([0.9, 0.1, 0.1, 0.1]).eval()
    assert all(math.isnan(rate) for rate in model.gate_rates())
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
        model.controller = _FixedController([0.9, 0.9, 0.9, 0.9])
        model(torch.randn(4, 3, 32, 32))
    assert model.gate_rates() == [0.625, 0.625, 0.625]
    model.train()(torch.randn(4, 3, 32, 32))  # training forwards are not counted
    assert model.gate_rates() == [0.625, 0.625, 0.625]
    model.reset_gate_stats()
    assert all(math.isnan(rate) for rate in model.gate_rates())
    assert "gate_executed" not in model.state_dict()


def test_training_computes_every_block_and_blends_with_hard_gates():
    model = _tiny([0.9, 0.1, 0.9, 0.1]).train()
    counter = _ConvCounter()
    with counter:
        model(torch.randn(4, 3, 32, 32))
    assert len(counter.batches) == 1 + 3 * 6 + model.num_gates
    assert all(batch == 4 for batch in counter.batches)
    assert [m.tolist() for m in model.gate_masks] == [[1.0, 0.0, 1.0, 0.0]] * 3


def test_gate_penalty_and_task_loss_reach_the_controller_through_the_ste():
    model = _tiny().train()
    nn.init.zeros_(model.controller.proj.weight)
    nn.init.constant_(model.controller.proj.bias, 2.0)  # p = sigmoid(2) > 0.5 at every gate
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    model(x)
    penalty = model.gate_penalty()
    assert penalty.item() == pytest.approx(model.num_gates)  # forward value: hard gates, all on
    penalty.backward()
    p = torch.sigmoid(torch.tensor(2.0)).item()
    # Backward: dm/dp = 1 (straight through), dp/dbias = p (1 - p), one mean per gate.
    assert model.controller.proj.bias.grad.item() == pytest.approx(model.num_gates * p * (1 - p), rel=1e-5)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()  # the task loss alone also moves the gates
    assert model.controller.proj.bias.grad.abs().item() > 0


def test_gate_probabilities_stay_float32_under_bf16_autocast():
    # the amp stages (skip-sp, skip-rl) run the network under autocast; the controller must not follow it
    model = _tiny().train()
    nn.init.zeros_(model.controller.proj.weight)
    nn.init.constant_(model.controller.proj.bias, 6.3)  # a confident gate
    assert torch.sigmoid(torch.tensor(6.3, dtype=torch.bfloat16)).item() == 1.0  # bf16 would saturate here
    expected = 1 / (1 + math.exp(-6.3))  # float64 oracle, 1 - p = 0.0018
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 32, 32))
        p, _ = model.controller(torch.randn(2, 10, dtype=torch.bfloat16), None)
    for probs in [*model.gate_probs, p]:
        assert probs.dtype == torch.float32
        assert (probs < 1).all() and torch.allclose(probs.double(), torch.full_like(probs.double(), expected),
                                                    rtol=1e-6)


def test_each_block_is_fx_traceable():
    model = _tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    h = model.layer1(model.bn_stem(model.conv_stem(x)))
    for block in [*model.layer2, *model.layer3]:
        traced = torch.fx.symbolic_trace(block)
        torch.testing.assert_close(traced(h), block(h))
        h = block(h)


def test_is_a_pyramidnet():
    assert isinstance(_tiny(), PyramidSkipNet)
    assert _tiny().eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
