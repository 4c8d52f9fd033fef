"""Small building blocks shared by the model families."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """3x3 convolution with padding 1 (spatial size kept at stride 1)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    """1x1 convolution (channel mixing, or a strided projection shortcut)."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=bias)


def init_he_fan_out_(model: nn.Module) -> None:
    """Conv weights ~ N(0, sqrt(2 / (kh*kw*out_channels))), BN gamma=1 / beta=0; Linear keeps its default.

    This is the initialisation of the reference DenseNet and PyramidNet code (spec training.md §2.1, §2.4).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / (kh * kw * module.out_channels)))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class ClassifierNet(nn.Module):
    """Base of the zoo families: the shared head BN -> ReLU -> global average pool -> Linear ``fc``.

    The model declares its classifier, as timm models do: ``classifier_name`` is its qualified module name
    and ``get_classifier()`` the module. Compression (``compress.state.classifier_name``), loaders and the
    FC stages ask this instead of guessing "the last Linear" (a SkipNet's gate controller has one too).
    """

    classifier_name: str = "fc"

    def get_classifier(self) -> nn.Module:
        """The classifier module (the Linear that produces the logits)."""
        return self.get_submodule(self.classifier_name)

    def _build_head(self, channels: int, num_classes: int) -> None:
        self.bn_final = nn.BatchNorm2d(channels)
        self.relu_final = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Final BN-ReLU, global average pool and classifier."""
        x = self.relu_final(self.bn_final(x))
        return self.fc(torch.flatten(self.pool(x), 1))
