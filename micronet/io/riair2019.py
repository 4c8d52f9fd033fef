"""Importer for the 2019 CIFAR-100 winner's merged checkpoint ("riair2019", spec riair2019-format.md).

The file is a plain state_dict of 402 float32 tensors: a DenseNet-BC-100 (k=12) whose BatchNorms, weight
steps and activation steps are folded into per-channel ``Scale`` layers. ``build_riair2019`` rebuilds it
directly in micronet's integer deploy form (``IntConv2d`` codes, ``IntLinear`` codes, ``ChannelAffine``,
``RoundClamp(0, 15)``), so it can be scored, evaluated and exported like any converted model. Module
names follow the file's keys (``dense2.7.conv1``), so report rows point back at the file.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from micronet.compress.integer_modules import ChannelAffine, IntConv2d, IntLinear, RoundClamp
from micronet.compress.ops import range_bits
from micronet.errors import MicronetError
from micronet.io.checkpoint import load_state_dict_file

GROWTH = 12
LAYERS_PER_BLOCK = 16
BLOCK_INPUTS = (24, 108, 150)  # channels entering dense blocks 1..3
NUM_CLASSES = 100
ACT_RANGE = (0, 15)  # 4-bit unsigned activation codes; the clamp at 0 is the ReLU
# The original pipeline normalised with CIFAR-10 statistics, then divided by 255 once more.
LEGACY_MEAN = (0.4914, 0.4822, 0.4465)
LEGACY_STD = (0.2470, 0.2435, 0.2616)


def expected_shapes() -> OrderedDict[str, tuple[int, ...]]:
    """Every key of the format with its shape, in module order (402 entries)."""
    shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    shapes["conv1.weight"] = (2 * GROWTH, 3, 3, 3)
    shapes["scale1.weight"] = shapes["scale1.bias"] = (1, 2 * GROWTH, 1)
    for b, c0 in enumerate(BLOCK_INPUTS, start=1):
        for i in range(LAYERS_PER_BLOCK):
            c_in, p = c0 + GROWTH * i, f"dense{b}.{i}."
            shapes[p + "scale1.weight"] = shapes[p + "scale1.bias"] = (1, c_in, 1)
            shapes[p + "conv1.weight"] = (4 * GROWTH, c_in, 1, 1)
            shapes[p + "scale2.weight"] = shapes[p + "scale2.bias"] = (1, 4 * GROWTH, 1)
            shapes[p + "conv2.weight"] = (GROWTH, 4 * GROWTH, 3, 3)
            shapes[p + "scale3.weight"] = shapes[p + "scale3.bias"] = (1, GROWTH, 1)
        if b < 3:
            c_in, c_out = c0 + GROWTH * LAYERS_PER_BLOCK, BLOCK_INPUTS[b]
            p = f"trans{b}."
            shapes[p + "scale1.weight"] = shapes[p + "scale1.bias"] = (1, c_in, 1)
            shapes[p + "conv1.weight"] = (c_out, c_in, 1, 1)
            shapes[p + "scale2.weight"] = shapes[p + "scale2.bias"] = (1, c_out, 1)
    features = BLOCK_INPUTS[2] + GROWTH * LAYERS_PER_BLOCK
    shapes["scale2.weight"] = shapes["scale2.bias"] = (1, features, 1)
    shapes["fc.weight"] = (NUM_CLASSES, features)
    shapes["scale3.weight"] = shapes["scale3.bias"] = (1, NUM_CLASSES, 1)
    return shapes


_SIGNATURE = ("dense1.0.scale1.weight", "dense3.15.conv2.weight", "trans2.scale2.bias", "scale3.weight")


def looks_like_riair2019(state: dict) -> bool:
    """True if a loaded object has the riair2019 key layout (used by ``--format auto``)."""
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    keys = {k[len("module.") :] if isinstance(k, str) and k.startswith("module.") else k for k in state}
    return all(k in keys for k in _SIGNATURE)


def _check_layout(state: dict[str, Tensor], source: str) -> None:
    expected = expected_shapes()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing {', '.join(missing[:3])}" + (f" (+{len(missing) - 3})" if len(missing) > 3 else "")
            )
        if unexpected:
            parts.append(
                f"unexpected {', '.join(unexpected[:3])}"
                + (f" (+{len(unexpected) - 3})" if len(unexpected) > 3 else "")
            )
        raise MicronetError(f"{source} is not a riair2019 checkpoint: " + "; ".join(parts))
    for key, shape in expected.items():
        t = state[key]
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise MicronetError(f"{source}: {key} has shape {got}, the riair2019 layout needs {shape}")
        if not torch.isfinite(t.float()).all():
            raise MicronetError(f"{source}: {key} holds non-finite values")
        if key.endswith("conv1.weight") or key.endswith("conv2.weight") or key == "fc.weight":
            if not torch.equal(t.float(), torch.round(t.float())):
                raise MicronetError(
                    f"{source}: {key} must hold integer weight codes, found fractional values"
                )


def code_bits(codes: Tensor) -> int:
    """Bits of the signed code range that holds every value of ``codes`` (e.g. [-8, 7] -> 4)."""
    lo, hi = int(codes.min()), int(codes.max())
    return max(range_bits(min(lo, -1), max(hi, 0)), 2)


def _int_conv(state: dict[str, Tensor], prefix: str, bits: int | None, padding: int = 0) -> IntConv2d:
    """The integer conv stored under ``prefix``, at ``bits`` or at the width its codes need."""
    codes = state[prefix + ".weight"]
    return IntConv2d(codes, padding=padding, weight_bits=bits or code_bits(codes))


def _affine(state: dict[str, Tensor], prefix: str) -> ChannelAffine:
    scale, bias = state[prefix + ".weight"].float().reshape(-1), state[prefix + ".bias"].float().reshape(-1)
    # An all-zero bias is a pure scale in the original (and costs no add).
    return ChannelAffine(scale, None if not bool(bias.any()) else bias)


class LegacyInput(nn.Module):
    """The original pipeline's input scaling for images in [0, 1]: CIFAR-10 normalisation, then / 255."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(LEGACY_MEAN).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(LEGACY_STD).reshape(1, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std / 255.0


class RiairBottleneck(nn.Module):
    """scale1 -> round/clamp -> 1x1 conv -> scale2 -> round/clamp -> 3x3 conv -> scale3, concatenated to x."""

    def __init__(self, state: dict[str, Tensor], prefix: str, conv_bits: int | None) -> None:
        super().__init__()
        self.scale1 = _affine(state, prefix + "scale1")
        self.quant1 = RoundClamp(*ACT_RANGE)
        self.conv1 = _int_conv(state, prefix + "conv1", conv_bits)
        self.scale2 = _affine(state, prefix + "scale2")
        self.quant2 = RoundClamp(*ACT_RANGE)
        self.conv2 = _int_conv(state, prefix + "conv2", conv_bits, padding=1)
        self.scale3 = _affine(state, prefix + "scale3")

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.quant1(self.scale1(x)))
        out = self.scale3(self.conv2(self.quant2(self.scale2(out))))
        return torch.cat([x, out], 1)


class RiairTransition(nn.Module):
    """scale1 -> round/clamp -> 1x1 conv -> 2x2 average pool -> scale2."""

    def __init__(self, state: dict[str, Tensor], prefix: str, conv_bits: int | None) -> None:
        super().__init__()
        self.scale1 = _affine(state, prefix + "scale1")
        self.quant1 = RoundClamp(*ACT_RANGE)
        self.conv1 = _int_conv(state, prefix + "conv1", conv_bits)
        self.pool = nn.AvgPool2d(2, stride=2)
        self.scale2 = _affine(state, prefix + "scale2")

    def forward(self, x: Tensor) -> Tensor:
        return self.scale2(self.pool(self.conv1(self.quant1(self.scale1(x)))))


class RiairDenseNet(nn.Module):
    """The winner's merged DenseNet-BC-100 in integer deploy form (module names follow the file's keys)."""

    def __init__(
        self,
        state: dict[str, Tensor],
        *,
        conv_bits: int | None = None,
        fc_bits: int | None = None,
        legacy_input: bool = False,
    ) -> None:
        super().__init__()
        self.input_scaling = LegacyInput() if legacy_input else nn.Identity()
        self.conv1 = _int_conv(state, "conv1", conv_bits, padding=1)
        self.scale1 = _affine(state, "scale1")
        for b in (1, 2, 3):
            layers = [RiairBottleneck(state, f"dense{b}.{i}.", conv_bits) for i in range(LAYERS_PER_BLOCK)]
            setattr(self, f"dense{b}", nn.Sequential(*layers))
            if b < 3:
                setattr(self, f"trans{b}", RiairTransition(state, f"trans{b}.", conv_bits))
        self.scale2 = _affine(state, "scale2")
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(8)
        fc = state["fc.weight"]
        self.fc = IntLinear(fc, weight_bits=fc_bits or code_bits(fc))
        self.scale3 = _affine(state, "scale3")

    def forward(self, x: Tensor) -> Tensor:
        x = self.scale1(self.conv1(self.input_scaling(x)))
        x = self.trans1(self.dense1(x))
        x = self.trans2(self.dense2(x))
        x = self.pool(self.relu(self.scale2(self.dense3(x))))
        return self.scale3(self.fc(torch.flatten(x, 1)))


def build_riair2019(
    state: dict[str, Tensor],
    *,
    source: str = "state_dict",
    conv_bits: int | None = None,
    fc_bits: int | None = None,
    legacy_input: bool = False,
) -> RiairDenseNet:
    """Validate a riair2019 state_dict and build its integer-form network (eval mode).

    Weight bits are inferred per tensor from the code range (4 for [-8, 7], 6 for [-32, 31]) unless
    ``conv_bits``/``fc_bits`` are given. ``legacy_input`` prepends the original input scaling, needed
    only to reproduce the published accuracy from images in [0, 1].
    """
    if all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    _check_layout(state, source)
    model = RiairDenseNet(state, conv_bits=conv_bits, fc_bits=fc_bits, legacy_input=legacy_input)
    model.micronet_spec = {
        "name": "riair2019",
        "family": "riair2019",
        "num_classes": NUM_CLASSES,
        "kwargs": {},
    }
    return model.eval()


def load_riair2019(path: str | Path, **kwargs) -> RiairDenseNet:
    """Read a riair2019 file (a weights-only state_dict) and build its network."""
    return build_riair2019(load_state_dict_file(path), source=str(path), **kwargs)


def random_riair2019_state(
    seed: int = 0, conv_density: float = 0.25, fc_density: float = 0.5
) -> OrderedDict[str, Tensor]:
    """A random state_dict in the exact riair2019 layout (for tests and demos; not a trained model)."""
    gen = torch.Generator().manual_seed(seed)
    state: OrderedDict[str, Tensor] = OrderedDict()
    for key, shape in expected_shapes().items():
        if key.endswith("conv1.weight") or key.endswith("conv2.weight") or key == "fc.weight":
            lo, hi = (-32, 31) if key == "fc.weight" else (-8, 7)
            codes = torch.randint(lo, hi + 1, shape, generator=gen).float()
            keep = torch.rand(shape, generator=gen) < (fc_density if key == "fc.weight" else conv_density)
            codes[0].view(-1)[0] = lo  # pin the full code range so inferred bits match the format
            codes[-1].view(-1)[-1] = hi
            keep[0].view(-1)[0] = keep[-1].view(-1)[-1] = True
            state[key] = codes * keep
        elif key.endswith(".weight"):
            state[key] = (0.05 + torch.rand(shape, generator=gen)) * 0.2
        else:
            zero_bias = (
                key.endswith("scale3.bias")
                and key.startswith("dense")
                or key in ("scale1.bias", "trans1.scale2.bias", "trans2.scale2.bias")
            )
            state[key] = torch.zeros(shape) if zero_bias else torch.randn(shape, generator=gen) * 0.1
    return state


__all__ = [
    "RiairDenseNet",
    "build_riair2019",
    "code_bits",
    "expected_shapes",
    "load_riair2019",
    "looks_like_riair2019",
    "random_riair2019_state",
]
