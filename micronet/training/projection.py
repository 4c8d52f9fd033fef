"""Projection: apply a recipe's compression to an *untrained* network, to see the score it would reach.

The score depends on the structure of the compression (which layers, how sparse, how many bits), not
on trained values, except through where the global pruning budget lands. Applying the recipe's stages
to freshly initialised weights therefore predicts the final score closely; the report says plainly that
it is a projection. Each stage is applied by its own spec (``stage_specs.STAGE_SPECS``), with exactly the
settings the real stage would use, so the projected model has the compression layout of a trained one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from micronet import compress
from micronet.training.recipe import load_recipe
from micronet.training.stage_specs import STAGE_SPECS, StageSettings

DEFAULT_RECIPE = "micronet2019-densenet"


@dataclass(frozen=True)
class Projection:
    """The compressing stages of a recipe, in pipeline order, with their validated settings."""

    stages: tuple[tuple[str, StageSettings], ...]
    source: str

    def describe(self) -> str:
        """One line: what was applied."""
        applied = "; ".join(STAGE_SPECS[name].summary(settings) for name, settings in self.stages) or "nothing"
        return f"projection of {self.source}: {applied}; applied to untrained weights"


def projection_from_recipe(recipe: str | Path | None = None) -> Projection:
    """The compression stages of a recipe (file or shipped name); None = the shipped 2019 recipe."""
    r = load_recipe(recipe if recipe is not None else DEFAULT_RECIPE)
    stages = tuple((name, r.stages[name]) for name in r.chain if STAGE_SPECS[name].compresses)
    return Projection(stages, f"recipe {r.name}")


def apply_projection(model: nn.Module, projection: Projection, *, input_size: int = 32, seed: int = 0) -> nn.Module:
    """Compress ``model`` in place as the recipe's stages would; activation steps calibrated on noise."""
    generator = torch.Generator().manual_seed(seed)

    def noise(count: int) -> list[Tensor]:
        return [torch.randn(8, 3, input_size, input_size, generator=generator) for _ in range(count)]

    for name, settings in projection.stages:
        STAGE_SPECS[name].compress_(model, settings, noise)
        # A finished stage has frozen its masks: the refresh window (mask_update_until) ends within the stage.
        compress.freeze_masks_(model)
    return model.eval()
