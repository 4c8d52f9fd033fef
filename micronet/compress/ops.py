"""The two quantizer primitives, registered as PyTorch custom ops.

Every quantizer in micronet goes through one of these ops, so a dispatch-level tracer (the scorer),
torch.compile and the ONNX exporter each see a quantizer as a single operation with its integer range
as arguments, instead of an anonymous div/round/clamp/mul chain.

* ``micronet::fake_quant(x, scale, qmin, qmax) = clamp(round(x / scale), qmin, qmax) * scale``
  (training form). Division, not multiplication by 1/scale, so that results match ONNX's
  ``Round``/``QuantizeLinear`` bit for bit at rounding ties (spec onnx-export.md §3). Arithmetic is fp32
  even when ``x`` arrives in bf16/fp16 under autocast. Backward: straight-through for ``x`` inside
  the range, zero where the rounded code falls outside it; the exact LSQ derivative for ``scale``.
* ``micronet::round_clamp(x, qmin, qmax) = clamp(round(x), qmin, qmax)`` (integer deploy form:
  the step size has been folded into the preceding per-channel affine).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("micronet::fake_quant", mutates_args=())
def fake_quant(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    """Quantize-dequantize ``x`` onto the grid ``scale * {qmin..qmax}`` (round half to even)."""
    dtype = _compute_dtype(x)
    s = scale.to(dtype)
    return torch.clamp(torch.round(x.to(dtype) / s), qmin, qmax) * s


def _compute_dtype(x: Tensor) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs (never low precision), fp64 for fp64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


@fake_quant.register_fake
def _(x: Tensor, scale: Tensor, qmin: int, qmax: int) -> Tensor:
    return torch.empty_like(x, dtype=_compute_dtype(x))


def _fake_quant_setup(ctx, inputs, output) -> None:
    x, scale, qmin, qmax = inputs
    ctx.save_for_backward(x, scale)
    ctx.qmin, ctx.qmax = qmin, qmax
    ctx.x_dtype = x.dtype


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to ``shape`` (the scale's shape)."""
    if grad.shape == shape:
        return grad
    dims = tuple(range(grad.dim() - len(shape)))
    out = grad.sum(dim=dims) if dims else grad
    keep = tuple(i for i, n in enumerate(shape) if n == 1 and out.shape[i] != 1)
    if keep:
        out = out.sum(dim=keep, keepdim=True)
    return out.reshape(shape)


def _fake_quant_backward(ctx, grad: Tensor):
    x, scale = ctx.saved_tensors
    dtype = _compute_dtype(x)
    s = scale.to(dtype)
    v = x.to(dtype) / s
    code = torch.round(v)
    inside = (code >= ctx.qmin) & (code <= ctx.qmax)
    grad = grad.to(dtype)
    grad_x = torch.where(inside, grad, torch.zeros_like(grad)).to(ctx.x_dtype)
    grad_scale = None
    if ctx.needs_input_grad[1]:
        # d/ds [clamp(round(x/s)) * s] with the straight-through rule for round (LSQ, Esser et al.).
        local = torch.where(inside, code - v, torch.clamp(code, ctx.qmin, ctx.qmax))
        grad_scale = _reduce_to(grad * local, scale.shape).to(scale.dtype)
    return grad_x, grad_scale, None, None


fake_quant.register_autograd(_fake_quant_backward, setup_context=_fake_quant_setup)


@torch.library.custom_op("micronet::round_clamp", mutates_args=())
def round_clamp(x: Tensor, qmin: int, qmax: int) -> Tensor:
    """Integer activation codes: ``clamp(round(x), qmin, qmax)`` as float32 or wider (round half to even)."""
    return torch.clamp(torch.round(x.to(_compute_dtype(x))), qmin, qmax)


@round_clamp.register_fake
def _(x: Tensor, qmin: int, qmax: int) -> Tensor:
    return torch.empty_like(x, dtype=_compute_dtype(x))


def _round_clamp_setup(ctx, inputs, output) -> None:
    x, qmin, qmax = inputs
    ctx.save_for_backward(x)
    ctx.qmin, ctx.qmax = qmin, qmax


def _round_clamp_backward(ctx, grad: Tensor):
    (x,) = ctx.saved_tensors
    code = torch.round(x.to(_compute_dtype(x)))
    inside = (code >= ctx.qmin) & (code <= ctx.qmax)
    return torch.where(inside, grad, torch.zeros_like(grad)).to(x.dtype), None, None


round_clamp.register_autograd(_round_clamp_backward, setup_context=_round_clamp_setup)


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range of a ``bits``-wide quantizer: signed [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b-1]."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def range_bits(qmin: int, qmax: int) -> int:
    """Bits needed to store every code in [qmin, qmax] (sign bit included when qmin < 0)."""
    if qmin < 0:
        return max(max(-qmin - 1, qmax).bit_length() + 1, 1)
    return max(qmax.bit_length(), 1)
