"""Shake-Shake 26 2x{32,96,112}d for 32x32 inputs (Gastaldi 2017), as the AutoAugment study trained it.

Architecture (the TensorFlow AutoAugment code's ``shake_shake.py``, which the CIFAR-10.2 study re-ran):
stem 3x3 conv 3 -> 16 (no bias) -> BN; three stages of (depth - 2) / 6 blocks with ``width``, 2·``width``,
4·``width`` channels (``width`` = 32, 96, 112: "2x32d" = two branches of 32 channels in the first stage);
head ReLU -> global average pool -> Linear (no final BN). A block adds two residual branches
ReLU-conv3x3(stride)-BN-ReLU-conv3x3-BN, mixed by the shake rule, to a shortcut that is the identity when
the shape is kept and otherwise two strided 1x1 convs (the second on the input shifted by one pixel) of
out/2 channels each, concatenated, then BN.

Shake rule (paper, "Shake-Shake-Image"): forward ``alpha·b1 + (1 - alpha)·b2``, backward gradients
``beta·g`` and ``(1 - beta)·g``, with alpha and beta ~ U[0, 1] drawn independently per sample at every
step; eval uses the expectation 0.5. (The TF code draws normalised pairs ``r1/(r1 + r2)`` instead of
alpha; the paper's uniform alpha is used here.) Branch-free like ShakeDrop: device tensors blended
arithmetically, no host syncs or graph breaks, so it runs under AMP, DDP and torch.compile.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from micronet.models.layers import ClassifierNet, conv1x1, conv3x3, init_he_fan_out_
from micronet.models.registry import register_family, register_model

STEM_CHANNELS = 16


class _ShakeShakeFunction(torch.autograd.Function):
    """y = alpha * a + (1 - alpha) * b; dL/da = beta * dL/dy, dL/db = (1 - beta) * dL/dy."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor,
                beta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(beta)
        return alpha * a + (1.0 - alpha) * b

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        (beta,) = ctx.saved_tensors
        return grad_output * beta, grad_output * (1.0 - beta), None, None


def _shake_shake_train(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Per-sample scalars broadcast over C, H, W; beta drawn in forward so backward needs no RNG (replays exactly).
    shape = (a.shape[0],) + (1,) * (a.dim() - 1)
    alpha = torch.rand(shape, device=a.device, dtype=a.dtype)
    beta = torch.rand(shape, device=a.device, dtype=a.dtype)
    return _ShakeShakeFunction.apply(a, b, alpha, beta)


# As for ShakeDrop: fx would inline the autograd.Function's forward and lose the beta backward rule.
torch.fx.wrap("_shake_shake_train")


def shake_shake(a: torch.Tensor, b: torch.Tensor, training: bool) -> torch.Tensor:
    """Mix two residual branches by the shake rule (training) or their mean (eval)."""
    if not training:
        return (a + b) * 0.5
    return _shake_shake_train(a, b)


class ShakeShake(nn.Module):
    """The shake mixing of two branches as a module (so tracers attribute it to one name)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return shake_shake(a, b, self.training)


class _Branch(nn.Sequential):
    """ReLU - 3x3 conv (strided) - BN - ReLU - 3x3 conv - BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(
            nn.ReLU(),
            conv3x3(in_channels, out_channels, stride=stride),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            conv3x3(out_channels, out_channels),
            nn.BatchNorm2d(out_channels),
        )


class _Shortcut(nn.Module):
    """Two strided 1x1 convs to out/2 channels, the second on the input shifted one pixel up-left; concat; BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels % 2:
            raise ValueError(f"Shake-Shake projection shortcuts need an even channel count, got {out_channels}")
        self.pool = nn.AvgPool2d(kernel_size=1, stride=stride)  # 1x1 average pool = strided subsampling
        self.conv1 = conv1x1(in_channels, out_channels // 2)
        self.conv2 = conv1x1(in_channels, out_channels // 2)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shifted = F.pad(x, (-1, 1, -1, 1))  # drop the first row and column, zero-pad the last ones
        return self.bn(torch.cat([self.conv1(self.pool(x)), self.conv2(self.pool(shifted))], dim=1))


class _ShakeBlock(nn.Module):
    """Two shaken residual branches plus an identity or projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.branch1 = _Branch(in_channels, out_channels, stride)
        self.branch2 = _Branch(in_channels, out_channels, stride)
        self.shake = ShakeShake()
        needs_projection = stride != 1 or in_channels != out_channels
        self.shortcut = _Shortcut(in_channels, out_channels, stride) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shake(self.branch1(x), self.branch2(x)) + self.shortcut(x)


@register_family("shakeshake")
class ShakeShakeNet(ClassifierNet):
    """Shake-Shake-`depth` 2x`width`d: 3 stages of (depth - 2) / 6 blocks with width, 2·width, 4·width channels."""

    def __init__(self, depth: int = 26, width: int = 32, num_classes: int = 100) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"Shake-Shake depth must be 2 + 6*n (n >= 1), got {depth}")
        if width < 1 or width % 2:
            raise ValueError(f"Shake-Shake width must be a positive even number, got {width}")
        blocks_per_stage = (depth - 2) // 6
        self.conv_stem = conv3x3(3, STEM_CHANNELS)
        self.bn_stem = nn.BatchNorm2d(STEM_CHANNELS)
        channels = STEM_CHANNELS
        stages = []
        for stage, stage_channels in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for index in range(blocks_per_stage):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(_ShakeBlock(channels, stage_channels, stride))
                channels = stage_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        # The head has no final BN (every branch ends in BN already): ReLU -> pool -> fc.
        self.relu_final = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        init_he_fan_out_(self)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Final ReLU, global average pool and classifier."""
        return self.fc(torch.flatten(self.pool(self.relu_final(x)), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_stem(self.conv_stem(x))
        return self.forward_head(self.layer3(self.layer2(self.layer1(x))))


for _width in (32, 96, 112):
    register_model(f"shakeshake26_2x{_width}d", "shakeshake", depth=26, width=_width,
                   summary=f"Shake-Shake 26 2x{_width}d (the AutoAugment / CIFAR-10.2 study's)")
