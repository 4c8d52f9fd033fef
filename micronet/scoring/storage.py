"""Sparse-storage layout: what a stored tensor costs in bits under a policy's mask mode (spec scoring.md a.3, c.4).

A sparse tensor is stored as its nonzero values plus a bitmask (one bit per element, or per block for
block masks); ``mask`` decides when: always, only when it has zeros (``always_if_sparse``, formerly
``if_sparse``), or whichever of dense/sparse is smaller (``cheapest``, the official default).

Under ``cheapest`` the mask may also be one bit per structure (rules a.3: "block sparsity may use one mask bit
per block"): per output channel (filter) or per input channel of a conv/linear weight, as structured pruning
(``torch.nn.utils.prune.ln_structured``, channel pruning) leaves it. Every value of a kept structure is stored and
multiplied; a removed one costs its bit only. The smallest of these layouts is the tensor's storage. A layer's
declared block (micronet block masks) is its one sparse layout in every mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class ParamUse:
    """A stored tensor charged as parameters: ``numel`` values at ``bits``; ``sparse`` ones may use a mask.

    Its layout depends only on which of its values are nonzero: ``nonzero_of`` computes that bool tensor when a
    layout needs it (None: the values are not known, and the tensor is stored dense).
    """

    key: Any
    name: str
    numel: int
    bits: int
    nonzero_of: Callable[[], Tensor] | None = None
    sparse: bool = False
    block: tuple[int, int] | None = None
    nnz: int | None = None  # nonzeros, when the rule already counted them

    @property
    def nonzero(self) -> Tensor:
        """The tensor's ``values != 0`` (bool, its shape)."""
        return self.nonzero_of()


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


@dataclass(frozen=True)
class Layout:
    """How one tensor is stored: dense, or sparse with a mask bit per element (``block`` None) or per block."""

    sparse: bool
    values: int  # values stored
    mask_bits: int
    bits: int  # total
    block: tuple[int, int] | None = None


def _element_layout(use: ParamUse, nonzero: Tensor | None = None) -> Layout:
    if use.nnz is not None:
        nonzero_values = use.nnz
    else:
        nonzero_values = int((use.nonzero if nonzero is None else nonzero).count_nonzero())
    return Layout(True, nonzero_values, use.numel, nonzero_values * use.bits + use.numel)


def _block_layout(use: ParamUse, block: tuple[int, int]) -> Layout:
    values, mask_bits = block_counts(use.nonzero, block)
    return Layout(True, values, mask_bits, values * use.bits + mask_bits, block)


def _channel_layouts(use: ParamUse, nonzero: Tensor) -> list[Layout]:
    """A mask bit per output channel (filter) and per input channel of a conv/linear weight ``[out, in, *kernel]``,
    as (out, in) blocks (1, in) and (out, 1): a kept channel stores all its values. ``nonzero``: its ``values != 0``."""
    if nonzero.dim() not in (2, 4):  # a conv2d or linear weight; other tensors have no channel structure
        return []
    o, i = nonzero.shape[0], nonzero.shape[1]
    taps = use.numel // (o * i)
    live = nonzero.reshape(o, i, taps).any(2)  # which (out, in) kernels hold a nonzero
    rows, cols = int(live.any(1).sum()), int(live.any(0).sum())
    return [Layout(True, rows * i * taps, o, rows * i * taps * use.bits + o, (1, i)),
            Layout(True, cols * o * taps, i, cols * o * taps * use.bits + i, (o, 1))]


def sparse_layout(use: ParamUse, mask: str = "always") -> Layout:
    """The sparse layout of ``use`` under ``mask``: its declared block, else a bit per element, or under
    ``cheapest`` the smallest of that and a bit per channel structure."""
    if use.block is not None and use.nonzero.dim() >= 2:
        return _block_layout(use, use.block)
    if mask != "cheapest":
        return _element_layout(use)
    nonzero = use.nonzero  # one pass shared by the element and channel counts
    element = _element_layout(use, nonzero)
    if element.values == use.numel:
        return element
    return min([element, *_channel_layouts(use, nonzero)], key=lambda lay: lay.bits)


def layout(use: ParamUse, mask: str) -> Layout:
    """How the policy stores this tensor: sparse (only then may its zeros be skipped) or dense."""
    dense = Layout(False, use.numel, 0, use.numel * use.bits)
    if not use.sparse or use.nonzero_of is None or use.numel == 0:
        return dense
    sparse = sparse_layout(use, mask)
    if mask == "always":
        return sparse
    if mask in ("always_if_sparse", "if_sparse"):
        return sparse if sparse.values < use.numel else dense
    return sparse if sparse.bits < dense.bits else dense  # cheapest


def storage_bits(use: ParamUse, mask: str) -> tuple[int, int, int]:
    """(total bits, stored values, mask bits) of one stored tensor under the policy's mask mode."""
    lay = layout(use, mask)
    return lay.bits, lay.values, lay.mask_bits


def multiplied_per_row(use: ParamUse, mask: str, nnz: list[int], dense_k: int) -> list[int]:
    """Weights multiplied per output channel, given its nonzeros ``nnz``: all ``dense_k`` when stored dense, every
    value of its kept blocks under a block layout, its nonzeros under an element mask."""
    lay = layout(use, mask)
    if not lay.sparse:
        return [dense_k] * len(nnz)  # stored dense: its zeros are stored and multiplied
    if lay.block is not None and use.nonzero_of is not None and use.nonzero.dim() >= 2:
        return block_rows(use.nonzero, lay.block)[0]  # kept blocks are stored and multiplied whole
    return nnz


def block_rows(nonzero: Tensor, block: tuple[int, int]) -> tuple[list[int], int]:
    """(values stored per output row, number of blocks) for an (out, in) block mask, from a weight's
    ``values != 0`` (bool).

    As in ``micronet.compress.sparsity``: a block spans ``bo`` output x ``bi`` input channels and all
    kernel taps, one mask bit each; edge blocks are smaller. Every value of a kept block is stored (and
    multiplied: no mask says where its zeros are).
    """
    bo, bi = block
    o, i = nonzero.shape[0], nonzero.shape[1]
    taps = nonzero.numel() // (o * i)
    v = nonzero.reshape(o, i, taps).any(dim=2)
    po, pi = -o % bo, -i % bi
    if po or pi:
        v = torch.nn.functional.pad(v, (0, pi, 0, po))
    nb_o, nb_i = v.shape[0] // bo, v.shape[1] // bi
    live = v.reshape(nb_o, bo, nb_i, bi).any(dim=3).any(dim=1).tolist()
    per_block_row = [sum(min(bi, i - b * bi) * taps for b in range(nb_i) if live[a][b]) for a in range(nb_o)]
    return [per_block_row[c // bo] for c in range(o)], nb_o * nb_i


def block_counts(nonzero: Tensor, block: tuple[int, int]) -> tuple[int, int]:
    """(values stored in nonzero blocks, number of blocks) for an (out, in) block mask (``nonzero``: the
    weight's ``values != 0``)."""
    rows, n_blocks = block_rows(nonzero, block)
    return sum(rows), n_blocks
