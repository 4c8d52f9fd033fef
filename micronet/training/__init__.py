"""Training: batch streams, augmentation, distillation and the eight-stage compression pipeline (spec training.md).

Entry points: ``load_recipe`` → ``run_stage`` / ``run_all`` (what ``micronet train-stage`` calls), and
``evaluate`` / ``evaluate_checkpoint`` (``micronet eval``).
"""

from micronet.training.augment import Augmentation, AugmentConfig, load_policy
from micronet.training.batches import BatchStream
from micronet.training.evaluate import evaluate, evaluate_checkpoint
from micronet.training.kd import KDConfig, kd_loss
from micronet.training.loop import TrainingDiverged
from micronet.training.recipe import STAGES, Recipe, StageConfig, available_recipes, load_recipe
from micronet.training.stages import RunOptions, StageResult, run_all, run_stage

__all__ = [
    "STAGES", "AugmentConfig", "Augmentation", "BatchStream", "KDConfig", "Recipe",
    "RunOptions", "StageConfig", "StageResult", "TrainingDiverged", "available_recipes", "evaluate",
    "evaluate_checkpoint", "kd_loss", "load_policy", "load_recipe", "run_all", "run_stage",
]
