"""Sparse-storage layout: what a stored tensor costs in bits under a policy's mask mode (spec scoring.md c.4).

A sparse tensor is stored as its nonzero values plus a bitmask (one bit per element, or per block for
block masks); ``mask`` decides when: always, only when it has zeros (``always_if_sparse``, formerly
``if_sparse``), or whichever of dense/sparse is smaller (``cheapest``, the official default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class ParamUse:
    """A stored tensor charged as parameters: ``numel`` values at ``bits``; ``sparse`` ones may use a mask."""

    key: Any
    name: str
    numel: int
    bits: int
    value: Tensor | None = None
    sparse: bool = False
    block: tuple[int, int] | None = None
    nnz: int | None = None  # nonzeros, when the rule already counted them


def block_of(module: Any) -> tuple[int, int] | None:
    """Mask block shape of a layer: the Int layer's ``block`` or the training form's WeightMask.block."""
    if module is None:
        return None
    block = getattr(module, "block", None)
    if block is None:
        parametrizations = getattr(module, "parametrizations", None)
        chain = getattr(parametrizations, "weight", None) if parametrizations is not None else None
        for p in chain or []:
            if getattr(p, "block", None) is not None:
                block = p.block
    # Only a pair of ints is a mask block (torchvision's MBConv/CNBlock hold a submodule named ``block``).
    if isinstance(block, (tuple, list)) and len(block) == 2 and all(isinstance(b, int) for b in block):
        return tuple(block)
    return None


def sparse_layout(use: ParamUse) -> tuple[int, int, int]:
    """(stored values, mask bits, total bits) of ``use`` stored as nonzeros + bitmask (element or block)."""
    value = use.value
    if use.block is not None and value.dim() >= 2:
        nonzero_values, mask_bits = block_counts(value, use.block)
    else:
        nonzero_values = use.nnz if use.nnz is not None else int(value.count_nonzero())
        mask_bits = use.numel
    return nonzero_values, mask_bits, nonzero_values * use.bits + mask_bits


def stored_sparse(use: ParamUse, mask: str) -> bool:
    """Whether the policy stores this tensor as nonzeros + bitmask (only then may its zeros be skipped)."""
    if not use.sparse or use.value is None or use.numel == 0:
        return False
    if mask == "always":
        return True
    nonzero_values, _, sparse_bits = sparse_layout(use)
    if mask in ("always_if_sparse", "if_sparse"):
        return nonzero_values < use.numel
    return sparse_bits < use.numel * use.bits  # cheapest


def storage_bits(use: ParamUse, mask: str) -> tuple[int, int, int]:
    """(total bits, stored values, mask bits) of one stored tensor under the policy's mask mode."""
    if stored_sparse(use, mask):
        nonzero_values, mask_bits, bits = sparse_layout(use)
        return bits, nonzero_values, mask_bits
    return use.numel * use.bits, use.numel, 0


def block_rows(value: Tensor, block: tuple[int, int]) -> tuple[list[int], int]:
    """(values stored per output row, number of blocks) for an (out, in) block mask.

    As in ``micronet.compress.sparsity``: a block spans ``bo`` output x ``bi`` input channels and all
    kernel taps, one mask bit each; edge blocks are smaller. Every value of a kept block is stored (and
    multiplied: no mask says where its zeros are).
    """
    bo, bi = block
    o, i = value.shape[0], value.shape[1]
    taps = value.numel() // (o * i)
    v = value.reshape(o, i, taps)
    po, pi = -o % bo, -i % bi
    if po or pi:
        v = torch.nn.functional.pad(v, (0, 0, 0, pi, 0, po))
    nb_o, nb_i = v.shape[0] // bo, v.shape[1] // bi
    live = v.reshape(nb_o, bo, nb_i, bi, taps).ne(0).any(dim=4).any(dim=3).any(dim=1).tolist()
    per_block_row = [sum(min(bi, i - b * bi) * taps for b in range(nb_i) if live[a][b]) for a in range(nb_o)]
    return [per_block_row[c // bo] for c in range(o)], nb_o * nb_i


def block_counts(value: Tensor, block: tuple[int, int]) -> tuple[int, int]:
    """(values stored in nonzero blocks, number of blocks) for an (out, in) block mask."""
    rows, n_blocks = block_rows(value, block)
    return sum(rows), n_blocks
