"""PyramidNet with bottleneck blocks, additive widening and ShakeDrop (spec training.md §2.4, §2.5).

Block b (1..3n over the whole net) has bottleneck width round(16 + b * alpha / (3n)) and 4x that many
output channels. Shortcuts never add parameters: identity, or 2x2 average pooling where the block
strides, then zero channels appended up to the block's output width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from micronet.models.layers import ClassifierNet, conv1x1, conv3x3, init_he_fan_out_
from micronet.models.registry import register_family, register_model
from micronet.models.shakedrop import ShakeDrop, linear_decay

STEM_CHANNELS = 16
EXPANSION = 4


class _Bottleneck(nn.Module):
    """BN-1x1 conv-BN-ReLU-3x3 conv (stride)-BN-ReLU-1x1 conv-BN-ShakeDrop, plus the padded shortcut.

    No ReLU before the first conv or after the addition (the PyramidNet design).
    """

    def __init__(self, in_channels: int, width: int, stride: int, p_drop: float) -> None:
        super().__init__()
        out_channels = EXPANSION * width
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv1x1(in_channels, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU()
        self.conv2 = conv3x3(width, width, stride=stride)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU()
        self.conv3 = conv1x1(width, out_channels)
        self.bn4 = nn.BatchNorm2d(out_channels)
        self.shake_drop = ShakeDrop(p_drop)
        # ceil_mode keeps odd sizes in step with the strided 3x3 conv (pad 1).
        self.downsample = nn.AvgPool2d(2, stride=2, ceil_mode=True) if stride != 1 else nn.Identity()
        # Fixed at construction (not read from the tensor) so that torch.fx can trace the block.
        self.pad_channels = out_channels - in_channels
        self.in_channels = in_channels
        self.out_channels = out_channels

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch F(x), ShakeDrop included."""
        out = self.conv1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(out)))
        out = self.conv3(self.relu3(self.bn3(out)))
        return self.shake_drop(self.bn4(out))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """Parameter-free shortcut: average-pool where the block strides, zero-pad the new channels."""
        return F.pad(self.downsample(x), (0, 0, 0, 0, 0, self.pad_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


def block_widths(depth: int, alpha: float) -> list[int]:
    """Bottleneck widths of the 3n blocks of a PyramidNet (additive widening by alpha over the whole net)."""
    if depth < 11 or (depth - 2) % 9 != 0:
        raise ValueError(f"bottleneck PyramidNet depth must be 2 + 9*n (n >= 1), got {depth}")
    if alpha < 0:
        raise ValueError(f"PyramidNet widening alpha must be >= 0, got {alpha}")
    num_blocks = 3 * ((depth - 2) // 9)
    return [int(round(STEM_CHANNELS + b * alpha / num_blocks)) for b in range(1, num_blocks + 1)]


@register_family("pyramidnet")
class PyramidNet(ClassifierNet):
    """Bottleneck PyramidNet of `depth` (= 2 + 9n) and widening `alpha`, ShakeDrop decaying linearly to
    `final_drop_prob` at the last block (0 disables it)."""

    def __init__(self, depth: int = 272, alpha: float = 200.0, final_drop_prob: float = 0.5,
                 num_classes: int = 100) -> None:
        super().__init__()
        widths = block_widths(depth, alpha)
        p_drops = linear_decay(len(widths), final_drop_prob)
        per_stage = len(widths) // 3
        self.conv_stem = conv3x3(3, STEM_CHANNELS)
        self.bn_stem = nn.BatchNorm2d(STEM_CHANNELS)
        channels = STEM_CHANNELS
        stages = []
        for stage in range(3):
            blocks = []
            for index in range(stage * per_stage, (stage + 1) * per_stage):
                stride = 2 if stage > 0 and index == stage * per_stage else 1
                blocks.append(_Bottleneck(channels, widths[index], stride, p_drops[index]))
                channels = blocks[-1].out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self._build_head(channels, num_classes)
        init_he_fan_out_(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the three stages (pre-head feature maps)."""
        x = self.bn_stem(self.conv_stem(x))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


register_model("pyramidnet272_a200", "pyramidnet", depth=272, alpha=200.0,
               summary="PyramidNet-272, alpha=200, bottleneck + ShakeDrop")
