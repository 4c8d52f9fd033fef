"""Per-op parity with the reference counter's formulas (spec scoring.md b.1) on random small nets.

The oracle below re-implements b.1 independently (descriptor list -> bits), with the rules' bit scaling:
mults at max(weight, input) width, adds at 32, params nnz*b + a full mask only when sparse.
"""

import random
from fractions import Fraction

import pytest
import torch
from torch import nn

from micronet.compress.integer_modules import ChannelAffine, IntConv2d, IntLinear, RoundClamp
from micronet.scoring import score
from tests.scoring.nets import sparse_codes


def sparse_size(n: int, bits: int, sparsity: Fraction) -> Fraction:
    return n * bits * (1 - sparsity) + (n if sparsity > 0 else 0)


class Probe(nn.Module):
    """conv -> relu -> [act quant] -> depthwise conv -> scale -> add(skip) -> global avg -> FC."""

    def __init__(self, cfg: dict, gen: torch.Generator) -> None:
        super().__init__()
        c, k, s, b = cfg["c"], cfg["k"], cfg["stride"], cfg["wbits"]
        self.c, self.cfg = c, cfg
        w = sparse_codes(c, 3 * k * k, cfg["nnz1"], b or 8, gen).reshape(c, 3, k, k)
        if b:
            self.conv = IntConv2d(w, stride=s, padding=k // 2, weight_bits=b)
            self.bias = ChannelAffine(torch.ones(c), torch.rand(c) + 0.1) if cfg["bias"] else None
        else:
            self.conv = nn.Conv2d(3, c, k, s, k // 2, bias=cfg["bias"])
            with torch.no_grad():
                self.conv.weight.copy_(w * 0.01)
            self.bias = None
        self.relu = nn.ReLU()
        self.quant = RoundClamp(0, 2 ** cfg["abits"] - 1) if cfg["abits"] else None
        dw = sparse_codes(c, 9, cfg["nnz_dw"], b or 8, gen).reshape(c, 1, 3, 3)
        self.dw = (
            IntConv2d(dw, padding=1, groups=c, weight_bits=b)
            if b
            else nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        )
        if not b:
            with torch.no_grad():
                self.dw.weight.copy_(dw * 0.01)
        self.scale = ChannelAffine(torch.rand(c) + 0.5)
        fc = sparse_codes(10, c, cfg["nnz_fc"], b or 8, gen)
        self.fc = IntLinear(fc, weight_bits=b) if b else nn.Linear(c, 10)
        if not b:
            with torch.no_grad():
                self.fc.weight.copy_(fc * 0.01)

    def forward(self, x):
        y = self.conv(x)
        if self.bias is not None:
            y = self.bias(y)
        y = self.relu(y)
        if self.quant is not None:
            y = self.quant(y)
        z = self.scale(self.dw(y))
        z = z + y
        return self.fc(z.mean((2, 3)))


def oracle(cfg: dict, size: int) -> tuple[Fraction, Fraction]:
    """(params, ops) in 32-bit units from the b.1 formulas."""
    c, k, s = cfg["c"], cfg["k"], cfg["stride"]
    b, a = cfg["wbits"] or 32, cfg["abits"]
    h = -(-size // s)  # ceil(H_in / stride) for 'same' padding
    bits_p, bits_m, bits_a = 0, 0, 0
    # Conv2D: L = k*k*C_in*(1-s) nonzeros per filter (equal per filter here).
    n1 = k * k * 3 * c
    sp1 = Fraction(n1 - cfg["nnz1"] * c, n1)
    o1 = h * h * c
    bits_p += sparse_size(n1, b, sp1)
    bits_m += cfg["nnz1"] * o1 * max(b, 32)  # the image enters at 32 bits
    bits_a += (cfg["nnz1"] - 1) * o1 * 32
    if cfg["bias"]:
        if cfg["wbits"]:  # integer form: the bias is a separate per-channel affine (scale 1 + bias)
            bits_p += 2 * c * 32
            bits_m += o1 * 32
            bits_a += o1 * 32
        else:
            bits_p += c * 32
            bits_a += o1 * 32
    bits_m += o1 * 32  # ReLU: 1 mult per element
    act = 32
    if a:
        bits_m += o1 * 32  # round + clamp: 1 op per element at its input width
        act = a
    # DepthwiseConv2D 3x3: L = 9*(1-s)
    n2 = 9 * c
    sp2 = Fraction(n2 - cfg["nnz_dw"] * c, n2)
    bits_p += sparse_size(n2, b, sp2)
    bits_m += cfg["nnz_dw"] * o1 * max(b, act)
    bits_a += (cfg["nnz_dw"] - 1) * o1 * 32
    # Scale (per-channel multiply): H*H*C mults, C params
    bits_m += o1 * 32
    bits_p += c * 32
    # Add
    bits_a += o1 * max(32, act)
    # GlobalAvg: C mults + (H*H - 1)*C adds
    bits_m += c * 32
    bits_a += (h * h - 1) * c * 32
    # FullyConnected C -> 10 (float input)
    n3 = 10 * c
    sp3 = Fraction(n3 - cfg["nnz_fc"] * 10, n3)
    bits_p += sparse_size(n3, b, sp3)
    bits_m += cfg["nnz_fc"] * 10 * 32
    bits_a += (cfg["nnz_fc"] - 1) * 10 * 32
    if not cfg["wbits"]:
        bits_p += 10 * 32
        bits_a += 10 * 32
    return Fraction(bits_p, 32), Fraction(bits_m + bits_a, 32)


@pytest.mark.parametrize("seed", range(12))
def test_random_nets_match_reference_formulas(seed):
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    k = rnd.choice([1, 3, 5])
    c = rnd.choice([4, 6, 8, 12])
    cfg = {
        "c": c,
        "k": k,
        "stride": rnd.choice([1, 2]),
        "bias": rnd.random() < 0.5,
        "wbits": rnd.choice([None, 2, 3, 4, 6, 8]),
        "abits": rnd.choice([None, 2, 4, 8]),
        "nnz1": rnd.randint(1, 3 * k * k),
        "nnz_dw": rnd.randint(1, 9),
        "nnz_fc": rnd.randint(1, c),
    }
    size = rnd.choice([7, 8, 15, 16])
    model = Probe(cfg, gen).eval()
    # bn="unfold": keep the Scale op separate, as the reference counter's descriptor list does; and its
    # literal mask rule (a bitmask whenever sparsity > 0).
    report = score(model, input_size=size, bn="unfold", mask="always_if_sparse")
    params, ops = oracle(cfg, size)
    assert not report.unknown_ops
    assert report.params == params
    assert report.ops == ops
