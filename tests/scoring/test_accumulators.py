"""Accumulator formulas (spec scoring.md c.3) on hand-computed examples, alone and through a conv."""

from fractions import Fraction

import pytest
import torch
from torch import nn

from micronet.compress.integer_modules import IntConv2d, RoundClamp
from micronet.scoring import accumulate, adder_tree_bitadds, score
from micronet.scoring.accumulators import fixed_bound_width, tree_final_width


def test_worked_example_nnz_108():
    # 4-bit unsigned activations x 4-bit weights: w0 = 8; 54@8 + 27@9 + 13@10 + 7@11 + 3@12 + 2@13 + 1@14.
    assert adder_tree_bitadds(108, 8) == 958
    assert accumulate("adder_tree", [108], 432, 4, 4, False) == (107, 958)
    assert fixed_bound_width(4, 4, 432, False) == 16  # M = 15 * 7 * 432 = 45,360
    assert accumulate("int_fixed_bound", [108], 432, 4, 4, False) == (107, 107 * 16)  # 53.5 ops
    assert tree_final_width(108, 4, 4, False) == 15
    assert Fraction(accumulate("int_tree_final", [108], 432, 4, 4, False)[1], 32) == Fraction(
        1605, 32
    )  # 50.2
    assert accumulate("fp32", [108], 432, 4, 4, False) == (107, 107 * 32)  # 107 ops
    assert accumulate("fp16_true", [108], 432, 4, 4, False) == (107, 107 * 16)


def test_small_trees_and_caps():
    assert adder_tree_bitadds(1, 8) == 0
    assert adder_tree_bitadds(2, 8) == 8
    assert adder_tree_bitadds(3, 8) == 8 + 9  # one add at 8 bits, then one at 9
    assert adder_tree_bitadds(4, 7) == 2 * 7 + 8
    assert tree_final_width(10_000, 8, 8, False, cap=16) == 16
    assert accumulate("adder_tree", [3], 27, 4, 4, True) == (2, 7 + 8)  # signed activations: w0 = 7
    assert accumulate("adder_tree", [0, 1, 2], 9, 4, 4, False) == (
        1,
        8,
    )  # empty and single kernels add nothing


class OneKernel(nn.Module):
    """RoundClamp(0, 15) then a 48 -> 1 3x3 conv with exactly 108 nonzero 4-bit codes, one output position."""

    def __init__(self, input_quantized: bool = True) -> None:
        super().__init__()
        codes = torch.zeros(1, 48, 3, 3)
        codes.view(-1)[torch.randperm(432, generator=torch.Generator().manual_seed(0))[:108]] = 3.0
        self.quant = RoundClamp(0, 15) if input_quantized else nn.Identity()
        self.conv = IntConv2d(codes, weight_bits=4)

    def forward(self, x):
        return self.conv(self.quant(x))


@pytest.mark.parametrize(
    "mode, ops",
    [
        ("adder_tree", Fraction(958, 32)),
        ("int_fixed_bound", Fraction(107 * 16, 32)),
        ("int_tree_final", Fraction(107 * 15, 32)),
        ("fp32", Fraction(107)),
        ("fp16_true", Fraction(107, 2)),
    ],
)
def test_conv_adds_per_accumulator(mode, ops):
    report = score(OneKernel(), input_size=3, in_channels=48, accumulator=mode)
    conv = next(r for r in report.layers if r.kind == "conv")
    assert conv.adds == ops
    assert conv.mults == Fraction(108 * 4, 32)  # max(4, 4) bits per multiply


def test_integer_accumulation_needs_integer_inputs():
    # A float input (the image) cannot use integer accumulation: it falls back to FP32, as the winner did.
    report = score(OneKernel(input_quantized=False), input_size=3, in_channels=48, accumulator="adder_tree")
    conv = next(r for r in report.layers if r.kind == "conv")
    assert conv.adds == 107
    assert conv.mults == 108
