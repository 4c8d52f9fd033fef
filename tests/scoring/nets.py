"""Small hand-built networks for the scorer tests (plain torch modules and the integer-form modules)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    """Standard WRN block (Zagoruyko & Komodakis): BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 + shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride, bias=False) if (stride != 1 or c_in != c_out) else None
        )

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        y = self.conv2(torch.relu(self.bn2(self.conv1(out))))
        return y + (x if self.shortcut is None else self.shortcut(x))


def no_exact_zeros_(model: nn.Module) -> nn.Module:
    """Random init occasionally yields exact zeros, which a sparsity-aware scorer rightly counts."""
    with torch.no_grad():
        for p in model.parameters():
            p[p == 0] = 1e-3
    return model


def sparse_codes(c_out: int, per_out: int, nnz: int, bits: int, gen: torch.Generator) -> torch.Tensor:
    """Integer codes [c_out, per_out] in the signed ``bits`` range with exactly ``nnz`` nonzeros per row."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.zeros(c_out, per_out)
    for r in range(c_out):
        idx = torch.randperm(per_out, generator=gen)[:nnz]
        vals = torch.randint(1, max(hi, 1) + 1, (nnz,), generator=gen).float()
        signs = torch.where(torch.rand(nnz, generator=gen) < 0.5, -1.0, 1.0)
        codes[r, idx] = torch.clamp(vals * signs, lo, hi)
    return codes


class ModuleTwin(nn.Module):
    """conv -> relu -> (branch conv) add -> cat -> avgpool -> global pool -> fc, with modules only."""

    class Add(nn.Module):
        def forward(self, a, b):
            return torch.add(a, b)

    class Cat(nn.Module):
        def forward(self, a, b):
            return torch.cat([a, b], 1)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.add, self.cat = self.Add(), self.Cat()
        self.pool = nn.AvgPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        a = self.relu(self.conv1(x))
        b = self.add(a, self.conv2(a))
        return self.fc(torch.flatten(self.gap(self.pool(self.cat(a, b))), 1))


class FunctionalTwin(nn.Module):
    """The same network written with F.*, ``x + y``, ``torch.cat`` and ``x.mean``."""

    def __init__(self, twin: ModuleTwin) -> None:
        super().__init__()

        def copy(t):
            return nn.Parameter(t.detach().clone())

        self.w1, self.b1, self.w2 = copy(twin.conv1.weight), copy(twin.conv1.bias), copy(twin.conv2.weight)
        self.wf, self.bf = copy(twin.fc.weight), copy(twin.fc.bias)

    def forward(self, x):
        a = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        b = a + F.conv2d(a, self.w2, padding=1)
        y = F.avg_pool2d(torch.cat([a, b], dim=1), 2).mean((2, 3))
        return F.linear(y, self.wf, self.bf)
