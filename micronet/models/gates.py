"""SkipNet gating (spec training.md §2.6): per-gate feature extractors and the shared LSTM controller."""

from __future__ import annotations

import torch
import torch.nn as nn

LSTMState = tuple[torch.Tensor, torch.Tensor]


class GateFeatures(nn.Module):
    """Global average pool then a 1x1 conv (with bias) C -> `features`: one gate's view of a block output."""

    def __init__(self, in_channels: int, features: int = 10) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv2d(in_channels, features, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.conv(self.pool(x)), 1)


class GateController(nn.Module):
    """One LSTM shared by all gates (hidden state carried from gate to gate), then Linear -> sigmoid."""

    def __init__(self, features: int = 10, hidden: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=1)
        self.proj = nn.Linear(hidden, 1)

    def forward(self, features: torch.Tensor, state: LSTMState | None) -> tuple[torch.Tensor, LSTMState]:
        """Execution probability p of shape [N] for features [N, F]; `state=None` starts from zeros."""
        out, state = self.lstm(features.unsqueeze(0), state)
        return torch.sigmoid(self.proj(out.squeeze(0))).squeeze(1), state


def hard_gate(p: torch.Tensor) -> torch.Tensor:
    """m = 1[p > 0.5] in the forward pass, dm/dp = 1 in the backward pass (straight-through estimator)."""
    # p - p.detach() is exactly zero, so the forward value is exactly 0 or 1.
    return (p > 0.5).to(p.dtype) + (p - p.detach())
