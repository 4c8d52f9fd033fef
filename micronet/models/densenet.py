"""DenseNet-BC for 32x32 inputs (spec training.md §2.1; Huang et al. 2017).

Stem 3x3 conv (3 -> 2k, no BN/ReLU after it: every consumer starts with its own BN), three dense
blocks of n pre-activation layers joined by compressing transitions, then BN-ReLU-pool-FC.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from micronet.models.layers import ClassifierNet, conv1x1, conv3x3, init_he_fan_out_
from micronet.models.registry import register_family, register_model


class _DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (c -> 4k)-BN-ReLU-3x3 conv (4k -> k), or BN-ReLU-3x3 conv without the bottleneck;
    the k new maps are concatenated to the input."""

    def __init__(self, in_channels: int, growth: int, bottleneck: bool) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        if bottleneck:
            self.bn1 = nn.BatchNorm2d(in_channels)
            self.relu1 = nn.ReLU()
            self.conv1 = conv1x1(in_channels, 4 * growth)
            in_channels = 4 * growth
        self.bn2 = nn.BatchNorm2d(in_channels)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(in_channels, growth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.bottleneck:
            out = self.conv1(self.relu1(self.bn1(out)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return torch.cat([x, out], dim=1)


class _DenseBlock(nn.Sequential):
    """`num_layers` dense layers; channels grow by `growth` per layer."""

    def __init__(self, num_layers: int, in_channels: int, growth: int, bottleneck: bool) -> None:
        super().__init__(*[
            _DenseLayer(in_channels + index * growth, growth, bottleneck) for index in range(num_layers)
        ])


class _Transition(nn.Sequential):
    """BN-ReLU-1x1 conv (c -> out) and 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv = conv1x1(in_channels, out_channels)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


@register_family("densenet_bc")
class DenseNet(ClassifierNet):
    """DenseNet(-BC) of `depth` (convs + FC) and growth rate `growth`; transitions keep
    floor(c * compression) channels. `bottleneck` adds the 1x1 conv to every layer (the "B" in BC)."""

    def __init__(self, depth: int = 100, growth: int = 12, compression: float = 0.5, bottleneck: bool = True,
                 num_classes: int = 100) -> None:
        super().__init__()
        convs_per_layer = 2 if bottleneck else 1
        if depth < 4 or (depth - 4) % (3 * convs_per_layer) != 0:
            raise ValueError(
                f"DenseNet depth must be 4 + {3 * convs_per_layer}*n (n >= 0) with bottleneck={bottleneck}, "
                f"got {depth}")
        if growth < 1 or not 0.0 < compression <= 1.0:
            raise ValueError(f"DenseNet needs growth >= 1 and 0 < compression <= 1, "
                             f"got {growth} and {compression}")
        layers_per_block = (depth - 4) // (3 * convs_per_layer)

        channels = 2 * growth
        self.conv_stem = conv3x3(3, channels)
        self.block1 = _DenseBlock(layers_per_block, channels, growth, bottleneck)
        channels += layers_per_block * growth
        self.trans1 = _Transition(channels, int(channels * compression))
        channels = int(channels * compression)
        self.block2 = _DenseBlock(layers_per_block, channels, growth, bottleneck)
        channels += layers_per_block * growth
        self.trans2 = _Transition(channels, int(channels * compression))
        channels = int(channels * compression)
        self.block3 = _DenseBlock(layers_per_block, channels, growth, bottleneck)
        channels += layers_per_block * growth
        self._build_head(channels, num_classes)
        init_he_fan_out_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_stem(x)
        x = self.trans1(self.block1(x))
        x = self.trans2(self.block2(x))
        return self.forward_head(self.block3(x))


register_model("densenet100_k12", "densenet_bc", depth=100, growth=12,
               summary="DenseNet-BC-100, k=12: the 2019 winner's student")
register_model("densenet172_k30", "densenet_bc", depth=172, growth=30,
               summary="DenseNet-BC-172, k=30: the winner's teacher")
