"""Size and dense compute of a model from shapes alone (no scorer, no quantisation rules)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.overrides import TorchFunctionMode

from micronet.models.shakedrop import ShakeDrop


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

    Runs a training-mode forward (so gated blocks all run) on a copy: the model's own buffers and RNG
    state are left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        return forward_macs(copy.deepcopy(model), input_size)


# In-place fillers that initialisation calls (torch.nn.init and reset_parameters end in these).
_FILLERS = frozenset({"normal_", "uniform_", "zero_", "fill_", "bernoulli_", "random_", "exponential_",
                      "log_normal_", "cauchy_", "geometric_"})


class _SkipFill(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        filler = name in _FILLERS or (getattr(func, "__module__", "") == "torch.nn.init" and name.endswith("_"))
        # torch.nn.init passes its tensor by keyword (``normal_(tensor=...)``), Tensor methods positionally.
        target = args[0] if args else (kwargs or {}).get("tensor")
        if filler and isinstance(target, torch.Tensor):
            return target
        return func(*args, **(kwargs or {}))


def build_for_sizing(factory: Callable[[], nn.Module]) -> nn.Module:
    """``factory()`` on the meta device with its tensors left unfilled: sizing needs shapes, not values
    (filling ~100M weights with random numbers was most of the cost of building the big models)."""
    with torch.device("meta"), _SkipFill():
        return factory()


# Modules whose output has their input's shape and which do no MACs: skipped in the sizing forward.
_SHAPE_PRESERVING = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.Dropout, ShakeDrop)


def _conv_output_shape(conv: nn.Conv2d, x: Tensor) -> tuple[int, ...]:
    if conv.padding == "same":
        return (*x.shape[:-3], conv.out_channels, *x.shape[-2:])
    padding = (0, 0) if conv.padding == "valid" else conv.padding
    size = [(n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(x.shape[-2:], padding, conv.dilation, conv.kernel_size, conv.stride)]
    return (*x.shape[:-3], conv.out_channels, *size)


def forward_macs(shadow: nn.Module, input_size: tuple[int, int, int]) -> int:
    """`dense_macs` on a throwaway model (modified in place, so its values need not even be filled).

    Convolutions, linear layers and LSTMs are replaced by their output shapes (zeros), BatchNorm, ReLU and
    ShakeDrop by identity: the MACs depend on shapes only, and the arithmetic of a full-size batch-1 forward
    (or, on the meta device, the Python shape functions of every elementwise op) would dominate.
    """
    return sum(_forward_macs_by_module(shadow, input_size).values())


def macs_by_module(model: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> dict[str, int]:
    """`dense_macs` split by the name of the conv / linear / LSTM module that does them (a copy is used)."""
    with torch.random.fork_rng(devices=[]):
        return _forward_macs_by_module(copy.deepcopy(model), input_size)


def _forward_macs_by_module(shadow: nn.Module, input_size: tuple[int, int, int]) -> dict[str, int]:
    shadow.train()
    totals: dict[str, int] = {}

    def conv_shape(name: str, module: nn.Conv2d, x: Tensor) -> Tensor:
        out = x.new_zeros(_conv_output_shape(module, x))
        totals[name] = totals.get(name, 0) + _layer_macs(module, (x,), out)
        return out

    def linear_shape(name: str, module: nn.Linear, x: Tensor) -> Tensor:
        out = x.new_zeros((*x.shape[:-1], module.out_features))
        totals[name] = totals.get(name, 0) + _layer_macs(module, (x,), out)
        return out

    def lstm_hook(name: str, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        totals[name] = totals.get(name, 0) + _layer_macs(module, inputs, output)

    def lstm_shape(name: str, module: nn.LSTM, x: Tensor, state: Any = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        # Unidirectional, no projection (checked below): output [..., hidden], h and c [layers, (N,) hidden].
        out = x.new_zeros((*x.shape[:-1], module.hidden_size))
        batch = () if x.dim() == 2 else (x.shape[0 if module.batch_first else 1],)
        hidden = x.new_zeros((module.num_layers, *batch, module.hidden_size))
        totals[name] = totals.get(name, 0) + _layer_macs(module, (x,), out)
        return out, (hidden, hidden.clone())

    for name, module in list(shadow.named_modules()):
        if isinstance(module, _SHAPE_PRESERVING) and name:
            shadow.set_submodule(name, nn.Identity())
        elif isinstance(module, nn.Conv2d):
            module.forward = functools.partial(conv_shape, name, module)
        elif isinstance(module, nn.Linear):
            module.forward = functools.partial(linear_shape, name, module)
        elif isinstance(module, nn.LSTM) and not module.bidirectional and module.proj_size == 0:
            module.forward = functools.partial(lstm_shape, name, module)
        elif isinstance(module, nn.LSTM):
            module.register_forward_hook(functools.partial(lstm_hook, name))
    with torch.no_grad():
        device = next((p.device for p in shadow.parameters()), torch.device("cpu"))
        shadow(torch.zeros((1, *input_size), device=device))
    return totals
