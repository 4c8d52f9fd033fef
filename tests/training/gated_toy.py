"""A toy gated network for the SkipNet stages: one block the task needs, one that does nothing.

The tests that use it register it as the model family ``toygated`` while they run.

``useful``: conv-BN-ReLU whose skip path outputs zeros, so skipping it erases every feature the head reads.
``useless``: a conv whose output is multiplied by zero before the identity shortcut: running it changes
nothing. (Its weights stay dense, unlike an identity initialisation: the scorer counts non-zero weights
only, and the dynamic-score test compares scored ops with dense MACs.) Each block has its own gate
(pool + 1x1 conv, the shared LSTM). In eval a skipped block is not computed (the samples whose gate is on
run alone), as in PyramidSkipNet.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from micronet.models import GatedNetwork
from micronet.models.gates import GateController, GateFeatures


class ToyGatedNet(GatedNetwork, nn.Module):
    """stem (conv, ReLU, 4x4 pool) -> gated ``useful`` -> gated ``useless`` -> pool -> ``fc``."""

    classifier_name = "fc"

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4))
        self.useful = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.useless = nn.Conv2d(width, width, 3, padding=1)
        self.gates = nn.ModuleList([GateFeatures(width, 4), GateFeatures(width, 4)])
        self.controller = GateController(4, 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)
        self._init_gates(2)

    def gated_block_names(self) -> list[str]:
        return ["useful", "useless"]

    def get_classifier(self) -> nn.Module:
        return self.fc

    def _useless(self, x: Tensor) -> Tensor:
        return x + 0.0 * self.useless(x)

    def _gated(self, block, skip, x: Tensor, mask: Tensor) -> Tensor:
        if self.training:
            return skip(x) + mask.view(-1, 1, 1, 1) * (block(x) - skip(x))
        on = torch.nonzero(mask > 0.5).flatten()
        if on.numel() == x.shape[0]:
            return block(x)
        out = skip(x)
        if on.numel() == 0:
            return out
        return out.index_copy(0, on, block(x.index_select(0, on)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        self._begin_gated_forward()
        p, state = self.controller(self.gates[0](x), None)
        x = self._gated(self.useful, torch.zeros_like, x, self.decide(p))
        p, state = self.controller(self.gates[1](x), state)
        x = self._gated(self._useless, lambda t: t, x, self.decide(p))
        self._end_gated_forward(x.shape[0])
        return self.fc(torch.flatten(self.pool(x), 1))
