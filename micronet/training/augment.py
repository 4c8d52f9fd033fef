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
coefficient ``s`` (torchvision takes degrees: ``atan(s)``), translate ``+v`` moves content by ``-v``
pixels; nearest-neighbour sampling (a few pixels on shear edges round differently from PIL).
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from micronet.data import host_to_device
from micronet.errors import MicronetError

POLICY_DIR = Path(__file__).parent / "policies"
MEAN_COLOUR = (125, 123, 114)  # CIFAR mean ×255, rounded: the colour that normalises to ~0 (both originals)
Fill = tuple[int, int, int]

# ----------------------------------------------------------------------------------------------- ops
# An op maps (uint8 batch, magnitude, fill colour, generator) -> uint8 batch. Magnitudes arrive resolved
# (pixels, degrees, factors, bits, thresholds) and signed; ops with no magnitude ignore it.
OpFn = Callable[[Tensor, float, Fill, torch.Generator], Tensor]
OPS: dict[str, OpFn] = {}


def _register(name: str) -> Callable[[OpFn], OpFn]:
    def deco(fn: OpFn) -> OpFn:
        OPS[name] = fn
        return fn

    return deco


def _affine(x: Tensor, fill: Fill, **kw) -> Tensor:
    args = {"angle": 0.0, "translate": [0.0, 0.0], "scale": 1.0, "shear": [0.0, 0.0], **kw}
    return TF.affine(x, fill=list(fill), **args)


@_register("ShearX")
def shear_x(x: Tensor, m: float, fill: Fill, g: torch.Generator) -> Tensor:
    """PIL ``(1, m, 0, 0, 1, 0)`` affine: rows slide horizontally in proportion to their height."""
    return _affine(x, fill, shear=[math.degrees(math.atan(m)), 0.0], center=[0.0, 0.0])


@_register("ShearY")
def shear_y(x: Tensor, m: float, fill: Fill, g: torch.Generator) -> Tensor:
    """PIL ``(1, 0, 0, m, 1, 0)`` affine."""
    return _affine(x, fill, shear=[0.0, math.degrees(math.atan(m))], center=[0.0, 0.0])


@_register("TranslateX")
def translate_x(x: Tensor, m: float, fill: Fill, g: torch.Generator) -> Tensor:
    """PIL ``(1, 0, m, 0, 1, 0)``: content moves ``m`` pixels to the left."""
    return _affine(x, fill, translate=[-m, 0.0])


@_register("TranslateY")
def translate_y(x: Tensor, m: float, fill: Fill, g: torch.Generator) -> Tensor:
    """PIL ``(1, 0, 0, 0, 1, m)``: content moves ``m`` pixels up."""
    return _affine(x, fill, translate=[0.0, -m])


@_register("Rotate")
def rotate(x: Tensor, m: float, fill: Fill, g: torch.Generator) -> Tensor:
    """Rotate by ``m`` degrees counter-clockwise about the centre (PIL ``rotate``)."""
    return TF.rotate(x, m, fill=list(fill))


@_register("AutoContrast")
def autocontrast(x: Tensor, m: float, fill: Fill, g: torch.Generator) -> Tensor:
    """Stretch each channel to the full 0..255 range."""
    return TF.autocontrast(x)


@_register("Invert")
def invert(x: Tensor, m: float, fill: Fill, g: torch.Generator) -> Tensor:
    """255 − x."""
    return TF.invert(x)


@_register("Equalize")
def equalize(x: Tensor, m: float, fill: Fill, g: torch.Generator) -> Tensor:
    """Per-channel histogram equalization."""
    return TF.equalize(x)


@_register("Solarize")
def solarize(x: Tensor, m: float, fill: Fill, g: torch.Generator) -> Tensor:
    """Invert every pixel value ≥ ``m`` (PIL ``ImageOps.solarize``)."""
    if m > 255:  # Fast AA's range reaches 256 (nothing inverted); torchvision rejects thresholds above 255
        return x
    return TF.solarize(x, float(m))


@_register("Posterize")
def posterize(x: Tensor, m: float, fill: Fill, g: torch.Generator) -> Tensor:
    """Keep the ``m`` most significant bits of each pixel."""
    return TF.posterize(x, int(m))


@_register("Contrast")
def contrast(x: Tensor, m: float, fill: Fill, g: torch.Generator) -> Tensor:
    """Blend with the mean grey level by factor ``m`` (1 = unchanged)."""
    return TF.adjust_contrast(x, m)


@_register("Color")
def color(x: Tensor, m: float, fill: Fill, g: torch.Generator) -> Tensor:
    """Blend with the greyscale image by factor ``m`` (PIL ``ImageEnhance.Color``)."""
    return TF.adjust_saturation(x, m)


@_register("Brightness")
def brightness(x: Tensor, m: float, fill: Fill, g: torch.Generator) -> Tensor:
    """Scale pixel values by ``m``."""
    return TF.adjust_brightness(x, m)


@_register("Sharpness")
def sharpness(x: Tensor, m: float, fill: Fill, g: torch.Generator) -> Tensor:
    """Blend with a smoothed copy by factor ``m`` (PIL ``ImageEnhance.Sharpness``)."""
    return TF.adjust_sharpness(x, m)


@_register("Cutout")
def cutout_op(x: Tensor, m: float, fill: Fill, g: torch.Generator) -> Tensor:
    """A ``m``×``m`` patch of the mean colour at a uniform random centre, clipped at the border."""
    return cutout(x, int(m), g, MEAN_COLOUR)


@_register("Identity")
def identity(x: Tensor, m: float, fill: Fill, g: torch.Generator) -> Tensor:
    """No change."""
    return x


@functools.lru_cache(maxsize=64)
def _colour(fill: Fill, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fill colour as a ``1×3×1×1`` tensor, made once per device (no copy per batch)."""
    return torch.tensor(fill, dtype=dtype).view(1, 3, 1, 1).to(device)


def cutout(x: Tensor, size: int, g: torch.Generator, fill: Fill = MEAN_COLOUR) -> Tensor:
    """Fixed-size Cutout: one ``size``×``size`` patch per image, centre uniform over the image, clipped.

    Rows ``[cy - size//2, cy - size//2 + size)`` (and the same for columns) are filled, so the patch is
    exactly ``size`` wide unless it crosses the border. torchvision's RandomErasing samples an area and
    aspect ratio instead, which is a different augmentation.
    """
    if size <= 0:
        return x
    b, _, h, w = x.shape
    cy = host_to_device(torch.randint(h, (b,), generator=g), x.device)
    cx = host_to_device(torch.randint(w, (b,), generator=g), x.device)
    top, left = cy - size // 2, cx - size // 2
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + size)
    in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + size)
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
class Policy:
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


def parse_policy(obj, name: str = "policy") -> Policy:
    """Validate a decoded policy JSON (bare list or object, see the module docstring) into a Policy."""
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
    if levels not in LEVEL_CONVENTIONS:
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
    return Policy(name, tuple(subs), levels, fill, _parse_weights(weights, len(subs), name), searched_on, metadata)


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


def check_track(policy: str | Policy | None, dataset: str, strict: bool = False) -> None:
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


def load_policy(name_or_path: str | Path) -> Policy:
    """Load a policy JSON by shipped name (``micronet2019``) or by file path."""
    path = Path(name_or_path)
    if not path.is_file():
        shipped = POLICY_DIR / f"{name_or_path}.json"
        if not shipped.is_file():
            raise MicronetError(
                f"policy {str(name_or_path)!r} is neither a file nor a shipped policy "
                f"({', '.join(available_policies())})"
            )
        path = shipped
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MicronetError(f"cannot read policy {path}: {exc}") from None
    return parse_policy(obj, path.stem)


class PolicyAugment:
    """Apply a Policy to a uint8 batch: ``ops_per_image`` sub-policies drawn per image, in sequence.

    Images that drew the same op at the same signed magnitude are transformed together, so the
    winner's 15-op policy costs at most ~30 batched calls per draw, on CPU or GPU.
    """

    def __init__(self, policy: Policy, ops_per_image: int = 1, fill: Fill | None = None) -> None:
        if ops_per_image < 1:
            raise MicronetError(f"ops_per_image must be at least 1, got {ops_per_image}")
        self.policy, self.ops_per_image = policy, ops_per_image
        self.fill = policy.fill if fill is None else fill
        self._magnitude = LEVEL_CONVENTIONS[policy.levels]

    def __call__(self, x: Tensor, g: torch.Generator) -> Tensor:
        b, width = x.shape[0], x.shape[-1]
        subs = self.policy.subpolicies
        longest = max(len(s) for s in subs)
        if self.policy.weights is None:
            choice = torch.randint(len(subs), (b, self.ops_per_image), generator=g).tolist()
        else:  # a learned distribution over sub-policies (AWS AutoAugment): draw by weight
            w = torch.tensor(self.policy.weights, dtype=torch.float64)
            choice = torch.multinomial(w, b * self.ops_per_image, replacement=True, generator=g)
            choice = choice.view(b, self.ops_per_image).tolist()
        coin = torch.rand(b, self.ops_per_image, longest, generator=g).tolist()
        sign = torch.randint(2, (b, self.ops_per_image, longest), generator=g).tolist()
        out = x.clone()
        for d in range(self.ops_per_image):
            for j in range(longest):
                groups: dict[tuple[str, float], list[int]] = {}
                for i in range(b):
                    sub = subs[choice[i][d]]
                    if j >= len(sub) or coin[i][d][j] >= sub[j].probability:
                        continue
                    op = sub[j]
                    m = self._magnitude(op.name, op.level, width)
                    if op.name in _SIGNED and sign[i][d][j]:
                        m = -m
                    groups.setdefault((op.name, m), []).append(i)
                for (name, m), members in groups.items():
                    idx = host_to_device(torch.tensor(members), x.device)
                    out[idx] = OPS[name](out[idx], m, self.fill, g)
        return out


class TorchvisionPolicy:
    """torchvision's AutoAugment / RandAugment / TrivialAugmentWide, per image, seeded from the generator.

    These transforms draw from torch's global RNG and apply one choice to a whole tensor, so each
    image is transformed separately inside a forked RNG seeded from ``g`` (deterministic, thread-unsafe
    only in the sense that the global RNG is briefly reseeded in this thread).
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

    def __call__(self, x: Tensor, g: torch.Generator) -> Tensor:
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


class Augmentation:
    """A callable ``(uint8 batch, generator) -> uint8 batch`` built from an AugmentConfig."""

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config
        fill = None if config.fill is None else _parse_fill(config.fill, "augment.fill")
        self.policy: Callable[[Tensor, torch.Generator], Tensor] | None = None
        if config.policy in TORCHVISION_POLICIES:
            self.policy = TorchvisionPolicy(config.policy, fill or (0, 0, 0))
        elif config.policy:
            self.policy = PolicyAugment(load_policy(config.policy), config.ops_per_image, fill)
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

