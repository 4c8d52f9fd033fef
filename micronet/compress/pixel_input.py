"""The pixel-input deploy form: a network that takes uint8 images and computes its first layer exactly.

A checkpoint's first conv reads normalised images ``(p - m_c) / s_c`` (``m_c``, ``s_c`` in pixel units). With
integer weight codes ``W`` and integer pixels ``p`` the normalised conv splits into exact integer parts::

    conv(norm(p), W)[o] = sum_c a_c * S_c[o]  +  B[o],     a_c = 1 / s_c
    S_c = conv(p_c, W[:, c])                 (zero-padded pixels: integers, exact while |S| < 2^24)
    B   = sum_c (-a_c m_c) * V_c,  V_c = conv(ones_c, W[:, c])   (the same zero padding: integer counts)

``B`` accounts for the mean *and* for the zero padding of the normalised image (a padded position is zero
in normalised space, i.e. the non-integer pixel value ``m_c``): ``V_c`` counts, per output position, the
weights that fall on real pixels. The float steps after the integer convs are elementwise and run in one
fixed order (``a_0 S_0``, ``+ a_1 S_1``, ``+ a_2 S_2``, then ``B`` the same way, then ``+ B``), so PyTorch
and onnxruntime round them identically; the result is an equally valid fp32 evaluation of the normalised
model (spec exact-export-notes.md).

The head's float reductions (global average pool, the classifier on float inputs) sum non-integer values,
whose fp32 result depends on the summation order; :class:`Float64Reduce` runs them in float64 and rounds
once to float32. Products of fp32 values with small integer codes are exact in float64 and a few hundred
of them sum exactly unless their magnitudes span more than ~20 binary orders, so this is exact in
practice (not by construction): measured bit-identical logits in both runtimes.

``pixel_input_form(deploy, normalization)`` rewrites an integer deploy form; scoring and export both use it,
so what is scored is what the ONNX file runs (8-bit model input). A model that cannot be traced whole (a gated
network) declares ``input_module``, the child its forward hands the image to unchanged: that child alone gets
the pixel-input first layer, its global pools and classifier run in float64, and everything else is unchanged.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from micronet.compress.integer_modules import ChannelAffine, IntConv2d, IntLinear, RoundClamp
from micronet.errors import MicronetError
from micronet.models import is_gated

EXACT_LIMIT = 2**24  # fp32 holds every integer up to 2^24
PIXEL_MAX = 255
LAYOUTS = ("nchw", "nhwc")
PIXEL_BITS = 8


class Normalization(Protocol):
    """What the pixel form needs of a normalisation (``micronet.data.Normalization`` has it; compress does
    not import data): per-channel ``(x/255 - mean)/std``, divided once more by ``extra_divisor``."""

    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    extra_divisor: float


@dataclass(frozen=True)
class PixelInput:
    """What a pixel-input model expects: uint8 images in ``layout``, normalised as ``normalization``."""

    layout: str
    normalization: Normalization


class PixelInputConv(nn.Module):
    """First conv on uint8 pixels with the normalisation folded exactly (see the module docstring).

    ``weight`` holds the codes regrouped per input channel, shape ``[C_in * C_out, 1, kh, kw]`` (row
    ``c * C_out + o`` is ``W[o, c]``), so one grouped conv yields every ``S_c``. ``scale`` is ``a_c`` and
    ``shift`` is ``-a_c * m_c`` (float32, one per input channel).
    """

    def __init__(self, conv: IntConv2d, normalization: Normalization, layout: str = "nchw") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise MicronetError(f"unknown input layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        codes = conv.weight.detach()
        c_out, c_in = codes.shape[0], codes.shape[1]
        self.register_buffer("weight", codes.transpose(0, 1).reshape(c_in * c_out, 1, *codes.shape[2:]).clone())
        mean = torch.tensor(normalization.mean, dtype=torch.float64) * 255.0
        std = torch.tensor(normalization.std, dtype=torch.float64) * 255.0 * normalization.extra_divisor
        scale = (1.0 / std).to(torch.float32)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", (-scale.double() * mean).to(torch.float32))
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.weight_bits, self.weight_signed, self.block = conv.weight_bits, conv.weight_signed, conv.block
        self.in_channels, self.out_channels, self.kernel_size = c_in, c_out, tuple(codes.shape[2:])
        self.layout = layout
        self.input = PixelInput(layout, normalization)

    def codes(self) -> Tensor:
        """The codes in the ordinary ``[C_out, C_in, kh, kw]`` layout."""
        return self.weight.reshape(self.in_channels, self.out_channels, *self.kernel_size).transpose(0, 1)

    def _grouped(self, x: Tensor) -> list[Tensor]:
        w = self.weight.to(x.dtype)
        y = F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.in_channels)
        return list(y.split(self.out_channels, dim=1))

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "nhwc":
            x = x.permute(0, 3, 1, 2)
        dtype = self.scale.dtype  # float32, or float64 in a .double() reference
        x = x.to(dtype)
        scale, shift = self.scale.to(dtype), self.shift.to(dtype)
        parts = self._grouped(x)
        # ones in the image's shape, zero-padded like it: integer counts of the weights on real pixels
        counts = self._grouped(x.new_ones((1, *x.shape[1:])))
        y = parts[0] * scale[0]
        border = counts[0] * shift[0]
        for c in range(1, self.in_channels):
            y = y + parts[c] * scale[c]
            border = border + counts[c] * shift[c]
        return y + border

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, layout={self.layout}, normalization={self.input.normalization.name}")


class Float64Reduce(nn.Module):
    """Runs ``op`` (a global average pool or a classifier on float inputs) in float64, rounding once to fp32."""

    def __init__(self, op: nn.Module) -> None:
        super().__init__()
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x.to(torch.float64)).to(x.dtype)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        leaves = (ChannelAffine, RoundClamp, IntConv2d, IntLinear, PixelInputConv, Float64Reduce)
        return isinstance(m, leaves) or super().is_leaf_module(m, qualname)


def pixel_input_of(model: nn.Module) -> PixelInput | None:
    """The pixel input a model expects, or None for a float-input model."""
    for m in model.modules():
        if isinstance(m, PixelInputConv):
            return m.input
    return None


def missing_normalization(source: str) -> MicronetError:
    """The one refusal of pixel input whose normalisation is unknown (``source``: what records none); it names
    the fix."""
    return MicronetError(f"--input pixels needs the model's normalisation, and {source} does not record it; "
                         "pass --normalization NAME (e.g. cifar100)")


def input_module(model: nn.Module) -> str | None:
    """The sub-module an untraceable model declares as where its input enters (``input_module``), or None."""
    name = getattr(model, "input_module", None)
    return name if isinstance(name, str) and name else None


def check_pixel_input(model: nn.Module) -> None:
    """Refuse, before any costly step, a model that has no pixel-input form: a gated network that does not declare
    where its input enters (``input_module``)."""
    if is_gated(model) and input_module(model) is None:
        # The pixel form rewrites the traced graph (first conv, float64 head); a gated forward has no whole graph,
        # and without the declaration the sub-module that reads the image is unknown: say so instead of fx's error.
        raise MicronetError(f"pixel input is not available for gated networks ({type(model).__name__}) that do "
                            "not declare input_module: their forward chooses per image which blocks run, so it "
                            "cannot be traced whole; use --input float")


def first_layer_bound(codes: Tensor) -> int:
    """Largest |S_c| the pixel-input first layer can reach: 255 x the largest per-(output, input) sum of |codes|."""
    per = codes.detach().abs().flatten(2).sum(2)
    return int(per.max().item()) * PIXEL_MAX if per.numel() else 0


def pixel_input_form(deploy: nn.Module, normalization: Normalization, layout: str = "nchw",
                     image_size: tuple[int, int] = (32, 32)) -> nn.Module:
    """The pixel-input form of an integer deploy form (a new module; ``deploy`` is not changed).

    A model that traces whole is rewritten as one graph. One that does not (data-dependent control flow, e.g. a
    gated network) but declares ``input_module`` (the sub-module its forward hands the image to, unchanged) gets
    the same rewrite on that sub-module alone, and its global pools and classifier run in float64 as in a traced
    form; everything between them runs as before.
    """
    if layout not in LAYOUTS:
        raise MicronetError(f"unknown input layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if pixel_input_of(deploy) is not None:
        raise MicronetError("the model already takes pixel input")
    check_pixel_input(deploy)
    entry = input_module(deploy)
    if entry is not None:
        return _entry_pixel_form(deploy, entry, normalization, layout, image_size)
    try:
        gm = fx.GraphModule(deploy, _Tracer().trace(deploy), type(deploy).__name__)
    except Exception as exc:  # fx raises many types; all mean "this Python code does not trace"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise MicronetError(f"pixel input needs a model that traces with torch.fx ({first}), or one that declares "
                            "input_module (the sub-module that reads the image); use --input float") from None
    _pixel_first_layer(gm, normalization, layout)
    _float64_head(gm, image_size)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    spec = getattr(deploy, "micronet_spec", None)
    if spec is not None:
        gm.micronet_spec = spec
    return gm.eval()


def _pixel_first_layer(gm: fx.GraphModule, normalization: Normalization, layout: str, entry: str = "") -> None:
    """Replace the conv that reads ``gm``'s input by its :class:`PixelInputConv` (bound checked first); ``entry``:
    the model's name for ``gm``'s child ``entry`` (an input module's chain), so errors name the model's layer."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    stem = _first_layer(gm, placeholder, entry)
    conv = gm.get_submodule(str(stem.target))
    bound = first_layer_bound(conv.weight)
    if bound >= EXACT_LIMIT:
        raise MicronetError(
            f"first layer '{_shown(stem, entry)}': pixel x weight-code sums may reach {bound:,} >= 2^24, which fp32 "
            "cannot hold exactly; use --input float, or quantize the first layer's weights to fewer bits"
        )
    gm.set_submodule(str(stem.target), PixelInputConv(conv, normalization, layout))
    stem.args = (placeholder, *stem.args[1:])


def _entry_pixel_form(deploy: nn.Module, entry: str, normalization: Normalization, layout: str,
                      image_size: tuple[int, int]) -> nn.Module:
    """The pixel form of an untraceable model through its declared input sub-module ``entry``."""
    model = copy.deepcopy(deploy).eval()
    try:
        part = model.get_submodule(entry)
    except AttributeError:
        raise MicronetError(f"{type(deploy).__name__} declares input_module {entry!r}, which it does not have; "
                            "use --input float") from None
    # In a one-child chain, so a leaf (the usual case: the stem conv) is a call_module node like any first layer.
    chain = nn.Sequential(OrderedDict([("entry", part)]))
    try:
        gm = fx.GraphModule(chain, _Tracer().trace(chain), "PixelEntry")
    except Exception as exc:  # fx raises many types; all mean "this Python code does not trace"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise MicronetError(f"pixel input needs the input module '{entry}' to trace with torch.fx ({first}); "
                            "use --input float") from None
    _pixel_first_layer(gm, normalization, layout, entry=entry)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    rewritten = gm.get_submodule("entry")
    only_call = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    # the entry was the first layer itself: put the pixel conv in its place, not a graph around it
    new = rewritten if len(only_call) == 1 and only_call[0].target == "entry" else gm
    model.set_submodule(entry, new)
    _float64_head_modules(model, image_size)
    return model


def _float64_head_modules(model: nn.Module, image_size: tuple[int, int]) -> None:
    """:func:`_float64_head` for an untraceable model: global pools (seen by forward hooks) and the classifier."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.AdaptiveAvgPool2d | nn.AvgPool2d):
            def hook(_m, _args, out, name=name):
                shapes[name] = tuple(out.shape)
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros((1, *_image_shape(model, image_size)), dtype=torch.uint8))
    finally:
        for h in hooks:
            h.remove()
    for name, m in list(model.named_modules()):
        is_global_pool = name in shapes and shapes[name][2:] == (1, 1) and getattr(m, "padding", 0) in (0, (0, 0))
        if is_global_pool or isinstance(m, IntLinear):
            model.set_submodule(name, Float64Reduce(m))


def _shown(node: fx.Node, entry: str) -> str:
    """The model's name of a layer in an input module's chain (whose child is called ``entry``)."""
    target = str(node.target)
    return entry + target[len("entry"):] if entry and target.split(".")[0] == "entry" else target


def _first_layer(gm: fx.GraphModule, placeholder: fx.Node, entry: str = "") -> fx.Node:
    """The conv that reads the image, past identities; anything else is refused with the fix."""
    node = placeholder
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise MicronetError(f"pixel input needs the image to feed exactly one first layer, it feeds {len(users)} "
                                "ops; use --input float")
        node = users[0]
        m = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(m, nn.Identity):
            continue
        if isinstance(m, IntConv2d) and m.groups == 1 and m.in_channels == 3:
            return node
        if isinstance(m, nn.Conv2d):
            raise MicronetError(f"first layer '{_shown(node, entry)}' has float weights; pixel input needs integer "
                                "weight codes there (quantize the first conv's weights), or use --input float")
        what = type(m).__name__ if m is not None else str(node.target)
        raise MicronetError(f"pixel input needs a 3-channel integer conv as the first layer, found {what}; "
                            "use --input float")


def _float64_head(gm: fx.GraphModule, image_size: tuple[int, int]) -> None:
    """Wrap global average pools and the classifier (float inputs) in :class:`Float64Reduce`."""
    shapes: dict[fx.Node, tuple[int, ...]] = {}

    class _Shapes(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if isinstance(out, Tensor):
                shapes[n] = tuple(out.shape)
            return out

    with torch.no_grad():
        _Shapes(gm).run(torch.zeros((1, *_image_shape(gm, image_size)), dtype=torch.uint8))
    for n in list(gm.graph.nodes):
        if n.op != "call_module":
            continue
        m = gm.get_submodule(str(n.target))
        is_global_pool = isinstance(m, nn.AdaptiveAvgPool2d | nn.AvgPool2d) and n in shapes \
            and shapes[n][2:] == (1, 1) and getattr(m, "padding", 0) in (0, (0, 0))
        if is_global_pool or isinstance(m, IntLinear):
            gm.set_submodule(str(n.target), Float64Reduce(m))


def _image_shape(gm: fx.GraphModule, image_size: tuple[int, int]) -> tuple[int, ...]:
    spec = pixel_input_of(gm)
    channels = 3
    return (*image_size, channels) if spec is not None and spec.layout == "nhwc" else (channels, *image_size)


__all__ = ["LAYOUTS", "PIXEL_BITS", "Float64Reduce", "PixelInput", "PixelInputConv", "check_pixel_input",
           "first_layer_bound", "input_module", "missing_normalization", "pixel_input_form", "pixel_input_of"]
