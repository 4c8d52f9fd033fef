"""Size and dense compute of a model from shapes alone (no scorer, no quantisation rules)."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn


def count_params(model: nn.Module) -> int:
    """Number of parameters, every tensor counted (BN affine and biases included)."""
    return sum(param.numel() for param in model.parameters())


def _layer_macs(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output.numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, nn.LSTM):
        # Input and recurrent products of the four gates, per time step and sample.
        steps = inputs[0].numel() // module.input_size
        per_step = 0
        for layer in range(module.num_layers):
            layer_input = module.input_size if layer == 0 else module.hidden_size
            per_step += 4 * module.hidden_size * (layer_input + module.hidden_size)
        return steps * per_step
    return 0


def dense_macs(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> int:
    """Multiply-accumulates of conv, linear and LSTM layers for one image, every block executed.

    Runs a training-mode forward (so gated blocks all run) on a meta-device copy: no arithmetic,
    and the model's own buffers and RNG state are left untouched.
    """
    return forward_macs(copy.deepcopy(model).to("meta"), input_size)


def forward_macs(shadow: nn.Module, input_size: tuple[int, int, int]) -> int:
    """`dense_macs` on a throwaway model (modified in place), on whatever device it lives on."""
    shadow.train()
    # BatchNorm keeps shapes, and its meta kernel is a slow Python decomposition: leave it out.
    for name, module in list(shadow.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            shadow.set_submodule(name, nn.Identity())
    total = 0

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal total
        total += _layer_macs(module, inputs, output)

    for module in shadow.modules():
        if isinstance(module, nn.Conv2d | nn.Linear | nn.LSTM):
            module.register_forward_hook(hook)
    with torch.no_grad():
        device = next((p.device for p in shadow.parameters()), torch.device("cpu"))
        shadow(torch.zeros((1, *input_size), device=device))
    return total
