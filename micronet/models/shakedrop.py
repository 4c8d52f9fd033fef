"""ShakeDrop regularisation (spec training.md §2.5), written branch-free.

Training: one gate b ~ Bernoulli(1 - p_drop) per mini-batch (per replica under DDP). The branch is
multiplied by b + (1 - b) * alpha in the forward pass and its gradient by b + (1 - b) * beta in the
backward pass, with alpha ~ U[-1, 1] and beta ~ U[0, 1] drawn independently per sample.
Eval: the branch is multiplied by its expectation 1 - p_drop (E[alpha] = 0).

All draws are device tensors blended arithmetically: no `.item()`, no Python branch on tensor values,
so the module runs under AMP, DDP and torch.compile without host syncs or graph breaks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn


class _ShakeDropFunction(torch.autograd.Function):
    """y = x * (b + (1 - b) * alpha); dL/dx = dL/dy * (b + (1 - b) * beta)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, gate: torch.Tensor, alpha: torch.Tensor,
                beta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, beta)
        return x * (gate + (1.0 - gate) * alpha)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        gate, beta = ctx.saved_tensors
        return grad_output * (gate + (1.0 - gate) * beta), None, None, None


def _shake_drop_train(x: torch.Tensor, p_drop: float) -> torch.Tensor:
    # Per-sample scalars broadcast over C, H, W. beta is drawn here rather than inside backward():
    # it is independent of b and alpha either way, and a backward without RNG replays deterministically.
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    gate = (torch.rand((1,) * x.dim(), device=x.device) < 1.0 - p_drop).to(x.dtype)
    alpha = torch.rand(shape, device=x.device, dtype=x.dtype) * 2.0 - 1.0
    beta = torch.rand(shape, device=x.device, dtype=x.dtype)
    return _ShakeDropFunction.apply(x, gate, alpha, beta)


# torch.fx would otherwise inline the autograd.Function's forward and silently drop the beta backward rule:
# keep the training path as one opaque call in traced graphs.
torch.fx.wrap("_shake_drop_train")


def shake_drop(x: torch.Tensor, p_drop: float, training: bool) -> torch.Tensor:
    """Apply ShakeDrop to a residual branch `x` of shape [N, C, H, W] (functional form)."""
    if not training:
        return x * (1.0 - p_drop)
    return _shake_drop_train(x, p_drop)


class ShakeDrop(nn.Module):
    """ShakeDrop on a residual branch with drop probability `p_drop` (gate survival 1 - p_drop).

    Under torch.fx it traces to one multiplication in eval mode and to one opaque call (custom backward
    kept) in training mode.
    """

    def __init__(self, p_drop: float) -> None:
        super().__init__()
        if not 0.0 <= p_drop <= 1.0:
            raise ValueError(f"ShakeDrop p_drop must be in [0, 1], got {p_drop}")
        self.p_drop = float(p_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shake_drop(x, self.p_drop, self.training)

    def extra_repr(self) -> str:
        return f"p_drop={self.p_drop:.4f}"


def linear_decay(num_blocks: int, final_p_drop: float) -> list[float]:
    """Per-block drop probabilities p_l = final_p_drop * l / L for l = 1..L (the linear decay rule)."""
    return [final_p_drop * (index + 1) / num_blocks for index in range(num_blocks)]
