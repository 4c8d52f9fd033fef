"""Parameter and dense-MAC counts from shapes (micronet.models.summary, describe_models)."""

import torch

from micronet.models import create, dense_macs, describe_models


def test_dense_macs_by_hand_for_a_tiny_densenet():
    model = create("densenet_bc:depth=10,growth=4")  # one bottleneck layer per block
    expected = (
        8 * 27 * 1024  # stem 3 -> 8 at 32x32
        + 16 * 8 * 1024 + 4 * 144 * 1024 + 6 * 12 * 1024  # block 1 (8 -> 12), transition 12 -> 6
        + 16 * 6 * 256 + 4 * 144 * 256 + 5 * 10 * 256  # block 2 (6 -> 10) at 16x16, transition 10 -> 5
        + 16 * 5 * 64 + 4 * 144 * 64  # block 3 (5 -> 9) at 8x8
        + 9 * 100  # FC
    )
    assert dense_macs(model) == expected == 1_243_524


def test_dense_macs_leaves_the_model_untouched():
    model = create("pyramidskipnet:depth=20,alpha=12").eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    macs = dense_macs(model)
    assert not model.training
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    # Gated blocks are all counted, plus gate convs (C -> 10) and the LSTM (800 MACs per step).
    plain = dense_macs(create("pyramidnet:depth=20,alpha=12"))
    gate_convs = sum(gate.conv.in_channels * 10 for gate in model.gates)
    assert macs == plain + gate_convs + model.num_gates * (800 + 10)


def test_describe_models_matches_the_spec():
    rows = {row["name"]: row for row in describe_models()}
    assert list(rows) == ["densenet100_k12", "densenet172_k30", "pyramidnet272_a200", "pyramidskipnet272_a200",
                          "shakeshake26_2x32d", "shakeshake26_2x96d", "shakeshake26_2x112d", "wrn28_10"]
    assert rows["densenet100_k12"]["params"] == 800_032
    assert round(rows["densenet100_k12"]["macs"] / 1e6, 1) == 288.0  # spec §2.1
    assert round(rows["densenet172_k30"]["macs"] / 1e9, 2) == 4.41
    assert round(rows["pyramidnet272_a200"]["macs"] / 1e9, 2) == 4.49
    assert rows["wrn28_10"]["macs"] == 5_243_386_368  # the challenge baseline: 2 x MACs = 10.49B (scoring.md d.1)
    assert rows["wrn28_10"]["family"] == "wrn"


def test_wrn_stride_placement_variants():
    with torch.device("meta"):
        fast_aa = create("wrn28_10:stride_first=false")
    assert round(dense_macs(fast_aa) / 1e9, 2) == 5.95  # the Fast AutoAugment copy (training.md §2.7)
