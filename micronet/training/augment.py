"""Augmentation on uint8 image batches (``B×3×H×W``, CPU or CUDA), deterministic given a torch.Generator.

Pipeline (spec training.md §4): optional *policy* → pad-and-crop → horizontal flip → Cutout.
Every random draw comes from the generator passed in (drawn on the CPU, then moved), so a batch is a
pure function of its images and that generator, on any device.

Policies
--------
A policy is a list of *sub-policies*; a sub-policy is a list of ``(op, probability, level)``. For each
image, ``ops_per_image`` sub-policies are drawn uniformly and applied in sequence; inside a
sub-policy each op is applied with its probability. The 2019 winner's sub-policies hold one op each,
so ``ops_per_image = 1`` is what its code did (spec §1.2) and ``2`` what its documentation meant.

Policy files are JSON, either a bare list (Fast AutoAugment's archive, decoded)::

    [[["ShearX", 0.1, 0.5], ["Invert", 0.2, 0.3]], [["Cutout", 0.9, 0.4], ["Rotate", 0.6, 0.8]], ...]

or an object that also states the level convention and the fill colour of geometric ops::

    {"levels": "tf-autoaugment", "fill": "mean", "policy": [[["Rotate", 0.5, 1]], ...]}

Optional keys of the object form: ``weights`` (one non-negative number per sub-policy: sub-policies are
then drawn in proportion to them instead of uniformly, as AWS AutoAugment's learned distribution is
applied), ``searched_on`` (the dataset the policy was searched on: the MicroNet rules forbid using a
policy searched on another dataset for a track, see :func:`check_track`), ``name``, ``description``,
``source``, ``license`` (provenance kept with the file) and ``metadata`` (free-form: how a search made it).

``levels`` is ``fast-autoaugment`` (default; level ∈ [0, 1] mapped linearly onto each op's range,
spec §4.2) or ``tf-autoaugment`` (integer level 0..10, TF-AutoAugment formulas, spec §4.1). ``fill``
is ``black`` (default, Fast AA's plain PIL images) or ``mean`` (TF-AutoAugment: exposed areas become
the dataset mean colour, i.e. zero after normalization) or an ``[r, g, b]`` list. Ops: ``ShearX``,
``ShearY``, ``TranslateX``, ``TranslateY``, ``Rotate``, ``AutoContrast``, ``Invert``, ``Equalize``,
``Solarize``, ``Posterize``, ``Contrast``, ``Color``, ``Brightness``, ``Sharpness``, ``Cutout``,
``Identity``. Shear, translate and rotate get a random sign (p = 0.5); policy Cutout always fills
with the mean colour (both originals do). Shipped policies live in ``micronet/training/policies/``
and load by name (``micronet2019``).

Geometric ops follow PIL's conventions as used by both originals: shear about the top-left corner with
coefficient ``s`` (a shear angle of ``atan(s)``), translate ``+v`` moves content by ``-v`` pixels;
nearest-neighbour sampling (a few pixels on shear edges round differently from PIL). Every op runs on the
whole batch with per-image magnitudes, on the batch's device, without host synchronisation: geometric ops as
one ``grid_sample`` warp with per-image matrices (torchvision's grid arithmetic, so results equal
``TF.affine``/``TF.rotate``), colour ops as batched tensor maths (Equalize from batched histograms).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as v2
from torch import Tensor

from micronet.data import host_to_device
from micronet.errors import MicronetError
from micronet.io import load_json_file

POLICY_DIR = Path(__file__).parent / "policies"
MEAN_COLOUR = (125, 123, 114)  # CIFAR mean ×255, rounded: the colour that normalises to ~0 (both originals)
Fill = tuple[int, int, int]

# ----------------------------------------------------------------------------------------------- ops
# An op maps (uint8 batch, magnitude, fill colour, generator) -> uint8 batch. Magnitudes arrive resolved
# (pixels, degrees, factors, bits, thresholds) and signed; ops with no magnitude ignore it. A magnitude is
# a float (the whole batch) or a length-B tensor (one per image). Every op is batched and built from device
# tensors only: no ``.item()``, no branching on tensor values, no per-call host tensors, so on CUDA a batch
# is augmented without a single host synchronisation.
Magnitude = float | Tensor
OpFn = Callable[[Tensor, Magnitude, Fill, torch.Generator], Tensor]
OPS: dict[str, OpFn] = {}
# The batched kernels behind OPS, which PolicyAugment calls with per-image magnitudes:
# geometric ops as (m [B] float64, height, width) -> inverse affine matrices [B, 2, 3] (one warp for all of them),
# the others as (uint8 batch, m [B] float64) -> uint8 batch.
MATRICES: dict[str, Callable[[Tensor, int, int], Tensor]] = {}
KERNELS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}
# The magnitude at which an op changes nothing (images that skip an op get it, so no kernel sees garbage).
NEUTRAL = {"ShearX": 0.0, "ShearY": 0.0, "TranslateX": 0.0, "TranslateY": 0.0, "Rotate": 0.0, "Solarize": 256.0,
           "Posterize": 8.0, "Contrast": 1.0, "Color": 1.0, "Brightness": 1.0, "Sharpness": 1.0, "Cutout": 0.0}


def _register(name: str) -> Callable[[OpFn], OpFn]:
    def deco(fn: OpFn) -> OpFn:
        OPS[name] = fn
        return fn

    return deco


def _per_image(m: Magnitude, x: Tensor) -> Tensor:
    """``m`` as a float64 length-B tensor on x's device (a float is filled there: no host copy)."""
    if isinstance(m, Tensor):
        return m.to(device=x.device, dtype=torch.float64).expand(x.shape[0])
    return torch.full((x.shape[0],), float(m), dtype=torch.float64, device=x.device)


def _geometric(name: str, matrix: Callable[[Tensor, int, int], Tensor]) -> None:
    MATRICES[name] = matrix

    def op(x: Tensor, m: Magnitude, fill: Fill, g: torch.Generator) -> Tensor:
        return warp(x, matrix(_per_image(m, x), x.shape[-2], x.shape[-1]), fill)

    op.__doc__ = matrix.__doc__
    _register(name)(op)


def _kernel(name: str) -> Callable[[Callable[[Tensor, Tensor], Tensor]], Callable[[Tensor, Tensor], Tensor]]:
    def deco(kernel: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        KERNELS[name] = kernel

        def op(x: Tensor, m: Magnitude, fill: Fill, g: torch.Generator) -> Tensor:
            return kernel(x, _per_image(m, x))

        op.__doc__ = kernel.__doc__
        _register(name)(op)
        return kernel

    return deco


# --- geometric ops: one inverse affine matrix per image, sampled in a single nearest-neighbour warp
def inverse_affine(angle: Tensor, shear_x: Tensor, shear_y: Tensor, tx: Tensor, ty: Tensor, cx: float | Tensor,
                   cy: float | Tensor) -> Tensor:
    """Per-image output→input matrices ``[B, 2, 3]`` (float64), torchvision's ``_get_inverse_affine_matrix``.

    Angles in radians, shear as angles (radians), translation in pixels, centre relative to the image centre;
    the same formula torchvision evaluates in Python floats, here batched on the device.
    """
    cos_sy = torch.cos(shear_y)
    tan_sx = torch.tan(shear_x)
    a = torch.cos(angle - shear_y) / cos_sy
    b = -(a * tan_sx + torch.sin(angle))
    c = torch.sin(angle - shear_y) / cos_sy
    d = torch.cos(angle) - c * tan_sx
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    return torch.stack([m0, m1, m2, m3, m4, m5], 1).view(-1, 2, 3)


def _shear_x(m: Tensor, h: int, w: int) -> Tensor:
    """PIL ``(1, m, 0, 0, 1, 0)`` affine: rows slide horizontally in proportion to their height."""
    zero = torch.zeros_like(m)
    return inverse_affine(zero, torch.atan(m), zero, zero, zero, -w * 0.5, -h * 0.5)


def _shear_y(m: Tensor, h: int, w: int) -> Tensor:
    """PIL ``(1, 0, 0, m, 1, 0)`` affine."""
    zero = torch.zeros_like(m)
    return inverse_affine(zero, zero, torch.atan(m), zero, zero, -w * 0.5, -h * 0.5)


def _translate_x(m: Tensor, h: int, w: int) -> Tensor:
    """PIL ``(1, 0, m, 0, 1, 0)``: content moves ``m`` pixels to the left."""
    zero = torch.zeros_like(m)
    return inverse_affine(zero, zero, zero, -m, zero, 0.0, 0.0)


def _translate_y(m: Tensor, h: int, w: int) -> Tensor:
    """PIL ``(1, 0, 0, 0, 1, m)``: content moves ``m`` pixels up."""
    zero = torch.zeros_like(m)
    return inverse_affine(zero, zero, zero, zero, -m, 0.0, 0.0)


def _rotate(m: Tensor, h: int, w: int) -> Tensor:
    """Rotate by ``m`` degrees counter-clockwise about the centre (PIL ``rotate``)."""
    zero = torch.zeros_like(m)
    return inverse_affine(torch.deg2rad(-m), zero, zero, zero, zero, 0.0, 0.0)


for _name, _matrix in (("ShearX", _shear_x), ("ShearY", _shear_y), ("TranslateX", _translate_x),
                       ("TranslateY", _translate_y), ("Rotate", _rotate)):
    _geometric(_name, _matrix)


@functools.lru_cache(maxsize=16)
def _base_grid(h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel-centre coordinates about the image centre, x ``[1, 1, W]`` and y ``[1, H, 1]`` (float32, exact
    half-integers), and the ``[w/2, h/2]`` divisor ``[1, 2, 1]``, per device."""
    xs = (torch.arange(w, device=device, dtype=torch.float32) - (w - 1) * 0.5).view(1, 1, w)
    ys = (torch.arange(h, device=device, dtype=torch.float32) - (h - 1) * 0.5).view(1, h, 1)
    half = torch.full((1, 2, 1), 0.5 * w, device=device)
    half[:, 1].fill_(0.5 * h)
    return xs, ys, half


def warp(x: Tensor, matrices: Tensor, fill: Fill) -> Tensor:
    """Resample each image through its own inverse affine matrix (``[B, 2, 3]``), nearest neighbour.

    The grid is torchvision's (float32, pixel centres, normalised after the matrix) with the same values, so
    results equal ``TF.affine``/``TF.rotate`` pixel for pixel; pixels from outside the image become ``fill``.
    The grid is computed elementwise, one IEEE multiply or add per kernel, not as torchvision's matrix product:
    on CUDA a matmul runs in TF32 when training enables it (a 10-bit mantissa moves sampling points), and a fused
    kernel may round differently; separate float32 multiplies and adds give the same grid on every device.
    """
    b, c, h, w = x.shape
    xs, ys, half = _base_grid(h, w, x.device)
    theta = (matrices.to(torch.float32) / half).view(b, 2, 3, 1, 1)
    gx = (xs * theta[:, 0, 0]) + (ys * theta[:, 0, 1]) + theta[:, 0, 2]
    gy = (xs * theta[:, 1, 0]) + (ys * theta[:, 1, 1]) + theta[:, 1, 2]
    grid = torch.stack([gx, gy], -1)
    # A ones channel sampled with the image marks the pixels that came from inside it.
    img = torch.cat([x.to(torch.float32), torch.ones_like(x[:, :1], dtype=torch.float32)], 1)
    out = F.grid_sample(img, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    out = torch.where(out[:, c:] < 0.5, _colour(fill, torch.float32, x.device), out[:, :c])
    return out.round_().to(x.dtype)


# --- colour ops: per-image magnitudes broadcast as [B, 1, 1, 1]
def _col(m: Tensor) -> Tensor:
    return m.view(-1, 1, 1, 1)


def _blend(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """``factor·x + (1 − factor)·degenerate``, clamped and truncated to uint8 (torchvision's ``_blend``)."""
    ratio = _col(factor)
    out = (x.to(torch.float32) * ratio.to(torch.float32)).addcmul_(degenerate, (1.0 - ratio).to(torch.float32))
    return out.clamp_(0, 255).to(x.dtype)


def _grey(x: Tensor) -> Tensor:
    """ITU-R 601 luma ``[B, 1, H, W]`` (float, floored), as torchvision's colour ops compute it for uint8."""
    r, g, b = x.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)  # torchvision's rounding


@_kernel("AutoContrast")
def autocontrast(x: Tensor, m: Tensor) -> Tensor:
    """Stretch each channel to the full 0..255 range."""
    xf = x.to(torch.float32)
    low, high = xf.amin((-2, -1), keepdim=True), xf.amax((-2, -1), keepdim=True)
    flat = high == low
    inv_scale = torch.where(flat, 1.0, (high - low) * (1.0 / 255))
    return ((xf - torch.where(flat, 0.0, low)) / inv_scale).clamp_(0, 255).to(x.dtype)


@_kernel("Invert")
def invert(x: Tensor, m: Tensor) -> Tensor:
    """255 − x."""
    return x.bitwise_not()


@_kernel("Equalize")
def equalize(x: Tensor, m: Tensor) -> Tensor:
    """Per-channel histogram equalization with PIL's lookup table, from batched histograms.

    PIL (``ImageOps.equalize``): ``step = (pixels − count of the largest value present) // 255``;
    ``lut[v] = (step // 2 + #pixels below v) // step``; a channel with ``step == 0`` is left unchanged.
    """
    b, c, h, w = x.shape
    flat = x.reshape(b * c, h * w).to(torch.int64)
    hist = torch.zeros(b * c, 256, dtype=torch.int64, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    below = hist.cumsum(1) - hist  # pixels strictly below each value
    top = flat.amax(1, keepdim=True)
    step = (h * w - hist.gather(1, top)) // 255
    lut = ((below + step // 2) // step.clamp(min=1)).clamp_(0, 255)
    out = lut.gather(1, flat)
    return torch.where(step > 0, out, flat).to(x.dtype).view(b, c, h, w)


@_kernel("Solarize")
def solarize(x: Tensor, m: Tensor) -> Tensor:
    """Invert every pixel value ≥ ``m`` (PIL ``ImageOps.solarize``; 256 changes nothing)."""
    return torch.where(x >= _col(m), x.bitwise_not(), x)


@_kernel("Posterize")
def posterize(x: Tensor, m: Tensor) -> Tensor:
    """Keep the ``m`` most significant bits of each pixel."""
    drop = 8 - m.to(torch.int64).clamp(0, 8)
    mask = (255 >> drop) << drop  # the top (8 - drop) bits set
    return x & _col(mask).to(x.dtype)


@_kernel("Contrast")
def contrast(x: Tensor, m: Tensor) -> Tensor:
    """Blend with the mean grey level by factor ``m`` (1 = unchanged)."""
    return _blend(x, _grey(x).mean((-3, -2, -1), keepdim=True), m)


@_kernel("Color")
def color(x: Tensor, m: Tensor) -> Tensor:
    """Blend with the greyscale image by factor ``m`` (PIL ``ImageEnhance.Color``)."""
    return _blend(x, _grey(x), m)


@_kernel("Brightness")
def brightness(x: Tensor, m: Tensor) -> Tensor:
    """Scale pixel values by ``m``."""
    return (x.to(torch.float32) * _col(m).to(torch.float32)).clamp_(0, 255).to(x.dtype)


@functools.lru_cache(maxsize=16)
def _smooth_kernel(channels: int, device: torch.device) -> Tensor:
    """PIL's SMOOTH filter times 13, ``[[1, 1, 1], [1, 5, 1], [1, 1, 1]]``, per channel, built once per device."""
    kernel = torch.ones((3, 3), device=device)
    kernel[1, 1].fill_(5.0)
    return kernel.expand(channels, 1, 3, 3)


@_kernel("Sharpness")
def sharpness(x: Tensor, m: Tensor) -> Tensor:
    """Blend with a smoothed copy by factor ``m`` (PIL ``ImageEnhance.Sharpness``; border pixels unchanged).

    The 3×3 filter sums with integer weights, then divides by 13: every product and partial sum is an integer
    below 2^12, exact in float32 and in TF32 (what cuDNN uses on CUDA when training enables it), so the blur is
    the same on every device. It equals torchvision's ``conv(x, kernel / 13).round()``: a sum ``S`` of integers
    never puts ``S / 13`` within 0.038 of a rounding tie, far beyond float32's error.
    """
    c = x.shape[1]
    out = x.to(torch.float32)
    blurred = F.conv2d(out, _smooth_kernel(c, x.device), groups=c).div_(13.0).round_()
    inner = out[..., 1:-1, 1:-1]
    inner.add_((blurred - inner) * (1.0 - _col(m)).to(torch.float32))
    return out.clamp_(0, 255).to(x.dtype)


@_register("Cutout")
def cutout_op(x: Tensor, m: Magnitude, fill: Fill, g: torch.Generator) -> Tensor:
    """A ``m``×``m`` patch of the mean colour at a uniform random centre, clipped at the border."""
    return cutout(x, m, g, MEAN_COLOUR)


@_register("Identity")
def identity(x: Tensor, m: Magnitude, fill: Fill, g: torch.Generator) -> Tensor:
    """No change."""
    return x


@functools.lru_cache(maxsize=64)
def _colour(fill: Fill, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fill colour as a ``1×3×1×1`` tensor, made once per device (no copy per batch)."""
    return host_to_device(torch.tensor(fill, dtype=dtype).view(1, 3, 1, 1), device)


def cutout(x: Tensor, size: Magnitude, g: torch.Generator, fill: Fill = MEAN_COLOUR) -> Tensor:
    """Fixed-size Cutout: one ``size``×``size`` patch per image, centre uniform over the image, clipped.

    Rows ``[cy - size//2, cy - size//2 + size)`` (and the same for columns) are filled, so the patch is
    exactly ``size`` wide unless it crosses the border. torchvision's RandomErasing samples an area and
    aspect ratio instead, which is a different augmentation. ``size`` may be one per image (a tensor).
    """
    if not isinstance(size, Tensor) and int(size) <= 0:
        return x
    b, _, h, w = x.shape
    cy = host_to_device(torch.randint(h, (b,), generator=g), x.device)
    cx = host_to_device(torch.randint(w, (b,), generator=g), x.device)
    return cutout_at(x, _per_image(size, x), cy, cx, fill)


def cutout_at(x: Tensor, size: Tensor, cy: Tensor, cx: Tensor, fill: Fill = MEAN_COLOUR) -> Tensor:
    """Cutout with given per-image sizes (truncated to whole pixels) and centres (all length-B device tensors)."""
    h, w = x.shape[-2:]
    side = size.to(torch.int64)
    top, left = cy - side // 2, cx - side // 2
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < (top + side)[:, None])
    in_cols = (cols[None] >= left[:, None]) & (cols[None] < (left + side)[:, None])
    patch = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    return torch.where(patch, _colour(fill, x.dtype, x.device), x)


def pad_crop(x: Tensor, padding: int, g: torch.Generator, fill: Fill = (0, 0, 0)) -> Tensor:
    """Pad by ``padding`` with ``fill`` and take a random crop of the original size (offsets 0..2·padding)."""
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    padded = _colour(fill, x.dtype, x.device).expand(b, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding : padding + h, padding : padding + w] = x
    oy = host_to_device(torch.randint(2 * padding + 1, (b,), generator=g), x.device)
    ox = host_to_device(torch.randint(2 * padding + 1, (b,), generator=g), x.device)
    # One flat gather over H·W per image (faster than 4-D advanced indexing on both CPU and GPU).
    rows = oy[:, None] + torch.arange(h, device=x.device)
    cols = ox[:, None] + torch.arange(w, device=x.device)
    flat = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(padded.flatten(2), 2, flat).view(b, c, h, w)


def random_flip(x: Tensor, g: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 0.5."""
    flip = host_to_device(torch.rand(x.shape[0], generator=g) < 0.5, x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ----------------------------------------------------------------------------------------------- levels
# Each convention maps (op, level, image width) to (magnitude, random sign?).
_SIGNED = {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
_ENHANCE = {"Contrast", "Color", "Brightness", "Sharpness"}


def tf_magnitude(op: str, level: float, width: int = 32) -> float:
    """TF-AutoAugment (and the 2019 winner): integer level 0..10 → op magnitude (spec §4.1)."""
    if op == "Rotate":
        return float(int(level * 30 / 10))
    if op in ("TranslateX", "TranslateY"):
        return float(int(level * 10 / 10))
    if op in ("ShearX", "ShearY"):
        return level * 0.3 / 10
    if op in _ENHANCE:
        return level * 1.8 / 10 + 0.1
    if op == "Solarize":
        return float(256 - int(level * 256 / 10))
    if op == "Posterize":
        return float(4 - int(level * 4 / 10))
    if op == "Cutout":
        return float(int(level * 20 / 10))
    return 0.0


_FA_RANGES = {
    "ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3), "TranslateX": (-0.45, 0.45), "TranslateY": (-0.45, 0.45),
    "Rotate": (-30.0, 30.0), "Solarize": (0.0, 256.0), "Posterize": (4.0, 8.0), "Contrast": (0.1, 1.9),
    "Color": (0.1, 1.9), "Brightness": (0.1, 1.9), "Sharpness": (0.1, 1.9), "Cutout": (0.0, 0.2),
}


def fa_magnitude(op: str, level: float, width: int = 32) -> float:
    """Fast AutoAugment: level ∈ [0, 1] → ``low + level·(high − low)`` of the op's range (spec §4.2)."""
    if op not in _FA_RANGES:
        return 0.0
    low, high = _FA_RANGES[op]
    value = low + level * (high - low)
    if op in ("TranslateX", "TranslateY", "Cutout"):
        value *= width  # fractions of the image size
    if op == "Posterize":
        value = float(int(value))
    return value


LEVEL_CONVENTIONS: dict[str, Callable[[str, float, int], float]] = {
    "tf-autoaugment": tf_magnitude,
    "fast-autoaugment": fa_magnitude,
}


# ----------------------------------------------------------------------------------------------- policies
@dataclass(frozen=True)
class PolicyOp:
    """One ``(op, probability, level)`` entry of a sub-policy."""

    name: str
    probability: float
    level: float


@dataclass(frozen=True)
class AugmentPolicy:
    """A list of sub-policies plus the level convention and geometric fill they were written for."""

    name: str
    subpolicies: tuple[tuple[PolicyOp, ...], ...]
    levels: str = "fast-autoaugment"
    fill: Fill = (0, 0, 0)
    weights: tuple[float, ...] | None = None  # None: sub-policies drawn uniformly
    searched_on: str | None = None  # dataset the policy was searched on (None: not stated)
    metadata: dict = field(default_factory=dict, compare=False)  # provenance, search settings and rewards


def _parse_fill(value, where: str) -> Fill:
    if value == "mean":
        return MEAN_COLOUR
    if value == "black":
        return (0, 0, 0)
    if isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in value):
        return tuple(value)  # type: ignore[return-value]
    raise MicronetError(f"{where}: fill must be 'mean', 'black' or [r, g, b] in 0..255, not {value!r}")


def parse_policy(obj, name: str = "policy") -> AugmentPolicy:
    """Validate a decoded policy JSON (bare list or object, see the module docstring) into a AugmentPolicy."""
    levels, fill = "fast-autoaugment", (0, 0, 0)
    weights, searched_on, metadata = None, None, {}
    if isinstance(obj, dict):
        unknown = set(obj) - _POLICY_KEYS
        if unknown:
            raise MicronetError(f"{name}: unknown keys {sorted(unknown)}; expected {', '.join(sorted(_POLICY_KEYS))}")
        levels = obj.get("levels", levels)
        fill = _parse_fill(obj.get("fill", "black"), name)
        weights, searched_on = obj.get("weights"), obj.get("searched_on")
        if searched_on is not None and not isinstance(searched_on, str):
            raise MicronetError(f"{name}: searched_on must be a dataset name, not {searched_on!r}")
        metadata = {k: v for k, v in obj.items() if k not in ("policy", "levels", "fill", "weights")}
        obj = obj.get("policy")
    if not isinstance(levels, str) or levels not in LEVEL_CONVENTIONS:
        raise MicronetError(f"{name}: levels must be one of {', '.join(LEVEL_CONVENTIONS)}, not {levels!r}")
    if not isinstance(obj, list) or not obj:
        raise MicronetError(f"{name}: expected a non-empty list of sub-policies")
    top = 10.0 if levels == "tf-autoaugment" else 1.0
    subs = []
    for i, sub in enumerate(obj):
        if not isinstance(sub, list) or not sub:
            raise MicronetError(f"{name}: sub-policy {i} must be a non-empty list of [op, probability, level]")
        ops = []
        for entry in sub:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
                raise MicronetError(f"{name}: sub-policy {i}: entry {entry!r} is not [op, probability, level]")
            op, p, level = entry
            if op not in OPS:
                raise MicronetError(f"{name}: sub-policy {i}: unknown op {op!r}; known: {', '.join(OPS)}")
            if not (isinstance(p, int | float) and 0 <= p <= 1):
                raise MicronetError(f"{name}: sub-policy {i}: probability {p!r} of {op} is not in [0, 1]")
            if not (isinstance(level, int | float) and 0 <= level <= top):
                raise MicronetError(f"{name}: sub-policy {i}: level {level!r} of {op} is not in [0, {top:g}]")
            ops.append(PolicyOp(op, float(p), float(level)))
        subs.append(tuple(ops))
    return AugmentPolicy(name, tuple(subs), levels, fill, _parse_weights(weights, len(subs), name), searched_on,
                         metadata)


_POLICY_KEYS = {"levels", "fill", "policy", "weights", "searched_on", "name", "description", "source", "license",
                "metadata"}


def _parse_weights(weights, count: int, name: str) -> tuple[float, ...] | None:
    if weights is None:
        return None
    if not (isinstance(weights, list) and len(weights) == count):
        raise MicronetError(f"{name}: weights must be a list of {count} numbers, one per sub-policy")
    if not all(isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
               for w in weights) or sum(weights) <= 0:
        raise MicronetError(f"{name}: weights must be finite, non-negative and not all zero")
    return tuple(float(w) for w in weights)


class PolicyTrackWarning(UserWarning):
    """A policy searched on another dataset is used for a MicroNet Challenge track."""


# Where the torchvision policies were searched (AutoAugment's CIFAR policy: on CIFAR-10).
_TORCHVISION_SEARCHED_ON = {"autoaugment-cifar10": "cifar10"}
CHALLENGE_TRACK_DATASETS = ("cifar100",)  # datasets that are MicroNet Challenge tracks (ImageNet is not read here)


def check_track(policy: str | AugmentPolicy | None, dataset: str, strict: bool = False) -> None:
    """Warn (or, ``strict``, raise) when ``policy`` was searched on another dataset than the ``dataset`` track.

    The MicroNet Challenge rules let a CIFAR-100 entry use only augmentation policies searched on CIFAR-100
    (AutoAugment's CIFAR policy was searched on CIFAR-10, so the 2019 entries searched their own). Policies
    that do not state ``searched_on`` are not judged.
    """
    if policy is None or dataset not in CHALLENGE_TRACK_DATASETS:
        return
    if isinstance(policy, str):
        searched_on = _TORCHVISION_SEARCHED_ON.get(policy)
        label = policy
        if policy not in TORCHVISION_POLICIES:
            loaded = load_policy(policy)
            searched_on, label = loaded.searched_on, loaded.name
    else:
        searched_on, label = policy.searched_on, policy.name
    if searched_on is None or searched_on == dataset:
        return
    message = (f"augmentation policy {label!r} was searched on {searched_on}, but the {dataset} track of the "
               f"MicroNet Challenge allows only policies searched on {dataset} itself (search one with "
               f"`micronet augment search`)")
    if strict:
        raise MicronetError(message + "; --strict-track makes this an error")
    warnings.warn(message, PolicyTrackWarning, stacklevel=2)


def available_policies() -> list[str]:
    """Names of the policies shipped with micronet."""
    return sorted(p.stem for p in POLICY_DIR.glob("*.json"))


def load_policy(name_or_path: str | Path) -> AugmentPolicy:
    """Load a policy JSON by shipped name (``micronet2019``) or by file path."""
    if "\0" in str(name_or_path):
        raise MicronetError(f"policy {str(name_or_path)[:60]!r} is not a valid name or path")
    path = Path(name_or_path)
    if not path.is_file():
        shipped = POLICY_DIR / f"{name_or_path}.json"
        if not shipped.is_file():
            raise MicronetError(
                f"policy {str(name_or_path)[:200]!r} is neither a file nor a shipped policy "
                f"({', '.join(available_policies())})"
            )
        path = shipped
    obj = load_json_file(path, "policy")  # size and nesting bounded, duplicate keys refused
    try:
        return parse_policy(obj, path.stem)
    except MicronetError as exc:
        raise MicronetError(f"policy {path}: {exc}") from None


class PolicyAugment:
    """Apply an AugmentPolicy to a uint8 batch: ``ops_per_image`` sub-policies drawn per image, in sequence.

    Fully batched and free of host synchronisation: the policy becomes small per-device tables (op, probability,
    magnitude, signed) indexed by each image's drawn sub-policy; at every op position the geometric ops of all
    images share one warp with per-image matrices, and each other op of the policy runs once on the whole batch
    with per-image magnitudes, kept only where an image drew it. All draws for a batch are one ``torch.rand``
    from the generator (copied to the device once), so a batch is a pure function of images and generator.
    """

    def __init__(self, policy: AugmentPolicy, ops_per_image: int = 1, fill: Fill | None = None,
                 cuda_graph: bool = False) -> None:
        if ops_per_image < 1:
            raise MicronetError(f"ops_per_image must be at least 1, got {ops_per_image}")
        self.policy, self.ops_per_image, self.cuda_graph = policy, ops_per_image, cuda_graph
        self.fill = policy.fill if fill is None else fill
        self._magnitude = LEVEL_CONVENTIONS[policy.levels]
        self._tables: dict[tuple[torch.device, int], tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._geometry: dict[tuple[torch.device, int], Tensor] = {}
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor]] = {}
        self.graph_error: str | None = None  # why the CUDA-graph path fell back to eager (None: it did not)
        names = sorted({op.name for sub in policy.subpolicies for op in sub})
        self._op_names = ["Identity", *names]  # index 0: the padding of short sub-policies
        self._longest = max(len(s) for s in policy.subpolicies)
        self._active = functools.lru_cache(maxsize=8)(self._active_ops)
        self._cdf: dict[torch.device, Tensor] = {}

    def _policy_tables(self, device: torch.device, width: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``[S, J]`` op index, probability, unsigned magnitude and signed flag, built once per device and width."""
        key = (device, width)
        if key not in self._tables:
            subs, longest = self.policy.subpolicies, self._longest
            op = torch.zeros(len(subs), longest, dtype=torch.int64)
            prob = torch.zeros(len(subs), longest, dtype=torch.float64)
            mag = torch.zeros(len(subs), longest, dtype=torch.float64)
            signed = torch.zeros(len(subs), longest, dtype=torch.bool)
            for s, sub in enumerate(subs):
                for j, entry in enumerate(sub):
                    op[s, j] = self._op_names.index(entry.name)
                    prob[s, j] = entry.probability
                    mag[s, j] = self._magnitude(entry.name, entry.level, width)
                    signed[s, j] = entry.name in _SIGNED
            self._tables[key] = tuple(host_to_device(t, device) for t in (op, prob, mag, signed))  # type: ignore
        return self._tables[key]

    def _choose(self, u: Tensor) -> Tensor:
        """Sub-policy index for each uniform draw ``u``: uniform, or by weight (inverse CDF) for a weighted policy."""
        subs = len(self.policy.subpolicies)
        if self.policy.weights is None:
            return (u * subs).to(torch.int64).clamp_(max=subs - 1)
        if u.device not in self._cdf:
            w = torch.tensor(self.policy.weights, dtype=torch.float64)
            self._cdf[u.device] = host_to_device(torch.cumsum(w, 0) / w.sum(), u.device)
        return torch.searchsorted(self._cdf[u.device], u.contiguous(), right=True).clamp_(max=subs - 1)

    def _active_ops(self, width: int) -> list[int]:
        """Indices of the ops that can change an image (Color/Brightness at factor 1.0 never do: skipped)."""
        active = []
        for k, name in enumerate(self._op_names):
            levels = [op.level for sub in self.policy.subpolicies for op in sub if op.name == name and op.probability]
            neutral = NEUTRAL.get(name)
            if name == "Identity" or not levels:
                continue
            if neutral is not None and all(self._magnitude(name, lv, width) == neutral for lv in levels):
                continue
            active.append(k)
        return active

    def __call__(self, x: Tensor, g: torch.Generator) -> Tensor:
        b = x.shape[0]
        # Per image and draw: [choice, then (coin, sign, centre row, centre column) per op position].
        u = torch.rand(b, self.ops_per_image, 1 + 4 * self._longest, generator=g, dtype=torch.float64)
        u = host_to_device(u, x.device)
        if self.cuda_graph and x.device.type == "cuda" and self.graph_error is None:
            return self._replay(x, u)
        return self._apply(x, u)

    def _apply(self, x: Tensor, u: Tensor) -> Tensor:
        """The policy on ``x`` given its draws ``u`` (device tensors only: what a CUDA graph captures)."""
        _, _, h, w = x.shape
        depth, longest = self.ops_per_image, self._longest
        op_table, prob_table, mag_table, signed_table = self._policy_tables(x.device, w)
        choice = self._choose(u[..., 0])
        active = self._active(w)
        geometric = [k for k in active if self._op_names[k] in MATRICES]
        others = [k for k in active if self._op_names[k] not in MATRICES]
        for d in range(depth):
            for j in range(longest):
                coin, sign, row, col = u[:, d, 1 + 4 * j : 5 + 4 * j].unbind(1)
                s = choice[:, d]
                applied = coin < prob_table[s, j]
                op = torch.where(applied, op_table[s, j], 0)
                m = torch.where(signed_table[s, j] & (sign < 0.5), -mag_table[s, j], mag_table[s, j])
                if geometric:
                    x = self._warp_step(x, op, m, geometric)
                for k in others:
                    name = self._op_names[k]
                    chosen = op == k
                    m_k = torch.where(chosen, m, NEUTRAL.get(name, 0.0))
                    if name == "Cutout":
                        cy = (row * h).to(torch.int64).clamp_(max=h - 1)
                        cx = (col * w).to(torch.int64).clamp_(max=w - 1)
                        x = _where_chosen(x, chosen, functools.partial(cutout_at, fill=MEAN_COLOUR), m_k, cy, cx)
                    else:
                        x = _where_chosen(x, chosen, KERNELS[name], m_k)
        return x

    def _warp_step(self, x: Tensor, op: Tensor, m: Tensor, geometric: list[int]) -> Tensor:
        """One warp for every image that drew a geometric op at this position (identity matrix for the rest).

        Each geometric op sets one argument of ``inverse_affine`` (the others stay 0), so the slot each op index
        fills is a table: the matrices of the whole batch come from one gather, one scatter and one
        ``inverse_affine`` (what ``MATRICES`` computes op by op, with the same arithmetic), not one chain per op.
        """
        h, w = x.shape[-2:]
        slot = self._geometry_table(x.device, w, geometric)[op]  # 0 angle, 1 shear x, 2 shear y, 3 tx, 4 ty, 5 none
        shear = (slot == _SHEAR_X) | (slot == _SHEAR_Y)
        value = torch.where(shear, torch.atan(m), torch.where(slot == _ANGLE, torch.deg2rad(-m), -m))
        args = torch.zeros(m.shape[0], _NO_WARP + 1, dtype=m.dtype, device=m.device)
        args.scatter_(1, slot[:, None], value[:, None])
        corner = torch.where(shear, -0.5, 0.0).to(m.dtype)  # shears act about the top-left corner (PIL)
        matrices = inverse_affine(*args[:, :_NO_WARP].unbind(1), corner * w, corner * h)
        return _where_chosen(x, slot != _NO_WARP, functools.partial(warp, fill=self.fill), matrices)

    def _geometry_table(self, device: torch.device, width: int, geometric: list[int]) -> Tensor:
        """``[K]`` the ``inverse_affine`` argument each op index sets (``_NO_WARP`` for colour and inactive ops)."""
        key = (device, width)
        if key not in self._geometry:
            table = torch.full((len(self._op_names),), _NO_WARP, dtype=torch.int64)
            for k in geometric:
                table[k] = _GEOMETRY_SLOT[self._op_names[k]]
            self._geometry[key] = host_to_device(table, device)
        return self._geometry[key]

    def _replay(self, x: Tensor, u: Tensor) -> Tensor:
        """``_apply`` through a CUDA graph captured once per batch shape: one launch instead of ~1000 small ones.

        The graph replays the very kernels ``_apply`` runs, so its batches are bit-identical to the eager path's
        (section e of ``make gpu-check`` compares them). A capture that fails is reported in ``graph_error`` and
        this instance goes on eagerly.
        """
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(x, u)
            except RuntimeError as exc:
                self.graph_error = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
                warnings.warn(f"augmentation CUDA graph capture failed, running eagerly: {self.graph_error}",
                              stacklevel=3)
                return self._apply(x, u)
        graph, static_x, static_u, static_out = self._graphs[key]
        static_x.copy_(x)
        static_u.copy_(u)
        graph.replay()
        return static_out.clone()  # the next replay overwrites static_out

    def _capture(self, x: Tensor, u: Tensor) -> tuple[torch.cuda.CUDAGraph, Tensor, Tensor, Tensor]:
        static_x, static_u = x.clone(), u.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up: every cached constant and library handle exists before capture
            for _ in range(2):
                self._apply(static_x, static_u)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._apply(static_x, static_u)
        return graph, static_x, static_u, static_out


# The inverse_affine argument each geometric op sets (see PolicyAugment._warp_step).
_ANGLE, _SHEAR_X, _SHEAR_Y, _TX, _TY, _NO_WARP = range(6)
_GEOMETRY_SLOT = {"Rotate": _ANGLE, "ShearX": _SHEAR_X, "ShearY": _SHEAR_Y, "TranslateX": _TX, "TranslateY": _TY}

SUBSET_ON_CPU = True  # False runs the CUDA strategy on the CPU too (tests prove both give the same batches)


def _where_chosen(x: Tensor, chosen: Tensor, fn: Callable[..., Tensor], *per_image: Tensor) -> Tensor:
    """``fn(x, *per_image)`` for the chosen images, ``x`` for the others; ``fn`` treats images independently.

    On CUDA ``fn`` runs on the whole batch and ``torch.where`` keeps the chosen results: wasted arithmetic is far
    cheaper than reading the choice back to the host. On the CPU there is no device to wait for, so only the
    chosen images are computed (several times faster for a policy of many ops). The results are identical.
    """
    if x.device.type != "cpu" or not SUBSET_ON_CPU:
        return torch.where(chosen.view(-1, 1, 1, 1), fn(x, *per_image), x)
    idx = chosen.nonzero().squeeze(1)
    if idx.numel() == 0:
        return x
    out = x.clone()
    out[idx] = fn(x[idx], *(t[idx] for t in per_image))
    return out


class TorchvisionPolicy:
    """torchvision's AutoAugment / RandAugment / TrivialAugmentWide, per image, seeded from the generator.

    These transforms draw from torch's global RNG and apply one choice to a whole tensor, so each
    image is transformed separately inside a forked RNG seeded from ``g`` (deterministic, thread-unsafe
    only in the sense that the global RNG is briefly reseeded in this thread).

    On CUDA they are slow and synchronise: a Python loop over the batch, torchvision's host-side matrices and
    value reads per image, so training waits for the augmentation (a warning says so). For a sync-free batched
    policy on the device, use a policy file (``PolicyAugment``), e.g. the shipped ones.
    """

    def __init__(self, name: str, fill: Fill = (0, 0, 0)) -> None:
        makers = {
            "autoaugment-cifar10": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=list(fill)),
            "randaugment": lambda: v2.RandAugment(fill=list(fill)),
            "trivialaugment": lambda: v2.TrivialAugmentWide(fill=list(fill)),
        }
        if name not in makers:
            raise MicronetError(f"unknown torchvision policy {name!r}; choose {', '.join(makers)}")
        self.name, self.transform = name, makers[name]()
        self._warned = False

    def __call__(self, x: Tensor, g: torch.Generator) -> Tensor:
        if x.device.type == "cuda" and not self._warned:
            self._warned = True
            warnings.warn(f"augment policy {self.name!r} (torchvision) runs per image and synchronises with the host "
                          "on CUDA; a policy file runs batched on the device without syncs", stacklevel=2)
        seed = int(torch.randint(2**62, (1,), generator=g))
        with torch.random.fork_rng(devices=[]):
            # Seed only the CPU generator torchvision draws from: torch.manual_seed would also reset every CUDA
            # generator (ShakeDrop's) to a per-batch seed, outside this fork.
            torch.default_generator.manual_seed(seed)
            return torch.stack([self.transform(img) for img in x])


TORCHVISION_POLICIES = ("autoaugment-cifar10", "randaugment", "trivialaugment")


# ----------------------------------------------------------------------------------------------- pipeline
@dataclass(frozen=True)
class AugmentConfig:
    """The training-image pipeline: policy → pad-crop → flip → Cutout (all optional)."""

    policy: str | None = None  # shipped name, JSON path, one of TORCHVISION_POLICIES, or None
    ops_per_image: int = 1  # sub-policies per image: 1 = the winner's code, 2 = its documentation
    fill: str | None = None  # geometric-op fill override: "mean" | "black"; None = the policy's own
    crop_padding: int = 4
    pad_fill: str = "black"  # "mean" reproduces the winner (zero padding in normalized space)
    flip: bool = True
    cutout: int = 0  # side of the final Cutout patch in pixels (16 in both 2019 recipes); 0 = off
    cuda_graph: bool = False  # on CUDA, replay a policy file's ops as one captured CUDA graph (same batches)


class Augmentation:
    """A callable ``(uint8 batch, generator) -> uint8 batch`` built from an AugmentConfig."""

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config
        fill = None if config.fill is None else _parse_fill(config.fill, "augment.fill")
        self.policy: Callable[[Tensor, torch.Generator], Tensor] | None = None
        if config.policy in TORCHVISION_POLICIES:
            self.policy = TorchvisionPolicy(config.policy, fill or (0, 0, 0))
        elif config.policy:
            self.policy = PolicyAugment(load_policy(config.policy), config.ops_per_image, fill, config.cuda_graph)
        self.pad_fill = _parse_fill(config.pad_fill, "augment.pad_fill")

    def __call__(self, x: Tensor, g: torch.Generator) -> Tensor:
        if self.policy is not None:
            x = self.policy(x, g)
        x = pad_crop(x, self.config.crop_padding, g, self.pad_fill)
        if self.config.flip:
            x = random_flip(x, g)
        return cutout(x, self.config.cutout, g)


def build_augmentation(config: AugmentConfig | None) -> Augmentation | None:
    """The training augmentation for ``config`` (None: no augmentation at all)."""
    return None if config is None else Augmentation(config)

