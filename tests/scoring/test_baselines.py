"""Dense reference models against the hand counts of spec scoring.md d.1 and peer-counters.md §3."""

from fractions import Fraction

import pytest
import torch
from torch.nn.utils import prune

from micronet.models import create
from micronet.scoring import rules, score
from tests.scoring.nets import no_exact_zeros_


@pytest.fixture(scope="module")
def wrn():
    # Random init can leave an exactly-zero weight; under `official` that tensor would (correctly) be
    # stored sparse with a full bitmask. Remove such accidents so the hand counts apply.
    return no_exact_zeros_(create("wrn28_10")).eval()


def test_wrn28_10_official_scores_two(wrn):
    report = score(wrn)
    assert report.score == pytest.approx(2.0, abs=0.005)
    assert report.param_score == pytest.approx(1.0, abs=0.001) and report.op_score == pytest.approx(1.0, abs=0.001)
    gemm = report.by_kind()
    # conv + FC multiply-accumulates (spec d.1): 5,243,386,368.
    assert gemm["conv"]["mults_raw"] + gemm["linear"]["mults_raw"] == 5_243_386_368
    # n-1 adds per dot product, +1 per output for the FC bias (reference-counter style GEMMs: 10,484,175,872).
    assert gemm["conv"]["adds_raw"] + gemm["linear"]["adds_raw"] == 10_484_175_872 - 5_243_386_368
    # conv + FC 36,518,932; the 12 bn2 fold into conv1 as biases (4,480), the other 13 BNs (4,496
    # channels) stay per-channel affines at 2 values each.
    assert report.params == 36_518_932 + 4_480 + 2 * 4_496


def test_wrn28_10_from_the_zoo_scores_two_under_official():
    # Stray exact zeros of a random init are stored dense under `official` (mask=cheapest): no bitmask.
    # The score is the dense hand count's: 2.0010, not 2.0000, because the real model holds 36.53M params and
    # 10.491G ops against the rules' rounded 36.5M / 10.49B (a literal always-if-sparse mask gave 2.0042).
    torch.manual_seed(0)
    report = score(create("wrn28_10").eval())
    assert report.params == 36_518_932 + 4_480 + 2 * 4_496
    assert report.score == pytest.approx(2.001, abs=0.0005)


def test_wrn28_10_unfolded_matches_hand_count(wrn):
    # BN as scale + add, ReLU 1 mult, residual adds, global pool: 10,492,294,144 (spec d.1, peer §3).
    report = score(wrn, bn="unfold")
    assert report.ops == 10_492_294_144
    assert report.params == 36_536_884  # conv + FC + BN affine (2 per channel)


def test_densenet_bc_100_dense_counts():
    model = no_exact_zeros_(create("densenet100_k12")).eval()
    unfolded = score(model, bn="unfold")
    kinds = unfolded.by_kind()
    assert kinds["conv"]["mults_raw"] + kinds["linear"]["mults_raw"] == 287_960_472
    assert unfolded.ops == 587_457_840
    assert unfolded.params == 800_032
    # Official folds the 48 bottleneck bn2 layers into their 1x1 convs: 1,032,192 elements lose a mult.
    folded = score(model)
    assert folded.ops == 587_457_840 - 1_032_192
    assert folded.params == 800_032 - 48 * 48
    assert folded.mults == Fraction(folded.mults_raw)  # fp32: one op per multiply


def test_an_accidental_zero_is_stored_sparse_only_when_it_pays_under_cheapest():
    torch.manual_seed(0)
    model = create("wrn:depth=10,width=1").eval()
    conv = model.layer2[0].conv1
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = 0.0
    dense = score(no_exact_zeros_(create("wrn:depth=10,width=1").eval()), mask="cheapest")
    literal, cheapest = score(model, mask="always_if_sparse"), score(model)
    assert literal.params > cheapest.params  # always_if_sparse: the tensor with one zero pays a full bitmask
    assert cheapest.ops == dense.ops  # stored dense, so its zero is multiplied like any other weight


def _conv_row(model, shape, **kw):
    report = score(model, input_shape=shape, **kw)
    return next(r for r in report.layers if r.kind in ("conv", "linear"))


@pytest.mark.parametrize("bake", [False, True])
def test_pruned_filters_are_charged_one_mask_bit_each_and_no_macs(bake):
    # ln_structured zeroes 4 of 8 filters of a 4->8 3x3 conv (288 weights, 144 left); 6x6 input, 36 positions.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
    prune.ln_structured(conv, "weight", amount=0.5, n=2, dim=0)
    if bake:
        prune.remove(conv, "weight")
    model = torch.nn.Sequential(conv).eval()
    row = _conv_row(model, (1, 4, 6, 6))
    # One bit per filter (8), not per weight: 144 x 32 + 8 bits (an element mask would be 144 x 32 + 288).
    assert (row.param_bits, row.mask_bits) == (144 * 32 + 8, 8)
    # The 4 kept filters: 36 taps x 36 positions each; 35 adds per dot product.
    assert (row.mults_raw, row.adds_raw) == (4 * 36 * 36, 4 * 35 * 36)
    literal = _conv_row(model, (1, 4, 6, 6), mask="always_if_sparse")  # the reference counter's element mask
    assert (literal.param_bits, literal.mask_bits) == (144 * 32 + 288, 288)


def test_pruned_input_channels_are_charged_one_mask_bit_each():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
    prune.ln_structured(conv, "weight", amount=0.5, n=1, dim=1)  # 2 of 4 input channels
    row = _conv_row(torch.nn.Sequential(conv).eval(), (1, 4, 6, 6))
    assert (row.param_bits, row.mask_bits) == (144 * 32 + 4, 4)
    # every filter keeps 2 x 9 = 18 taps: 18 mults and 17 adds per output
    assert (row.mults_raw, row.adds_raw) == (8 * 18 * 36, 8 * 17 * 36)


def test_pruned_linear_rows_are_charged_one_mask_bit_each():
    torch.manual_seed(0)
    fc = torch.nn.Linear(6, 4, bias=False)
    prune.ln_structured(fc, "weight", amount=0.5, n=1, dim=0)  # 2 of 4 output features
    row = _conv_row(torch.nn.Sequential(fc).eval(), (1, 6))
    assert (row.param_bits, row.mask_bits) == (12 * 32 + 4, 4)
    assert (row.mults_raw, row.adds_raw) == (2 * 6, 2 * 5)


def test_nonzeros_of_a_large_weight_are_counted_a_few_rows_at_a_time(monkeypatch):
    # Output feature r of a Linear(5000, 70) keeps its first r weights; counted in slices of 3 rows (the last one
    # shorter). Hand count: 0 + 1 + ... + 69 = 2,415 nonzeros, stored with an element mask (the
    # literal rule; under official a mask per input column is cheaper); feature r multiplies r weights and adds
    # r - 1 products, none for the empty feature 0.
    monkeypatch.setattr(rules, "_COUNT_CHUNK", 3 * 5000 + 7)
    fc = torch.nn.Linear(5000, 70, bias=False)
    with torch.no_grad():
        fc.weight.copy_((torch.arange(5000)[None, :] < torch.arange(70)[:, None]).float() * 0.5)
    row = _conv_row(torch.nn.Sequential(fc).eval(), (1, 5000), mask="always")
    assert (row.weight_nnz, row.mask_bits) == (2415, 350_000)
    assert (row.mults_raw, row.adds_raw) == (2415, 2415 - 69)


def test_one_removed_filter_is_charged_one_mask_bit_each_filter():
    # 1 of 8 filters removed: dense 288 x 32 bits, element mask 252 x 32 + 288, filter mask 252 x 32 + 8 (the least).
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight[3] = 0
    row = _conv_row(torch.nn.Sequential(conv).eval(), (1, 4, 6, 6))
    assert (row.param_bits, row.mask_bits) == (252 * 32 + 8, 8)
    assert row.mults_raw == 7 * 36 * 36
