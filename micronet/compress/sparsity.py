"""Magnitude pruning with masks that live on the modules (a parametrization of ``weight``).

``prune_(model, SparsityConfig(...))`` selects layers, computes masks by magnitude (globally over all
selected layers or per layer, element-wise or per block), and registers a ``WeightMask``
parametrization so every forward pass sees ``weight * mask``. The dense tensor behind it keeps
training; with ``gradient="dense"`` pruned weights still receive gradients (straight-through, like the
2019 winner's shadow weights) so ``update_masks_`` can regrow them during a warm-up, then
``freeze_masks_`` fixes the pattern.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from micronet.compress import state
from micronet.compress.parametrizations import WeightMask
from micronet.errors import MicronetError


@dataclass(frozen=True)
class SparsityConfig:
    """What to prune and how.

    ``sparsity`` is the fraction of zeros in [0, 1). ``scope="global"`` ranks all selected weights
    together (the winner's rule; per-layer sparsities then vary), ``"layer"`` prunes every layer to
    exactly ``sparsity`` (or to its entry in ``per_layer``). ``block=(bo, bi)`` prunes whole
    blocks of ``bo`` output x ``bi`` input channels (all kernel taps included), one mask bit each.
    """

    sparsity: float
    scope: str = "global"
    kinds: tuple[str, ...] = ("conv",)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    per_layer: dict[str, float] = field(default_factory=dict)
    gradient: str = "dense"
    block: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise MicronetError(f"sparsity must be in [0, 1), got {self.sparsity}")
        for name, value in self.per_layer.items():
            if not 0.0 <= float(value) < 1.0:
                raise MicronetError(f"per_layer sparsity of {name} must be in [0, 1), got {value}")
        if self.scope not in ("global", "layer"):
            raise MicronetError(f"sparsity scope must be 'global' or 'layer', got {self.scope!r}")
        if self.gradient not in ("dense", "masked"):
            raise MicronetError(f"mask gradient must be 'dense' or 'masked', got {self.gradient!r}")
        if self.block is not None and (len(self.block) != 2 or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.block)):
            raise MicronetError(f"block must be two positive integers (out, in), got {self.block}")


def _block_scores(w: Tensor, block: tuple[int, int]) -> Tensor:
    """L1 magnitude of each (bo x bi x kernel) block, shape [ceil(O/bo), ceil(I/bi)]."""
    bo, bi = block
    o, i = w.shape[:2]
    a = w.detach().abs().reshape(o, i, -1).sum(-1)
    pad_o, pad_i = (-o) % bo, (-i) % bi
    a = torch.nn.functional.pad(a, (0, pad_i, 0, pad_o))
    return a.reshape(a.shape[0] // bo, bo, a.shape[1] // bi, bi).sum((1, 3))


def _expand_block_mask(keep: Tensor, shape: torch.Size, block: tuple[int, int]) -> Tensor:
    bo, bi = block
    m = keep.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[: shape[0], : shape[1]]
    return m.reshape(shape[0], shape[1], *([1] * (len(shape) - 2))).expand(shape).clone()


def _keep_top(scores: Sequence[Tensor], sparsity: float) -> list[Tensor]:
    """Boolean keep-masks keeping exactly N - round(sparsity*N) largest scores over all tensors."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    n = flat.numel()
    n_prune = int(round(sparsity * n))
    keep = torch.ones(n, dtype=torch.bool, device=flat.device)
    if n_prune:
        # Ties are broken by position (stable sort), so the count is exact whatever the values.
        order = torch.sort(flat, stable=True).indices
        keep[order[:n_prune]] = False
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.numel()].reshape(s.shape))
        start += s.numel()
    return out


def _compute_masks(items: list[tuple[nn.Module, Tensor]], sparsity: float, block) -> list[Tensor]:
    """Masks for (module, dense weight) pairs ranked together."""
    if block is None:
        return _keep_top([w.detach().abs() for _, w in items], sparsity)
    keeps = _keep_top([_block_scores(w, block) for _, w in items], sparsity)
    return [_expand_block_mask(k, w.shape, block) for k, (_, w) in zip(keeps, items)]


def prune_(model: nn.Module, config: SparsityConfig) -> nn.Module:
    """Register magnitude masks on the selected layers of ``model`` (in place) and return it."""
    layers = state.select_layers(model, config.kinds, config.include, config.exclude)
    if not layers:
        raise MicronetError(f"no layer selected for pruning (kinds={list(config.kinds)})")
    for pattern in config.per_layer:
        if pattern not in dict(layers):
            raise MicronetError(f"per_layer names unknown layer {pattern!r}")
    groups: dict[str, list[tuple[str, nn.Module]]] = defaultdict(list)
    for name, module in layers:
        if state.weight_quantizer(module) is not None:
            raise MicronetError(f"layer {name} is already quantized; prune before quantizing")
        if config.scope == "global" and name not in config.per_layer:
            groups["global:" + ",".join(config.kinds)].append((name, module))
        else:
            groups[name].append((name, module))
    for group, members in groups.items():
        sparsity = config.per_layer.get(members[0][0], config.sparsity) if len(members) == 1 else config.sparsity
        items = [(m, state.raw_weight(m)) for _, m in members]
        masks = _compute_masks(items, sparsity, config.block)
        for (_, module), mask in zip(members, masks):
            existing = state.weight_mask(module)
            if existing is not None:  # re-pruning replaces the old mask in place
                existing.mask.copy_(mask)
                existing.sparsity, existing.group, existing.block = sparsity, group, config.block
                continue
            parametrize.register_parametrization(
                module,
                "weight",
                WeightMask(mask, sparsity=sparsity, group=group, gradient=config.gradient, block=config.block),
                unsafe=True,
            )
    return model


@torch.no_grad()
def update_masks_(model: nn.Module) -> Tensor:
    """Re-select every unfrozen mask from the current dense weights; returns how many masks changed.

    The count is a 0-d int64 tensor on the masks' device: it runs inside the training step (every
    ``mask_update_every`` steps), where reading a comparison back per layer would stall CUDA once per layer.
    """
    groups: dict[str, list[tuple[nn.Module, WeightMask]]] = defaultdict(list)
    for _, module in model.named_modules():
        mask = state.weight_mask(module)
        if mask is not None and not mask.frozen:
            groups[mask.group].append((module, mask))
    flags: list[Tensor] = []
    for members in groups.values():
        sparsity, block = members[0][1].sparsity, members[0][1].block
        new = _compute_masks([(m, state.raw_weight(m)) for m, _ in members], sparsity, block)
        for (_, mask), new_mask in zip(members, new):
            flags.append((mask.mask != new_mask).any())  # on the device: torch.equal would read back to the host
            mask.mask.copy_(new_mask)
    return torch.stack(flags).sum() if flags else torch.zeros((), dtype=torch.int64)


def freeze_masks_(model: nn.Module) -> None:
    """Fix every mask: ``update_masks_`` leaves frozen masks alone."""
    for _, module in model.named_modules():
        mask = state.weight_mask(module)
        if mask is not None:
            mask.frozen = True
