"""Tiny models for the export tests: hand-built integer-form nets and compressed zoo variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from micronet.compress.integer_modules import ChannelAffine, IntConv2d, IntLinear, RoundClamp


def random_codes(shape: tuple[int, ...], bits: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """Signed ``bits``-wide integer codes with about ``density`` of them non-zero."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.randint(lo, hi + 1, shape, generator=gen).float()
    return codes * (torch.rand(shape, generator=gen) < density)


def _affine(c: int, gen: torch.Generator, bias: bool = True, scale: float = 1.0) -> ChannelAffine:
    s = (0.5 + torch.rand(c, generator=gen)) * scale
    return ChannelAffine(s, torch.randn(c, generator=gen) if bias else None)


class _DenseLayer(nn.Module):
    """Affine -> 4-bit codes -> 3x3 integer conv -> de-quantising affine, concatenated to the input."""

    def __init__(self, c_in: int, growth: int, gen: torch.Generator, density: float) -> None:
        super().__init__()
        self.scale1 = _affine(c_in, gen)
        self.quant = RoundClamp(0, 15)
        self.conv = IntConv2d(random_codes((growth, c_in, 3, 3), 4, density, gen), padding=1, weight_bits=4)
        self.scale2 = _affine(growth, gen, bias=False, scale=0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.scale2(self.conv(self.quant(self.scale1(x))))], 1)


class IntDenseNet(nn.Module):
    """A small DenseNet in integer deploy form (the shape of the 2019 winner's merged network).

    ``integer_io=True`` also quantizes the image and the classifier input, so every conv and the FC
    multiply integer codes by integer codes: the exported graph must then be bit-exact.
    """

    def __init__(self, *, seed: int = 0, density: float = 0.25, integer_io: bool = False,
                 num_classes: int = 10, growth: int = 6, layers: int = 3) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.integer_io = integer_io
        if integer_io:
            self.in_scale = ChannelAffine(torch.tensor([20.0]))
            self.in_quant = RoundClamp(-128, 127)
        self.stem = IntConv2d(random_codes((8, 3, 3, 3), 4, 1.0, gen), padding=1, weight_bits=4)
        self.stem_scale = _affine(8, gen, bias=False, scale=0.02 if integer_io else 0.05)
        blocks, c = [], 8
        for _ in range(layers):
            blocks.append(_DenseLayer(c, growth, gen, density))
            c += growth
        self.blocks = nn.Sequential(*blocks)
        self.trans_scale = _affine(c, gen)
        self.trans_quant = RoundClamp(0, 15)
        self.trans = IntConv2d(random_codes((c // 2, c, 1, 1), 4, density, gen), weight_bits=4)
        self.head_scale = _affine(c // 2, gen, scale=0.1)
        if integer_io:
            self.fc_quant = nn.Sequential(_affine(c // 2, gen, scale=4.0), RoundClamp(0, 15))
        self.fc = IntLinear(random_codes((num_classes, c // 2), 6, 0.5, gen), weight_bits=6)
        self.fc_scale = _affine(num_classes, gen, scale=0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.integer_io:
            x = self.in_quant(self.in_scale(x))
        x = self.blocks(self.stem_scale(self.stem(x)))
        x = F.avg_pool2d(self.trans(self.trans_quant(self.trans_scale(x))), 2)
        x = F.relu(self.head_scale(x))
        x = F.adaptive_avg_pool2d(x, 1)
        x = x.view(x.size(0), -1)
        if self.integer_io:
            x = self.fc_quant(x)
        return self.fc_scale(self.fc(x))


def as_float_net(model: nn.Module) -> nn.Module:
    """The same network with every IntConv2d/IntLinear turned into a float Conv2d/Linear (fp32 weights)."""
    import copy

    net = copy.deepcopy(model)
    for name, m in list(net.named_modules()):
        if isinstance(m, IntConv2d):
            new = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                            m.groups, bias=False)
        elif isinstance(m, IntLinear):
            new = nn.Linear(m.in_features, m.out_features, bias=False)
        else:
            continue
        with torch.no_grad():
            new.weight.copy_(m.weight)
        parent, _, leaf = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, leaf, new)
    return net.eval()


def compressed(model: nn.Module, sparsity: float = 0.75, seed: int = 0) -> nn.Module:
    """Prune to ``sparsity`` and quantize (4-bit convs and activations, 6-bit FC), calibrated on noise."""
    from micronet.compress import QuantConfig, SparsityConfig, prune_, quantize_

    prune_(model, SparsityConfig(sparsity))
    calib = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    # few refit iterations: the tests need valid scales, not optimal ones
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4, fc_weight_bits=6, refit_iters=3), calib)
    return model.eval()


TINY_ZOO = (
    "densenet_bc:depth=10,growth=4",
    "pyramidnet:depth=11,alpha=12",
    "wrn:depth=10,width=1",
)


@pytest.fixture
def int_densenet() -> IntDenseNet:
    return IntDenseNet().eval()


@pytest.fixture
def exact_densenet() -> IntDenseNet:
    return IntDenseNet(integer_io=True, seed=1).eval()
