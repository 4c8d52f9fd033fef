"""One converter per op: small functions registered by decorator that emit ONNX nodes for one fx node.

A converter receives the :class:`GraphBuilder` and a :class:`Ctx` (the fx node, its converted
arguments and its recorded output shape) and returns the :class:`Value` it produced. Modules are
looked up by type (subclasses included), functions by object, tensor methods by name and custom ops
by their qualified name (``"micronet.round_clamp"``).

Converters also propagate integer-code bounds (``Value.bound``) and record in ``GraphBuilder.inexact``
every reason the result cannot be bit-exact (float weights, non-integer inputs, sums >= 2^24).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import ml_dtypes
import numpy as np
import torch
import torch.nn.functional as F
from onnx import TensorProto
from onnx import numpy_helper as onh
from torch import fx, nn

from micronet.compress.integer_modules import ChannelAffine, IntConv2d, IntLinear, RoundClamp
from micronet.compress.pixel_input import Float64Reduce, PixelInputConv, first_layer_bound
from micronet.export.builder import EXACT_LIMIT, GraphBuilder, UnsupportedModelError, Value

# =================================================================================================
# Registry
# =================================================================================================


@dataclass
class Ctx:
    """What a converter sees: the fx node, its converted arguments and the recorded output shape."""

    node: fx.Node
    args: tuple
    kwargs: dict
    shape: tuple[int, ...]
    batched: bool
    module: nn.Module | None = None
    fqn: str = ""

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Positional-or-keyword argument ``name`` at position ``i``."""
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)


Converter = Callable[[GraphBuilder, Ctx], Value]
_MODULE_CONVERTERS: dict[type, Converter] = {}
_CALL_CONVERTERS: dict[Any, Converter] = {}


def converts_module(*types: type) -> Callable[[Converter], Converter]:
    """Register a converter for modules of the given types (subclasses included)."""

    def register(fn: Converter) -> Converter:
        for t in types:
            _MODULE_CONVERTERS[t] = fn
        return fn

    return register


def converts_call(*targets: Any) -> Callable[[Converter], Converter]:
    """Register a converter for functions (by object) or tensor methods (by name)."""

    def register(fn: Converter) -> Converter:
        for t in targets:
            _CALL_CONVERTERS[t] = fn
        return fn

    return register


def converter_for_module(m: nn.Module) -> Converter | None:
    """The converter registered for ``m``'s type or its nearest registered base class."""
    for cls in type(m).__mro__:
        if cls in _MODULE_CONVERTERS:
            return _MODULE_CONVERTERS[cls]
    return None


def _call_key(node: fx.Node) -> Any:
    """Registry key for a call_function/call_method node (custom ops by their qualified name)."""
    target = node.target
    if node.op == "call_method":
        return target
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(target).split(".default")[0]  # "micronet.round_clamp"
    qualname = getattr(target, "_qualname", None)  # torch.library.CustomOpDef
    if isinstance(qualname, str):
        return qualname.replace("::", ".")
    return target


def converter_for_call(node: fx.Node) -> Converter | None:
    """The converter registered for a call_function/call_method node, if any."""
    return _CALL_CONVERTERS.get(_call_key(node))


# =================================================================================================
# Converters
# =================================================================================================


def _out(ctx: Ctx, name: str, bound: int | None = None) -> Value:
    return Value(name, ctx.shape, ctx.batched, bound)


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_attrs(m: Any, kernel: tuple[int, int]) -> dict:
    """Conv attributes from anything with stride/padding/dilation/groups (a module or F.conv2d's args).

    Attributes equal to ONNX's defaults are left out (kernel_shape is inferred from the weight): at about 60 B
    per convolution they are a noticeable part of a small model's file.
    """
    padding = m.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same": PyTorch puts the extra pixel at the end, as SAME_UPPER would
            total = [d * (k - 1) for d, k in zip(_pair(m.dilation), kernel)]
            padding = None
            pads = [t // 2 for t in total] + [t - t // 2 for t in total]
    if padding is not None:
        ph, pw = _pair(padding)
        pads = [ph, pw, ph, pw]
    attrs = {"pads": pads, "strides": list(_pair(m.stride)), "dilations": list(_pair(m.dilation)),
             "group": int(m.groups)}
    defaults = {"pads": [0, 0, 0, 0], "strides": [1, 1], "dilations": [1, 1], "group": 1}
    return {name: value for name, value in attrs.items() if value != defaults[name]}


def _accumulator_bound(b: GraphBuilder, ctx: Ctx, x: Value, weight: torch.Tensor) -> int | None:
    """Bound on |sum of code products| when both operands are integers, else None (and why)."""
    if x.bound is None:
        b.inexact.append(f"{ctx.fqn}: input is not integer codes")
        return None
    per_output = weight.detach().abs().reshape(weight.shape[0], -1).sum(1)
    acc = int(per_output.max().item()) * x.bound if per_output.numel() else 0
    if acc >= EXACT_LIMIT:
        b.inexact.append(f"{ctx.fqn}: integer sums may reach {acc} >= 2^24")
        return None
    return acc


@converts_module(IntConv2d)
def _int_conv(b: GraphBuilder, ctx: Ctx) -> Value:
    m, x = ctx.module, ctx.args[0]
    w = b.code_weight(ctx.fqn, m.weight)
    bound = _accumulator_bound(b, ctx, x, m.weight)
    y = b.add("Conv", [x.name, w], **_conv_attrs(m, tuple(m.weight.shape[2:])))
    return _out(ctx, y, bound)


@converts_module(nn.Conv2d)
def _conv(b: GraphBuilder, ctx: Ctx) -> Value:
    m, x = ctx.module, ctx.args[0]
    if m.padding_mode != "zeros":
        raise UnsupportedModelError(f"module '{ctx.fqn}': padding_mode={m.padding_mode!r} is not exported")
    b.inexact.append(f"{ctx.fqn}: float weights")
    inputs = [x.name, b.float_weight(ctx.fqn, m.weight)]
    if m.bias is not None:
        inputs.append(b.initializer(m.bias.detach().float().numpy(), f"{ctx.fqn}.bias"))
    return _out(ctx, b.add("Conv", inputs, **_conv_attrs(m, tuple(m.weight.shape[2:]))))


def _linear(b: GraphBuilder, x: Value, w: str, bias: str | None) -> str:
    if x.rank == 2:
        return b.add("Gemm", [x.name, w] + ([bias] if bias else []), transB=1)
    y = b.add("MatMul", [x.name, b.add("Transpose", [w], perm=[1, 0])])
    return b.add("Add", [y, bias]) if bias else y


@converts_module(PixelInputConv)
def _pixel_input_conv(b: GraphBuilder, ctx: Ctx) -> Value:
    """uint8 image -> exact grouped integer conv -> the fixed sequence of elementwise steps PyTorch runs."""
    m, x = ctx.module, ctx.args[0]
    src = x.name
    if m.layout == "nhwc":
        src = b.add("Transpose", [src], perm=[0, 3, 1, 2])
    pixels = b.add("Cast", [src], to=TensorProto.FLOAT)
    bound = first_layer_bound(m.codes())
    if bound >= EXACT_LIMIT:
        b.inexact.append(f"{ctx.fqn}: pixel x code sums may reach {bound} >= 2^24")
    w = b.code_weight(ctx.fqn, m.weight)
    attrs = _conv_attrs(SimpleNamespace(stride=m.stride, padding=m.padding, dilation=m.dilation,
                                        groups=m.in_channels), m.kernel_size)
    grouped = b.add("Conv", [pixels, w], **attrs)
    image = [1, m.in_channels, *ctx.args[0].shape[1:3]] if m.layout == "nhwc" else [1, *x.shape[1:]]
    ones = b.add("ConstantOfShape", [b.ints(image)], value=onh.from_array(np.array([1.0], dtype=np.float32)))
    counts = b.add("Conv", [ones, w], **attrs)
    o = m.out_channels

    def part(t: str, c: int) -> str:
        return b.add("Slice", [t, b.ints([c * o]), b.ints([(c + 1) * o]), b.ints([1])])

    scale, shift = m.scale.tolist(), m.shift.tolist()
    y = b.add("Mul", [part(grouped, 0), b.scalar(scale[0])])
    border = b.add("Mul", [part(counts, 0), b.scalar(shift[0])])
    for c in range(1, m.in_channels):  # the order of PixelInputConv.forward, step for step
        y = b.add("Add", [y, b.add("Mul", [part(grouped, c), b.scalar(scale[c])])])
        border = b.add("Add", [border, b.add("Mul", [part(counts, c), b.scalar(shift[c])])])
    return _out(ctx, b.add("Add", [y, border]))


@converts_module(Float64Reduce)
def _float64_reduce(b: GraphBuilder, ctx: Ctx) -> Value:
    """A global average pool or a classifier computed in float64 and rounded once, as Float64Reduce does."""
    m, x = ctx.module, ctx.args[0]
    op, fqn = m.op, f"{ctx.fqn}.op"
    xd = b.add("Cast", [x.name], to=TensorProto.DOUBLE)
    if isinstance(op, IntLinear):
        w = b.add("Cast", [b.code_weight(fqn, op.weight)], to=TensorProto.DOUBLE)
        if x.rank != 2:
            raise UnsupportedModelError(f"module '{ctx.fqn}': a float64 classifier needs a [batch, features] input")
        y = b.add("Gemm", [xd, w], transB=1)
    elif isinstance(op, nn.AdaptiveAvgPool2d | nn.AvgPool2d):
        # onnxruntime has no float64 AveragePool: sum, then divide by the window size as PyTorch does
        h, w_ = x.shape[2:]
        total = b.add("ReduceSum", [xd, b.ints([2, 3])], keepdims=1)
        y = b.add("Div", [total, b.scalar(float(h * w_), np.float64)])
    else:
        raise UnsupportedModelError(f"module '{ctx.fqn}': no float64 form for {type(op).__name__}")
    return _out(ctx, b.add("Cast", [y], to=TensorProto.FLOAT))


@converts_module(IntLinear)
def _int_linear(b: GraphBuilder, ctx: Ctx) -> Value:
    m, x = ctx.module, ctx.args[0]
    bound = _accumulator_bound(b, ctx, x, m.weight)
    return _out(ctx, _linear(b, x, b.code_weight(ctx.fqn, m.weight), None), bound)


@converts_module(nn.Linear)
def _float_linear(b: GraphBuilder, ctx: Ctx) -> Value:
    m, x = ctx.module, ctx.args[0]
    b.inexact.append(f"{ctx.fqn}: float weights")
    bias = b.initializer(m.bias.detach().float().numpy(), f"{ctx.fqn}.bias") if m.bias is not None else None
    return _out(ctx, _linear(b, x, b.float_weight(ctx.fqn, m.weight), bias))


@converts_module(ChannelAffine)
def _channel_affine(b: GraphBuilder, ctx: Ctx) -> Value:
    m, x = ctx.module, ctx.args[0]
    # Mul then Add, two roundings, exactly as ChannelAffine.forward computes it.
    y = b.add("Mul", [x.name, b.channel_view(m.scale, x.rank, f"{ctx.fqn}.scale", m.axis)])
    if m.bias is not None:
        y = b.add("Add", [y, b.channel_view(m.bias, x.rank, f"{ctx.fqn}.bias", m.axis)])
    return _out(ctx, y)


# Zero-point types for the QDQ form of an activation quantizer, narrowest first: (numpy dtype, min, max).
_QDQ_TYPES = (
    ("uint4", 0, 15),
    ("int4", -8, 7),
    ("uint8", 0, 255),
    ("int8", -128, 127),
    ("uint16", 0, 2**16 - 1),
    ("int16", -(2**15), 2**15 - 1),
)


def _round_clamp(b: GraphBuilder, x: Value, qmin: int, qmax: int) -> str:
    if b.form == "integer":
        r = b.add("Round", [x.name])
        return b.add("Clip", [r, b.scalar(float(qmin)), b.scalar(float(qmax))])
    fitting = [(name, lo, hi) for name, lo, hi in _QDQ_TYPES if lo <= qmin and qmax <= hi]
    if not fitting:
        raise UnsupportedModelError(f"activation code range [{qmin}, {qmax}] does not fit 16 bits")
    dtype_name, tmin, tmax = fitting[0]
    dtype = getattr(ml_dtypes, dtype_name, None) or np.dtype(dtype_name)
    src = x.name
    if (qmin, qmax) != (tmin, tmax):
        # Clip on integer bounds before rounding equals clamp(round(x)); the type saturates otherwise.
        src = b.add("Clip", [src, b.scalar(float(qmin)), b.scalar(float(qmax))])
    zp = b.scalar(0, dtype)
    q = b.add("QuantizeLinear", [src, b.scalar(1.0), zp])
    return b.add("DequantizeLinear", [q, b.scalar(1.0), zp])


@converts_module(RoundClamp)
def _round_clamp_module(b: GraphBuilder, ctx: Ctx) -> Value:
    m = ctx.module
    return _out(ctx, _round_clamp(b, ctx.args[0], m.qmin, m.qmax), max(abs(m.qmin), abs(m.qmax)))


@converts_call("micronet.round_clamp")
def _round_clamp_op(b: GraphBuilder, ctx: Ctx) -> Value:
    x, qmin, qmax = ctx.arg(0, "x"), int(ctx.arg(1, "qmin")), int(ctx.arg(2, "qmax"))
    return _out(ctx, _round_clamp(b, x, qmin, qmax), max(abs(qmin), abs(qmax)))


@converts_call("micronet.fake_quant")
def _fake_quant_op(b: GraphBuilder, ctx: Ctx) -> Value:
    x, scale = ctx.arg(0, "x"), b.operand(ctx.arg(1, "scale"))
    qmin, qmax = int(ctx.arg(2, "qmin")), int(ctx.arg(3, "qmax"))
    # Div (not Mul by 1/scale), as micronet::fake_quant computes it, so rounding ties agree.
    r = b.add("Round", [b.add("Div", [x.name, scale])])
    c = b.add("Clip", [r, b.scalar(float(qmin)), b.scalar(float(qmax))])
    return _out(ctx, b.add("Mul", [c, scale]))


@converts_module(nn.BatchNorm1d, nn.BatchNorm2d)
def _batch_norm(b: GraphBuilder, ctx: Ctx) -> Value:
    m, x = ctx.module, ctx.args[0]
    if not m.track_running_stats or m.running_mean is None:
        raise UnsupportedModelError(f"module '{ctx.fqn}': BatchNorm without running statistics")
    c = m.num_features
    gamma = m.weight if m.affine else torch.ones(c)
    beta = m.bias if m.affine else torch.zeros(c)
    inputs = [x.name] + [
        b.initializer(t.detach().float().numpy(), f"{ctx.fqn}.{k}")
        for k, t in (("weight", gamma), ("bias", beta), ("running_mean", m.running_mean),
                     ("running_var", m.running_var))
    ]
    return _out(ctx, b.add("BatchNormalization", inputs, epsilon=float(m.eps)))


@converts_module(nn.ReLU)
@converts_call(F.relu, torch.relu, "relu", "relu_")
def _relu(b: GraphBuilder, ctx: Ctx) -> Value:
    x = ctx.args[0]
    return _out(ctx, b.add("Relu", [x.name]), x.bound)


@converts_module(nn.ReLU6, nn.Hardtanh)
def _hardtanh(b: GraphBuilder, ctx: Ctx) -> Value:
    m = ctx.module
    lo, hi = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (float(m.min_val), float(m.max_val))
    return _out(ctx, b.add("Clip", [ctx.args[0].name, b.scalar(lo), b.scalar(hi)]))


@converts_module(nn.Identity, nn.Dropout, nn.Dropout2d)
@converts_call(F.dropout, "contiguous", "clone", "detach", "float", "to")
def _identity(b: GraphBuilder, ctx: Ctx) -> Value:
    x = ctx.args[0]
    return Value(x.name, ctx.shape, ctx.batched, x.bound)


def _pool_attrs(kernel: Any, stride: Any, padding: Any, ceil_mode: bool) -> dict:
    k = _pair(kernel)
    s = _pair(stride) if stride not in (None, [], ()) else k
    p = _pair(padding)
    return {"kernel_shape": list(k), "strides": list(s), "pads": [p[0], p[1], p[0], p[1]],
            "ceil_mode": int(bool(ceil_mode))}


@converts_module(nn.AvgPool2d)
def _avg_pool_module(b: GraphBuilder, ctx: Ctx) -> Value:
    m = ctx.module
    if m.divisor_override is not None:
        raise UnsupportedModelError(f"module '{ctx.fqn}': AvgPool2d divisor_override is not exported")
    attrs = _pool_attrs(m.kernel_size, m.stride, m.padding, m.ceil_mode)
    return _out(ctx, b.add("AveragePool", [ctx.args[0].name], count_include_pad=int(m.count_include_pad), **attrs))


@converts_call(F.avg_pool2d)
def _avg_pool_fn(b: GraphBuilder, ctx: Ctx) -> Value:
    if ctx.arg(6, "divisor_override") is not None:
        raise UnsupportedModelError("avg_pool2d with divisor_override is not exported")
    attrs = _pool_attrs(ctx.arg(1, "kernel_size"), ctx.arg(2, "stride"), ctx.arg(3, "padding", 0),
                        ctx.arg(4, "ceil_mode", False))
    include = int(bool(ctx.arg(5, "count_include_pad", True)))
    return _out(ctx, b.add("AveragePool", [ctx.args[0].name], count_include_pad=include, **attrs))


def _max_pool(b: GraphBuilder, ctx: Ctx, kernel, stride, padding, dilation, ceil_mode) -> Value:
    x = ctx.args[0]
    attrs = _pool_attrs(kernel, stride, padding, ceil_mode)
    if x.name in b.zero_pads:
        y = _max_pool_of_zero_pad(b, ctx, x, attrs, dilation)
        if y is not None:
            return _out(ctx, y, x.bound)
    return _out(ctx, b.add("MaxPool", [x.name], dilations=list(_pair(dilation)), **attrs), x.bound)


def _max_pool_of_zero_pad(b: GraphBuilder, ctx: Ctx, padded: Value, attrs: dict, dilation) -> str | None:
    """MaxPool(Pad0(x)) without a Pad node in front of the MaxPool.

    onnxruntime (1.31, every optimisation level above "disabled") fuses a zero Pad into the following
    MaxPool's ``pads``, but MaxPool pads with -inf, so windows whose valid values are all negative
    change. Instead: MaxPool(x) with the zero pad as its own pads, then Max with a constant that is 0
    on windows touching the zero pad and -inf elsewhere (computed here with torch's own max_pool2d).
    """
    x, spatial = b.zero_pads[padded.name]
    k, own = attrs["kernel_shape"], attrs["pads"]
    begins = [spatial[0][0] + own[0], spatial[1][0] + own[1]]
    ends = [spatial[0][1] + own[2], spatial[1][1] + own[3]]
    if any(p >= kk for p, kk in zip(begins + ends, k + k)):
        return None  # ONNX requires pads < kernel; keep the explicit Pad (verification will judge it)
    marker = torch.full((1, 1, *x.shape[2:]), float("-inf"))
    marker = F.pad(marker, (spatial[1][0], spatial[1][1], spatial[0][0], spatial[0][1]), value=0.0)
    marker = F.max_pool2d(marker, k, attrs["strides"], (own[0], own[1]), _pair(dilation), bool(attrs["ceil_mode"]))
    pooled = b.add("MaxPool", [x.name], dilations=list(_pair(dilation)),
                   **{**attrs, "pads": begins + ends})
    return b.add("Max", [pooled, b.initializer(marker.numpy())])


@converts_module(nn.MaxPool2d)
def _max_pool_module(b: GraphBuilder, ctx: Ctx) -> Value:
    m = ctx.module
    if m.return_indices:
        raise UnsupportedModelError(f"module '{ctx.fqn}': MaxPool2d(return_indices=True) is not exported")
    return _max_pool(b, ctx, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


@converts_call(F.max_pool2d)
def _max_pool_fn(b: GraphBuilder, ctx: Ctx) -> Value:
    return _max_pool(b, ctx, ctx.arg(1, "kernel_size"), ctx.arg(2, "stride"), ctx.arg(3, "padding", 0),
                     ctx.arg(4, "dilation", 1), ctx.arg(5, "ceil_mode", False))


def _adaptive_avg(b: GraphBuilder, ctx: Ctx, x: Value) -> Value:
    (h, w), (oh_, ow) = x.shape[2:], ctx.shape[2:]
    if (oh_, ow) == (1, 1):
        return _out(ctx, b.add("GlobalAveragePool", [x.name]))
    if h % oh_ or w % ow:
        raise UnsupportedModelError(f"adaptive average pooling {h}x{w} -> {oh_}x{ow} (uneven windows)")
    k = [h // oh_, w // ow]
    return _out(ctx, b.add("AveragePool", [x.name], kernel_shape=k, strides=k))


@converts_module(nn.AdaptiveAvgPool2d)
@converts_call(F.adaptive_avg_pool2d)
def _adaptive_avg_pool(b: GraphBuilder, ctx: Ctx) -> Value:
    return _adaptive_avg(b, ctx, ctx.args[0])


@converts_call(torch.mean, "mean")
def _mean(b: GraphBuilder, ctx: Ctx) -> Value:
    x, dims = ctx.arg(0, "input"), ctx.arg(1, "dim")
    keep = bool(ctx.arg(2, "keepdim", False))
    dims = [dims] if isinstance(dims, int) else list(dims)
    axes = sorted(d % x.rank for d in dims)
    if 0 in axes and x.batched:
        raise UnsupportedModelError("a mean over the batch dimension is not exported")
    return _out(ctx, b.add("ReduceMean", [x.name, b.ints(axes)], keepdims=int(keep)))


@converts_module(nn.Flatten, nn.Unflatten)
@converts_call(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
               "flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as")
def _reshape(b: GraphBuilder, ctx: Ctx) -> Value:
    # Every shape change is a Reshape to the recorded output shape; 0 copies the runtime batch.
    x = ctx.args[0]
    if ctx.batched and not x.batched:
        raise UnsupportedModelError(f"{ctx.node.target}: reshape that creates a batch dimension")
    target = list(ctx.shape)
    if ctx.batched:
        target[0] = 0
    return _out(ctx, b.add("Reshape", [x.name, b.ints(target)]), x.bound)


@converts_call(torch.cat, torch.concat)
def _cat(b: GraphBuilder, ctx: Ctx) -> Value:
    parts, dim = list(ctx.arg(0, "tensors")), int(ctx.arg(1, "dim", 0))
    names = [b.operand(p) for p in parts]
    bounds = [p.bound if isinstance(p, Value) else None for p in parts]
    bound = None if any(x is None for x in bounds) else max(bounds)
    return _out(ctx, b.add("Concat", names, axis=dim % len(ctx.shape)), bound)


def _binary(op: str, combine: Callable[[int, int], int] | None) -> Converter:
    def convert(b: GraphBuilder, ctx: Ctx) -> Value:
        lhs, rhs = ctx.args[0], ctx.args[1]
        if ctx.kwargs.get("alpha", 1) != 1:
            raise UnsupportedModelError(f"{op} with alpha != 1 is not exported")
        bound = None
        if combine and isinstance(lhs, Value) and isinstance(rhs, Value) and None not in (lhs.bound, rhs.bound):
            bound = combine(lhs.bound, rhs.bound)
            bound = bound if bound < EXACT_LIMIT else None
        return _out(ctx, b.add(op, [b.operand(lhs), b.operand(rhs)]), bound)

    return convert


converts_call(operator.add, operator.iadd, torch.add, "add", "add_")(_binary("Add", operator.add))
converts_call(operator.sub, operator.isub, torch.sub, "sub", "sub_")(_binary("Sub", operator.add))
converts_call(operator.mul, operator.imul, torch.mul, "mul", "mul_")(_binary("Mul", None))
converts_call(operator.truediv, operator.itruediv, torch.div, "div", "div_")(_binary("Div", None))


@converts_call(torch.sigmoid, "sigmoid")
def _sigmoid(b: GraphBuilder, ctx: Ctx) -> Value:
    return _out(ctx, b.add("Sigmoid", [ctx.args[0].name]))


@converts_call(F.pad)
def _pad(b: GraphBuilder, ctx: Ctx) -> Value:
    x, pad = ctx.arg(0, "input"), list(ctx.arg(1, "pad"))
    mode, value = ctx.arg(2, "mode", "constant"), ctx.arg(3, "value", None) or 0.0
    if mode != "constant":
        raise UnsupportedModelError(f"F.pad mode {mode!r} is not exported")
    begins, ends = [0] * x.rank, [0] * x.rank
    for i in range(len(pad) // 2):  # torch lists (begin, end) pairs from the last dim backwards
        begins[x.rank - 1 - i], ends[x.rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    y = b.add("Pad", [x.name, b.ints(begins + ends), b.scalar(float(value))], mode="constant")
    if float(value) == 0.0 and x.rank == 4 and not any(begins[:2] + ends[:2]):
        b.zero_pads[y] = (x, [(begins[2], ends[2]), (begins[3], ends[3])])
    bound = x.bound if x.bound is not None and float(value).is_integer() else None
    return _out(ctx, y, None if bound is None else max(bound, abs(int(value))))


def _constant_of_shape(b: GraphBuilder, ctx: Ctx, value: float) -> Value:
    static = list(ctx.shape[1:]) if ctx.batched else list(ctx.shape)
    if not ctx.batched:
        return _out(ctx, b.initializer(np.full(static, value, dtype=np.float32)))
    shape = b.add("Concat", [b.batch_dim, b.ints(static)], axis=0)
    y = b.add("ConstantOfShape", [shape], value=onh.from_array(np.array([value], dtype=np.float32)))
    return _out(ctx, y, abs(int(value)) if float(value).is_integer() else None)


@converts_call(torch.zeros, torch.zeros_like, "new_zeros")
def _zeros(b: GraphBuilder, ctx: Ctx) -> Value:
    return _constant_of_shape(b, ctx, 0.0)


@converts_call(torch.ones, torch.ones_like, "new_ones")
def _ones(b: GraphBuilder, ctx: Ctx) -> Value:
    return _constant_of_shape(b, ctx, 1.0)


@converts_call(F.conv2d)
def _conv_fn(b: GraphBuilder, ctx: Ctx) -> Value:
    x, w, bias = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    if not isinstance(w, torch.Tensor) or isinstance(bias, Value):
        raise UnsupportedModelError("F.conv2d with a weight computed from the input is not exported")

    attrs = SimpleNamespace(  # F.conv2d's arguments in the shape _conv_attrs reads from modules
        stride=ctx.arg(3, "stride", 1), padding=ctx.arg(4, "padding", 0),
        dilation=ctx.arg(5, "dilation", 1), groups=ctx.arg(6, "groups", 1),
    )
    name = ctx.node.name
    b.inexact.append(f"{name}: float weights")
    inputs = [x.name, b.float_weight(name, w)]
    if bias is not None:
        inputs.append(b.operand(bias))
    return _out(ctx, b.add("Conv", inputs, **_conv_attrs(attrs, tuple(w.shape[2:]))))


@converts_call(F.linear)
def _linear_fn(b: GraphBuilder, ctx: Ctx) -> Value:
    x, w, bias = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    if not isinstance(w, torch.Tensor) or isinstance(bias, Value):
        raise UnsupportedModelError("F.linear with a weight computed from the input is not exported")
    name = ctx.node.name
    b.inexact.append(f"{name}: float weights")
    bias_name = b.operand(bias) if bias is not None else None
    return _out(ctx, _linear(b, x, b.float_weight(name, w), bias_name))


__all__ = ["Converter", "Ctx", "converter_for_call", "converter_for_module", "converts_call", "converts_module"]
