"""Wide ResNet for 32x32 inputs, the MicroNet baseline WRN-28-10 (spec training.md §2.7).

Pre-activation blocks: BN-ReLU-3x3 conv-BN-ReLU-3x3 conv, shortcut = 1x1 projection of the block input where
the shape changes, identity otherwise. The down-sampling block strides in its *first* conv, as in the
original WRN: that network has 5,243,386,368 MACs, i.e. the challenge's 10.49B-op baseline (spec scoring.md
d.1). `stride_first=false` puts the stride on the second conv as the Fast AutoAugment copy does (spec
training.md §2.7: same parameters, 5.95G MACs).
Convs are bias-free by default (36,536,884 params); `conv_bias=True` gives the reference's 36,546,980.
PyTorch default initialisation, as in the reference.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from micronet.models.layers import ClassifierNet, conv1x1, conv3x3
from micronet.models.registry import register_family, register_model

STEM_CHANNELS = 16


class _WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 (one of them strided) plus an identity or 1x1-projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, conv_bias: bool,
                 stride_first: bool = True) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = conv3x3(in_channels, out_channels, stride=stride if stride_first else 1, bias=conv_bias)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(out_channels, out_channels, stride=1 if stride_first else stride, bias=conv_bias)
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = conv1x1(in_channels, out_channels, stride, bias=conv_bias) if needs_projection \
            else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + self.shortcut(x)


@register_family("wrn")
class WideResNet(ClassifierNet):
    """WRN-`depth`-`width`: 3 stages of (depth - 4) / 6 blocks with 16, 32, 64 times `width` channels."""

    def __init__(self, depth: int = 28, width: int = 10, conv_bias: bool = False, stride_first: bool = True,
                 num_classes: int = 100) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 4 + 6*n (n >= 1), got {depth}")
        if width < 1:
            raise ValueError(f"WideResNet width must be >= 1, got {width}")
        blocks_per_stage = (depth - 4) // 6
        self.conv_stem = conv3x3(3, STEM_CHANNELS, bias=conv_bias)
        channels = STEM_CHANNELS
        stages = []
        for stage, stage_channels in enumerate((16 * width, 32 * width, 64 * width)):
            blocks = []
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(_WideBlock(channels, stage_channels, stride, conv_bias, stride_first))
                channels = stage_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self._build_head(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.layer3(self.layer2(self.layer1(self.conv_stem(x)))))


register_model("wrn28_10", "wrn", depth=28, width=10, summary="WRN-28-10: the MicroNet Challenge baseline")
