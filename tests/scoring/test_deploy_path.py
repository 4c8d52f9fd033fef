"""One deploy path: the scorer counts compress.deploy_form(model) for every model, float or compressed."""

import dataclasses
from fractions import Fraction

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import micronet.scoring.api as scoring_api
from micronet.compress import SparsityConfig, deploy_form, prune_
from micronet.compress.integer_modules import ScaledWeight
from micronet.models import create
from micronet.scoring import score
from tests.compress.conftest import TINY, randomize_bn_
from tests.scoring.nets import no_exact_zeros_


def _tiny(family: str) -> nn.Module:
    torch.manual_seed(0)
    return no_exact_zeros_(randomize_bn_(create(TINY[family]).eval()))


# (params, ops) of the tiny float models, computed by the previous scorer (commit 01ca532), which traced float
# models as they are and folded BN in its own accounting: an independent implementation of the same rules.
PREVIOUS_SCORER = {
    ("densenet", "fold"): (3518, 2_571_976), ("densenet", "unfold"): (3566, 2_593_480),
    ("pyramidnet", "fold"): (32_906, 19_802_368), ("pyramidnet", "unfold"): (33_306, 20_103_168),
    ("pyramidskipnet", "fold"): (58_049, 34_957_694), ("pyramidskipnet", "unfold"): (58_809, 35_497_534),
    ("wrn", "fold"): (83_588, 25_154_048), ("wrn", "unfold"): (83_700, 25_182_720),
}


@pytest.mark.parametrize("bn", ["fold", "unfold"])
@pytest.mark.parametrize("family", sorted(TINY))
def test_a_float_model_scores_as_its_deploy_form(family, bn):
    model = _tiny(family)
    direct, deployed = score(model, bn=bn, samples=2), score(deploy_form(model), bn=bn, samples=2)
    assert (direct.params, direct.ops) == PREVIOUS_SCORER[family, bn]
    assert (deployed.params, deployed.ops) == PREVIOUS_SCORER[family, bn]


def test_skipnet_deploy_form_holds_each_layer_once():
    # Regression: the old fold_bn kept every block's original convs next to their folded copies, and the
    # scorer's train-mode parameter trace (which calls block.residual) charged both sets.
    model = _tiny("pyramidskipnet")
    deployed = deploy_form(model)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in deployed.modules()) == convs
    assert sum(p.numel() for p in deployed.parameters()) <= sum(p.numel() for p in model.parameters())
    # SkipNet's training path calls block.residual directly: it must run the merged layers, not stale ones.
    block = model.layer2[1]
    y = torch.randn(2, block.in_channels, 16, 16)
    assert torch.allclose(deployed.layer2[1].residual(y), block.residual(y), atol=1e-5)


class ConvBN(nn.Module):
    """conv3x3 (no bias) -> BN -> ReLU -> global pool -> FC: BN folds into the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_bn_policy_charges_the_folded_bn_by_hand_count():
    model = no_exact_zeros_(randomize_bn_(ConvBN().eval()))
    h = w = 8
    out = 8 * h * w
    conv_macs, fc_macs = 27 * out, 8 * 5
    # ops in 32-bit units: conv n mults + (n-1) adds per output, relu 1 per element, mean (HW-1) adds + 1
    # mult per channel, FC 8 mults + 7 adds + bias per output.
    common = conv_macs + (26 * out) + out + 8 * (h * w - 1) + 8 + fc_macs + 5 * 7 + 5
    folded, unfolded = score(model, input_size=8), score(model, input_size=8, bn="unfold")
    assert folded.ops == common + out  # the BN shift became the conv's bias: 1 add per output
    assert folded.params == 27 * 8 + 8 + 8 * 5 + 5  # conv, folded bias, FC
    assert unfolded.ops == common + 2 * out  # BN: 1 mult + 1 add per element
    assert unfolded.params == 27 * 8 + 2 * 8 + 8 * 5 + 5  # BN as scale + shift
    assert {r.kind for r in folded.layers if r.name == "bn"} == {"bn_folded"}
    assert {r.kind for r in unfolded.layers if r.name == "bn"} == {"bn"}


@pytest.mark.parametrize("family", ["wrn", "densenet"])
def test_conv_and_fc_macs_match_torch_flop_counter(family):
    model = _tiny(family)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    kinds = score(model).by_kind()
    assert kinds["conv"]["mults_raw"] + kinds["linear"]["mults_raw"] == Fraction(counter.get_total_flops(), 2)


def _eager_deploy_form(model: nn.Module, **kwargs) -> nn.Module:
    return deploy_form(model, **{**kwargs, "share": False})


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
@pytest.mark.parametrize("family", sorted(TINY))
def test_lazily_folded_weights_score_exactly_as_eagerly_folded_ones(family, pruned, monkeypatch):
    # score() traces deploy_form(share=True), whose folded weights are ScaledWeights computed per use; the
    # eager fold (share=False, what export writes) must give the same figures to the last row and bit.
    model = _tiny(family)
    model.get_submodule(next(n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d))).weight.data[0] = 0
    if pruned:
        prune_(model, SparsityConfig(0.6))
    assert any(isinstance(p, ScaledWeight) for p in deploy_form(model, share=True).parameters())
    policies = [("official", {}), ("official", {"bn": "unfold"}), ("official", {"mask": "always"})]
    lazy = [score(model, policy, samples=2, **kw) for policy, kw in policies]
    monkeypatch.setattr(scoring_api, "deploy_form", _eager_deploy_form)
    eager = [score(model, policy, samples=2, **kw) for policy, kw in policies]
    for a, b in zip(lazy, eager, strict=True):
        assert [dataclasses.asdict(r) for r in a.layers] == [dataclasses.asdict(r) for r in b.layers]
        assert (a.params, a.ops, a.dead, a.free_ops, a.unknown_ops) == (b.params, b.ops, b.dead, b.free_ops,
                                                                          b.unknown_ops)
        assert a.to_dict() == b.to_dict()


def _mlp_bn1d() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)).eval()
    model[2].running_mean.normal_()
    model[2].running_var.uniform_(0.5, 2)
    return model


def test_a_batchnorm1d_on_2d_features_folds_into_the_linear_before_it():
    # The scorer knows the input ([1, 3, 4, 4] -> 48 features), so the BN (dim 1 of [1, 16]) folds into Linear(48, 16).
    # Hand count. params: 48·16 + 16 = 784, 16·10 + 10 = 170, BN folded: 954.
    # ops: Linear(48, 16) 768 mults + 768 adds (47 per sum + 1 bias), ReLU 16, Linear(16, 10) 160 + 160: 1872.
    model = _mlp_bn1d()
    report = score(model, input_size=4)
    assert (report.params, report.ops) == (954, 1872)
    # the same from real data of that shape
    report = score(model, data=torch.randn(2, 3, 4, 4), samples=1)
    assert (report.params, report.ops) == (954, 1872)


def test_a_batchnorm1d_on_a_sequence_is_charged_unfolded():
    # [1, 4, 4] input: BN1d normalises dim 1 (positions), the Linear's features are dim 2: not foldable.
    # Hand count. params: Linear(4, 4) 20, BN 2·4 = 8, Linear(16, 10) 170: 198.
    # ops: Linear(4, 4) on 4 positions 64 mults + 64 adds, BN 16 mults + 16 adds, Linear(16, 10) 160 + 160: 480.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Flatten(), nn.Linear(16, 10)).eval()
    model[1].running_var.uniform_(0.5, 2)
    report = score(model, input_shape=(1, 4, 4))
    assert (report.params, report.ops) == (198, 480)
