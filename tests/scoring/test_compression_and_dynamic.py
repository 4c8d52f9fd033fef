"""The score follows the compression state (sparsity, bits) by the right amount; dynamic nets average."""

from fractions import Fraction

import torch

from micronet.compress import QuantConfig, SparsityConfig, prune_, quantize_
from micronet.compress.integer_modules import IntConv2d, RoundClamp
from micronet.models import create
from micronet.scoring import score


def _projected(sparsity: float, bits: int):
    torch.manual_seed(0)
    model = create("densenet_bc:depth=10,growth=4")
    prune_(model, SparsityConfig(sparsity=sparsity, scope="global"))
    quantize_(model, QuantConfig(weight_bits=bits, act_bits=bits), calibration_data=torch.randn(4, 3, 32, 32))
    return model.eval()


def _conv_nnz(report):
    return sum(
        r.weight_nnz for r in report.layers if r.kind == "conv" and r.weight_bits and r.weight_bits < 32
    )


def test_more_sparsity_lowers_params_by_the_nonzeros_removed():
    # The literal mask rule: every pruned tensor is stored sparse, so each removed nonzero saves its 4 bits
    # (under `official`'s cheapest rule a 4-bit layer above 75% density is stored dense instead).
    a, b = score(_projected(0.5, 4), mask="always_if_sparse"), score(_projected(0.75, 4), mask="always_if_sparse")
    assert b.score < a.score
    removed = _conv_nnz(a) - _conv_nnz(b)
    assert removed > 0
    conv_params = [sum(x.params for x in r.layers if x.kind == "conv") for r in (a, b)]
    assert conv_params[0] - conv_params[1] == Fraction(removed * 4, 32)


def test_fewer_bits_cost_less_per_value_and_per_multiply():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-2, 2, (16, 8, 3, 3), generator=gen).float()
    nnz = int(codes.count_nonzero())

    def net(bits):
        return torch.nn.Sequential(
            RoundClamp(0, 2**bits - 1), IntConv2d(codes, padding=1, weight_bits=bits)
        ).eval()

    # Both stored sparse (the literal rule), so the difference is the nonzeros' width alone.
    r8 = score(net(8), input_size=8, in_channels=8, mask="always_if_sparse")
    r4 = score(net(4), input_size=8, in_channels=8, mask="always_if_sparse")
    assert r8.params - r4.params == Fraction(nnz * 4, 32)
    assert r8.mults - r4.mults == Fraction(nnz * 64 * 4, 32)  # products at 8 vs 4 bits
    assert r8.adds == r4.adds  # FP32 accumulation either way


def test_skipnet_ops_are_the_mean_over_examples_and_params_cover_every_block():
    torch.manual_seed(0)
    model = create("pyramidskipnet:depth=29,alpha=20").eval()
    report = score(model, samples=3)
    assert report.samples == 3 and len(report.gate_rates) == model.num_gates
    with torch.no_grad():
        model.controller.proj.bias.fill_(-50.0)  # every gate closes: only stage 1 and block 0 of stage 2 run
    closed = score(model, samples=3)
    assert all(rate == 0.0 for rate in closed.gate_rates.values())
    assert closed.ops < report.ops
    assert closed.params == report.params  # skipped blocks are still stored
    with torch.no_grad():
        model.controller.proj.bias.fill_(50.0)
    opened = score(model, samples=2)
    assert all(rate == 1.0 for rate in opened.gate_rates.values())
    assert opened.ops > closed.ops
