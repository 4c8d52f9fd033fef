"""Projection: apply a recipe's compression to an *untrained* network, to see the score it would reach.

The score depends on the structure of the compression (which layers, how sparse, how many bits), not
on trained values, except through where the global pruning budget lands. Applying the recipe's pruning
and quantization to freshly initialised weights therefore predicts the final score closely; the report
says plainly that it is a projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from micronet.errors import MicronetError

DEFAULT_RECIPE = "micronet2019-densenet"


@dataclass(frozen=True)
class Projection:
    """The compression a recipe applies, in the terms ``prune_``/``quantize_`` take."""

    conv_sparsity: float = 0.75
    conv_scope: str = "global"
    act_bits: int | None = 4
    weight_bits: int | None = 4
    fc_sparsity: float = 0.5
    fc_scope: str = "layer"
    fc_weight_bits: int | None = 4
    source: str = "built-in 2019 recipe (75% global conv sparsity, 4-bit weights/activations, FC 50% / 4-bit)"

    def describe(self) -> str:
        """One line: what was applied."""
        return (
            f"projection of {self.source}: conv sparsity {self.conv_sparsity:.0%} ({self.conv_scope}), "
            f"weights {self.weight_bits}-bit, activations {self.act_bits}-bit, FC sparsity "
            f"{self.fc_sparsity:.0%}, FC weights {self.fc_weight_bits}-bit, applied to untrained weights"
        )


def projection_from_recipe(recipe: str | None = None) -> Projection:
    """Read a recipe (file or shipped name) into a Projection; None = the shipped 2019 recipe."""
    try:
        from micronet.training.recipe import load_recipe
    except ImportError:
        if recipe is not None:
            raise MicronetError("--recipe needs micronet.training.recipe, which this build lacks") from None
        return Projection()
    try:
        r = load_recipe(recipe or DEFAULT_RECIPE)
    except MicronetError:
        if recipe is not None:
            raise
        return Projection()
    stages = r.stages

    def get(stage: str, key: str, default):
        return getattr(stages[stage], key) if stage in stages else default

    return Projection(
        conv_sparsity=get("prune", "sparsity", 0.0),
        conv_scope=get("prune", "scope", "global"),
        act_bits=get("quant-act", "act_bits", None),
        weight_bits=get("quant-weight", "weight_bits", None),
        fc_sparsity=get("prune-fc", "sparsity", 0.0),
        fc_scope=get("prune-fc", "scope", "layer"),
        fc_weight_bits=get("quant-fc", "weight_bits", None),
        source=f"recipe {r.name}",
    )


def apply_projection(
    model: nn.Module, projection: Projection, *, input_size: int = 32, seed: int = 0
) -> nn.Module:
    """Prune and quantize ``model`` in place as the recipe would; activation steps calibrated on noise."""
    from micronet.compress import QuantConfig, SparsityConfig, prune_, quantize_

    if projection.conv_sparsity > 0:
        prune_(model, SparsityConfig(sparsity=projection.conv_sparsity, scope=projection.conv_scope))
    if projection.weight_bits is not None or projection.act_bits is not None:
        gen = torch.Generator().manual_seed(seed)
        batch = torch.randn(8, 3, input_size, input_size, generator=gen)
        quantize_(
            model,
            QuantConfig(weight_bits=projection.weight_bits, act_bits=projection.act_bits),
            calibration_data=batch,
        )
    if projection.fc_sparsity > 0:
        prune_(
            model, SparsityConfig(sparsity=projection.fc_sparsity, scope=projection.fc_scope, kinds=("fc",))
        )
    if projection.fc_weight_bits is not None:
        quantize_(
            model, QuantConfig(weight_bits=None, act_bits=None, fc_weight_bits=projection.fc_weight_bits)
        )
    return model.eval()
