"""The classifier is what the model declares: kind "fc" is that one layer, never a SkipNet's gate controller."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from micronet import models
from micronet.compress import QuantConfig, SparsityConfig, prune_, quantize_, weight_mask, weight_quantizer
from micronet.compress.state import classifier_name, select_layers
from micronet.errors import MicronetError
from tests.compress.conftest import TINY


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_zoo_family_declares_fc_as_its_classifier(family):
    model = models.create(TINY[family], num_classes=7)
    assert classifier_name(model) == "fc"
    assert model.get_classifier() is model.fc and model.fc.out_features == 7


def test_skipnet_classifier_is_fc_not_the_gate_controller():
    # The published 272-layer SkipNet, on the meta device (shapes only). Its last Linear in registration
    # order is the gate controller's projection (1 output), which a "last Linear" guess took for the
    # classifier, so a 10-class state_dict was read as having 1 class and failed to load.
    with torch.device("meta"):
        hundred = models.create("pyramidskipnet272_a200")
        ten = models.create("pyramidskipnet272_a200", num_classes=10)
    linears = [n for n, m in hundred.named_modules() if isinstance(m, nn.Linear)]
    assert linears[-1] == "controller.proj"
    name = classifier_name(hundred)
    assert name == "fc"
    rows = ten.state_dict()[f"{name}.weight"].shape[0]  # what a loader sizing the head from a state_dict reads
    assert rows == 10 and hundred.get_submodule(name).out_features == 100


class _TwoHeads(nn.Module):
    def __init__(self, declare: str | None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.logits = nn.Linear(4, 5)
        self.aux = nn.Linear(4, 1)  # registered last: not the classifier
        if declare == "attribute":
            self.classifier_name = "logits"
        elif declare == "method":
            self.get_classifier = lambda: self.logits

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        return self.logits(h) + self.aux(h)


@pytest.mark.parametrize("declare, expected", [("attribute", "logits"), ("method", "logits"), (None, "aux")])
def test_declared_classifier_wins_over_the_last_linear_fallback(declare, expected):
    model = _TwoHeads(declare)
    assert classifier_name(model) == expected
    assert [n for n, _ in select_layers(model, ("fc",))] == [expected]
    assert [n for n, _ in select_layers(model, ("conv", "fc"))] == ["conv", expected]


def test_include_patterns_narrow_within_the_kinds(tiny_densenet):
    # kinds=("conv",) with a pattern naming the FC: nothing to prune (and the FC untouched), not the FC.
    with pytest.raises(MicronetError, match="no layer selected"):
        prune_(tiny_densenet, SparsityConfig(0.5, kinds=("conv",), include=("fc",)))
    assert weight_mask(tiny_densenet.fc) is None
    prune_(tiny_densenet, SparsityConfig(0.5, kinds=("conv",), include=("*",)))
    assert weight_mask(tiny_densenet.fc) is None
    convs = [m for m in tiny_densenet.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(weight_mask(m) is not None for m in convs)
    assert sum(int((m.weight == 0).sum()) for m in convs) == round(0.5 * sum(m.weight.numel() for m in convs))


def test_fc_kind_compresses_only_the_skipnet_classifier():
    torch.manual_seed(0)
    model = models.create(TINY["pyramidskipnet"])
    proj = model.controller.proj
    before = proj.weight.detach().clone()
    prune_(model, SparsityConfig(0.5, scope="layer", kinds=("fc",)))
    quantize_(model, QuantConfig(weight_bits=None, act_bits=None, fc_weight_bits=4))
    assert weight_mask(model.fc) is not None and weight_quantizer(model.fc) is not None
    assert weight_mask(proj) is None and weight_quantizer(proj) is None
    assert torch.equal(proj.weight, before)
    assert all(weight_mask(m) is None for m in model.modules() if isinstance(m, nn.Conv2d))
