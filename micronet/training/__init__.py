"""Training: batch streams, augmentation, distillation and the eight-stage compression pipeline (spec training.md).

Entry points: ``load_recipe`` → ``run_stage`` / ``run_all`` (what ``micronet train-stage`` calls),
``evaluate`` / ``evaluate_checkpoint`` (``micronet eval``), and ``projection_from_recipe`` →
``apply_projection`` (a recipe's compression on an untrained network, what ``micronet score --recipe`` scores).
"""

from micronet.training.augment import Augmentation, AugmentConfig, load_policy
from micronet.training.batches import BatchStream
from micronet.training.evaluate import evaluate, evaluate_checkpoint
from micronet.training.kd import KDConfig, kd_loss
from micronet.training.loop import TrainingDiverged
from micronet.training.projection import DEFAULT_RECIPE, Projection, apply_projection, projection_from_recipe
from micronet.training.recipe import Recipe, available_recipes, load_recipe
from micronet.training.stage_specs import STAGE_SPECS, STAGES, StageSettings, StageSpec
from micronet.training.stages import RunOptions, StageResult, run_all, run_stage

__all__ = [
    "DEFAULT_RECIPE", "STAGES", "STAGE_SPECS", "AugmentConfig", "Augmentation", "BatchStream",
    "KDConfig", "Projection", "Recipe", "RunOptions", "StageResult", "StageSettings", "StageSpec",
    "TrainingDiverged", "apply_projection", "available_recipes", "evaluate", "evaluate_checkpoint",
    "kd_loss", "load_policy", "load_recipe", "projection_from_recipe", "run_all", "run_stage",
]
