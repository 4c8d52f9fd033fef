"""Modules of the integer deploy form (spec training.md §2.3, generalised to any network).

In this form every quantized conv/linear holds its *integer weight codes* (as float32 tensors that are
exact integers; zero means pruned) and no scale; the de-quantisation, folded BatchNorm and the next
activation step live in per-channel ``ChannelAffine`` layers; activation quantizers are ``RoundClamp``.
This is the representation the scorer counts and the ONNX exporter writes. Read protocol:

* ``IntConv2d`` / ``IntLinear``: buffer ``weight`` (codes), ``weight_bits`` (int), ``weight_signed``
  (bool), ``block`` (mask block ``(out, in)`` or ``None`` for element masks).
* ``ChannelAffine``: buffers ``scale`` (shape ``[C]`` or ``[1]``) and optional ``bias``, and ``axis`` (1 or -1,
  the channel axis); computes ``y[:, c] = scale[c] * x[:, c] + bias[c]`` (axis 1: conv/BN outputs) or
  ``y[..., c] = scale[c] * x[..., c] + bias[c]`` (axis -1: a Linear's outputs, whatever the input's rank).
* ``RoundClamp``: ``qmin``, ``qmax``, ``bits``; output codes are integers in ``[qmin, qmax]``.
* A float ``nn.Conv2d`` / ``nn.Linear`` that absorbed affines (BN folding) carries ``folded`` (the
  :class:`FoldedAffine` records of what it absorbed) and ``bias_folded`` (its bias exists only because a
  folded affine shifted), so that an accounting convention may still charge them as separate layers.
  In the scorer's deploy form (``deploy_form(share=True)``) its ``weight`` is a :class:`ScaledWeight`: the same
  values, computed when an op reads them (see there).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor, nn

from micronet.compress.ops import range_bits, round_clamp


def _as_float(t: Tensor) -> Tensor:
    """A detached copy, float32 unless already floating point (a float64 model stays float64)."""
    t = t.detach().clone()
    return t if torch.is_floating_point(t) else t.to(torch.float32)


# Elements of a folded weight materialised at a time to find its nonzeros (4 MB of float32).
_MASK_CHUNK = 1 << 20


class ScaledWeight(Tensor):
    """A folded weight ``base * s1 * s2 ...`` (scales per output channel, applied in order) that holds only its
    factors: :meth:`materialize` computes the values, for one op at a time.

    Folding BatchNorm into every conv would otherwise hold a second copy of all of a model's weights while the
    scorer traces its deploy form (``deploy_form(share=True)``): about 100 MB on PyramidNet-272. It is a
    parameter (``nn.Parameter``'s flag, set without the ``detach`` that would dispatch on it) with the folded
    weight's shape, dtype and device and no memory of its own, so modules, ``named_parameters`` and the scorer
    see the same tensor, under the same name, as with an eager fold. Its values are the eager fold's bit for bit
    (the same clone-then-``mul_`` sequence).

    Who computes with it materialises it first: the scorer's trace does, for each op
    (``micronet.scoring.trace``); its cost rules read only which values are nonzero (:meth:`nonzero_mask`,
    computed a few output channels at a time). Any other op on it still works (``__torch_dispatch__`` materialises),
    but torch imports ``torch.distributed.tensor`` (about 37 MB) on a Python tensor subclass's first dispatch.
    It is read-only: an op that writes it raises, and its storage is ``base``'s, so a tracer that protects the
    caller's memory sees a write into a shared ``base``.
    """

    base: Tensor
    scales: tuple[Tensor, ...]

    @staticmethod
    def __new__(cls, base: Tensor, scales: tuple[Tensor, ...] = ()) -> ScaledWeight:
        # A wrapper subclass: metadata only, no memory of its own.
        new = Tensor._make_wrapper_subclass(cls, base.shape, strides=base.stride(), dtype=base.dtype,
                                            device=base.device, requires_grad=False)
        new.base, new.scales = base, tuple(scales)
        new._is_param = True  # what nn.Parameter(custom tensor) sets, after a detach that would dispatch here
        return new

    def rescaled(self, scale: Tensor) -> ScaledWeight:
        """This weight with ``scale`` (broadcastable, applied after the others) folded in too."""
        return ScaledWeight(self.base, (*self.scales, scale))

    def materialize(self) -> Tensor:
        """The folded values, as a plain tensor that nothing else holds."""
        w = self.base.clone()
        for s in self.scales:
            w.mul_(s)
        return w

    def nonzero_mask(self) -> Tensor:
        """``values != 0`` as a bool tensor, computed a few output channels at a time, so the values are never all
        in memory. The same as the full materialisation's, bit for bit: the products are elementwise, and a scale
        (per output channel, ``[out, 1, ...]``, as folding makes them; or any broadcastable one) is cut with the
        rows it spans."""
        if self.dim() == 0:
            return self.materialize().ne(0)
        mask = torch.empty(self.shape, dtype=torch.bool, device=self.device)
        out = self.shape[0]
        step = max(1, _MASK_CHUNK * out // max(self.numel(), 1))
        for a in range(0, out, step):
            w = self.base[a : a + step].clone()
            for s in self.scales:
                # A scale spanning dim 0 is cut like the rows; any other broadcasts over them whole.
                w.mul_(s[a : a + step] if s.dim() == self.dim() and s.shape[0] == out else s)
            torch.ne(w, 0, out=mask[a : a + step])
        return mask

    def __deepcopy__(self, memo: dict) -> ScaledWeight:
        return ScaledWeight(copy.deepcopy(self.base, memo), copy.deepcopy(self.scales, memo))

    def untyped_storage(self):  # noqa: ANN201 (torch's own return type)
        """``base``'s memory: the memory reading this weight reads, and writing it would write."""
        return self.base.untyped_storage()

    def __repr__(self) -> str:
        return f"ScaledWeight(shape={tuple(self.shape)}, scales={len(self.scales)})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return ScaledWeight(args[0].base, args[0].scales)  # a view of it: still lazy
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, ScaledWeight):
                raise RuntimeError(f"{func._schema.name} writes a folded weight of the scoring deploy form, "
                                   "which is read-only")
        return func(*pytree.tree_map(materialized, args), **pytree.tree_map(materialized, kwargs))


def nonzero_mask(value: Tensor) -> Tensor:
    """``value != 0`` as a bool tensor; a :class:`ScaledWeight`'s without materialising all its values."""
    return value.nonzero_mask() if isinstance(value, ScaledWeight) else value.ne(0)


def materialized(value: object) -> object:
    """``value``, or its values when it is a :class:`ScaledWeight` (anything else passes through as it is)."""
    return value.materialize() if isinstance(value, ScaledWeight) else value


@dataclass(frozen=True)
class FoldedAffine:
    """An affine of the training form that the deploy form merged away, as it ran before merging.

    ``kind`` is "bn" for a BatchNorm, "affine" for a constant or per-channel scale; ``scales``/``shifts``
    say whether it multiplied and added per element; ``params`` is how many values it stored (a BatchNorm
    2C, a Python constant 0).
    """

    name: str
    kind: str
    scales: bool
    shifts: bool
    params: int


class IntConv2d(nn.Module):
    """Convolution with integer weight codes and no bias (the bias lives in the next ChannelAffine)."""

    def __init__(
        self,
        codes: Tensor,
        *,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        weight_bits: int,
        weight_signed: bool = True,
        block: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", _as_float(codes))
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.weight_bits, self.weight_signed, self.block = int(weight_bits), bool(weight_signed), block
        self.out_channels, self.in_channels = codes.shape[0], codes.shape[1] * groups
        self.kernel_size = tuple(codes.shape[2:])

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), None, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, weight_bits={self.weight_bits}"
        )


class IntLinear(nn.Module):
    """Fully-connected layer with integer weight codes and no bias."""

    def __init__(
        self,
        codes: Tensor,
        *,
        weight_bits: int,
        weight_signed: bool = True,
        block: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", _as_float(codes))
        self.weight_bits, self.weight_signed, self.block = int(weight_bits), bool(weight_signed), block
        self.out_features, self.in_features = codes.shape

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, weight_bits={self.weight_bits}"


class ChannelAffine(nn.Module):
    """Per-channel affine ``y = scale[c] * x + bias[c]`` over dimension ``axis`` (a scalar when C == 1).

    ``axis`` is 1 for the channels of a conv or BatchNorm output (NCHW) and -1 for the features of a Linear's
    output, which are last at any rank (a ConvNeXt block's channels-last Linear, a transformer's MLP).
    ``origin`` lists the training-form affines (BatchNorms, constant scales) merged into this one;
    ``quant_step`` says whether a quantizer's step (de- or re-scaling of integer codes) is merged in too.
    """

    def __init__(self, scale: Tensor, bias: Tensor | None = None, origin: tuple[FoldedAffine, ...] = (),
                 quant_step: bool = False, axis: int = 1) -> None:
        super().__init__()
        if axis not in (1, -1):
            raise ValueError(f"ChannelAffine axis must be 1 or -1, got {axis}")
        self.origin, self.quant_step, self.axis = tuple(origin), bool(quant_step), axis
        self.register_buffer("scale", _as_float(scale).reshape(-1))
        if bias is not None:
            bias = _as_float(bias).reshape(-1)
        self.register_buffer("bias", bias)

    @property
    def num_channels(self) -> int:
        return max(self.scale.numel(), 0 if self.bias is None else self.bias.numel())

    @property
    def per_channel(self) -> bool:
        """True when some value differs per channel (then ``axis`` matters); a scalar affine fits any axis."""
        return self.num_channels > 1

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        if t.numel() == 1:
            return t.reshape(())
        if self.axis == -1:
            return t  # a [C] vector broadcasts over the last dimension
        return t.reshape((1, -1) + (1,) * (x.dim() - 2))

    def forward(self, x: Tensor) -> Tensor:
        y = x * self._view(self.scale, x).to(x.dtype)
        if self.bias is not None:
            y = y + self._view(self.bias, x).to(x.dtype)
        return y

    def extra_repr(self) -> str:
        axis = "" if self.axis == 1 else f", axis={self.axis}"
        return f"channels={self.num_channels}, bias={self.bias is not None}{axis}"


class RoundClamp(nn.Module):
    """Activation quantizer of the integer form: ``clamp(round(x), qmin, qmax)`` (ReLU absorbed when qmin=0)."""

    def __init__(self, qmin: int, qmax: int) -> None:
        super().__init__()
        self.qmin, self.qmax = int(qmin), int(qmax)

    @property
    def bits(self) -> int:
        return range_bits(self.qmin, self.qmax)

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def forward(self, x: Tensor) -> Tensor:
        return round_clamp(x, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"qmin={self.qmin}, qmax={self.qmax}"
