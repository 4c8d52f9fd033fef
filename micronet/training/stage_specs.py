"""One frozen spec per pipeline stage: its settings (keys, defaults, validation), what it compresses and trains.

The stage runner (``training/stages.py``), the recipe parser (``training/recipe.py``) and the recipe
projection (``training/projection.py``) all read ``STAGE_SPECS``; nothing else keys behaviour on a stage name.
Settings that configure compression are validated by building the ``compress`` config they become
(``SparsityConfig``, ``QuantConfig``), so bit widths and sparsities are checked in exactly one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from micronet import compress
from micronet.compress import state
from micronet.errors import MicronetError
from micronet.models import is_gated
from micronet.training.kd import KDConfig
from micronet.training.skip_rl import RL_REDUCTIONS, policy_gradient_loss

#: ``calibration(count)`` returns ``count`` input batches (training images in a stage, noise in a projection).
Calibration = Callable[[int], list[Tensor]]
#: A per-step hook ``(global step, batch index within the epoch)`` run before each optimizer step.
StepHook = Callable[[int, int], None]


@dataclass(frozen=True)
class StageSettings:
    """Settings every stage has."""

    batch_size: int = 64

    def check(self, stage: str) -> None:
        """Raise a MicronetError (message without location) if the settings are unusable for ``stage``."""
        if self.batch_size < 1:
            raise MicronetError(f"batch_size must be positive, got {self.batch_size}")

    @property
    def uses_teacher(self) -> bool:
        """Whether the stage distils from a teacher checkpoint."""
        return False

    def compress_(self, model: nn.Module, kind: str | None, calibration: Calibration, *,
                  progress: bool = False) -> None:
        """Attach what the stage adds to ``model`` (run once when the stage starts, not on resume)."""

    def step_hook(self, model: nn.Module, kind: str | None) -> StepHook | None:
        """Per-step compression maintenance, or None."""
        return None

    def summary(self, kind: str | None) -> str:
        """What the stage's compression is, in a few words ('' for none)."""
        return ""

    def auxiliary_loss(self, model: nn.Module, logits: Tensor, labels: Tensor) -> Tensor | None:
        """A term the stage adds to its task loss after each forward (None: nothing)."""
        return None


@dataclass(frozen=True)
class TrainSettings(StageSettings):
    """Optimisation settings of every training stage (teacher, student and the compression stages)."""

    epochs: int = 1
    lr: float = 0.1
    warmup_epochs: float = 0.0
    warmup_start_lr: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    grad_clip: float | None = None  # global L2 norm; None = off
    loss: str = "ce"  # "ce" | "kd"
    kd: KDConfig = field(default_factory=KDConfig)
    label_smoothing: float = 0.0
    teacher_bn: str = "eval"  # "train" reproduces the winner's teacher (batch statistics, spec §1.6)
    gate_penalty: float = 0.0  # SkipNet: weight of the executed-gates penalty (spec §2.6)
    select: str = "last"  # "last" epoch or "best" on the held-out split

    @property
    def uses_teacher(self) -> bool:
        """Whether the stage distils from a teacher checkpoint."""
        return self.loss == "kd"

    def check(self, stage: str) -> None:
        """Raise a MicronetError (message without location) if the settings are unusable for ``stage``."""
        super().check(stage)

        def bad(msg: str) -> None:
            raise MicronetError(msg)

        if self.epochs < 1:
            bad(f"epochs must be at least 1, got {self.epochs}")
        if self.lr <= 0 or self.warmup_start_lr < 0:
            bad(f"lr must be positive and warmup_start_lr non-negative, got {self.lr} and {self.warmup_start_lr}")
        if not 0 <= self.warmup_epochs < self.epochs:
            bad(f"warmup_epochs ({self.warmup_epochs:g}) must be in [0, epochs) with epochs = {self.epochs}")
        if not 0 <= self.momentum < 1 or (self.nesterov and self.momentum == 0):
            bad(f"momentum must be in [0, 1) and positive with nesterov, got {self.momentum}")
        if self.weight_decay < 0 or (self.grad_clip is not None and self.grad_clip <= 0):
            bad("weight_decay must be non-negative and grad_clip positive (or null)")
        if self.loss not in ("ce", "kd"):
            bad(f"loss must be 'ce' or 'kd', got {self.loss!r}")
        if stage == "teacher" and self.loss == "kd":
            bad("the teacher stage cannot distil from itself; use loss: ce")
        if self.teacher_bn not in ("eval", "train"):
            bad(f"teacher_bn must be 'eval' or 'train', got {self.teacher_bn!r}")
        if self.select not in ("last", "best"):
            bad(f"select must be 'last' or 'best', got {self.select!r}")
        if not 0 <= self.label_smoothing < 1 or self.gate_penalty < 0:
            bad("label_smoothing must be in [0, 1) and gate_penalty non-negative")


@dataclass(frozen=True)
class PruneSettings(TrainSettings):
    """A pruning stage: magnitude masks on its layers, refreshed every N steps for a while, then frozen."""

    sparsity: float = 0.0
    scope: str = "global"
    mask_gradient: str = "dense"
    block: tuple[int, int] | None = None  # prune (out, in) channel blocks instead of single weights
    mask_update_every: int = 0  # re-select masks every N steps ...
    mask_update_until: int = 0  # ... while the stage's step counter is below this, then freeze them

    def sparsity_config(self, kind: str) -> compress.SparsityConfig:
        """The ``prune_`` config this stage applies to layers of ``kind``."""
        return compress.SparsityConfig(self.sparsity, scope=self.scope, kinds=(kind,), gradient=self.mask_gradient,
                                       block=self.block)

    def check(self, stage: str) -> None:
        """Raise a MicronetError (message without location) if the settings are unusable for ``stage``."""
        super().check(stage)
        self.sparsity_config("conv")  # sparsity, scope, gradient and block are checked by SparsityConfig
        if self.sparsity == 0:
            raise MicronetError("sparsity must be in (0, 1) for a pruning stage, got 0")
        every, until = self.mask_update_every, self.mask_update_until
        if every < 0 or until < 0 or (until and not every):
            raise MicronetError("mask_update_until needs a positive mask_update_every (both non-negative)")

    def compress_(self, model: nn.Module, kind: str | None, calibration: Calibration, *,
                  progress: bool = False) -> None:
        """Mask the stage's layers; earlier masks are frozen first, so only this stage's may be refreshed."""
        compress.freeze_masks_(model)
        compress.prune_(model, self.sparsity_config(kind))
        if not self.mask_update_until:
            compress.freeze_masks_(model)

    def step_hook(self, model: nn.Module, kind: str | None) -> StepHook | None:
        """Refresh the masks every ``mask_update_every`` steps, freeze them at ``mask_update_until``."""
        until, every = self.mask_update_until, self.mask_update_every
        if not until:
            return None

        def refresh_masks(step: int, batch: int) -> None:
            if step == until or (batch == 0 and step > until):
                compress.freeze_masks_(model)  # (re-checked at each epoch start: a resumed run may start later)
            elif 0 < step < until and step % every == 0:
                compress.update_masks_(model)

        return refresh_masks

    def summary(self, kind: str | None) -> str:
        """What the stage's compression is, in a few words."""
        block = f", {self.block[0]}x{self.block[1]} blocks" if self.block else ""
        return f"{kind} sparsity {self.sparsity:.0%} ({self.scope}{block}, {self.mask_gradient} mask gradient)"


@dataclass(frozen=True)
class ActQuantSettings(TrainSettings):
    """The activation-quantization stage: input quantizers on the convs, calibrated on training batches."""

    act_bits: int = 4
    act_calibration: str = "max"
    calibration_batches: int = 1

    def quant_config(self) -> compress.QuantConfig:
        """The ``quantize_`` config this stage applies."""
        return compress.QuantConfig(weight_bits=None, act_bits=self.act_bits, act_calibration=self.act_calibration)

    def check(self, stage: str) -> None:
        """Raise a MicronetError (message without location) if the settings are unusable for ``stage``."""
        super().check(stage)
        self.quant_config()  # bits and calibration method are checked by QuantConfig
        if self.calibration_batches < 1:
            raise MicronetError(f"calibration_batches must be positive, got {self.calibration_batches}")

    def compress_(self, model: nn.Module, kind: str | None, calibration: Calibration, *,
                  progress: bool = False) -> None:
        """Attach and calibrate the activation quantizers; every mask is fixed from here on."""
        compress.freeze_masks_(model)
        compress.quantize_(model, self.quant_config(), calibration(self.calibration_batches), progress=progress)

    def summary(self, kind: str | None) -> str:
        """What the stage's compression is, in a few words."""
        return f"activations {self.act_bits}-bit ({self.act_calibration} calibration)"


@dataclass(frozen=True)
class WeightQuantSettings(TrainSettings):
    """A weight-quantization stage: least-squares-scaled weight quantizers on its layers, refitted as set."""

    weight_bits: int = 4
    per_channel: bool = True
    weight_refit: str = "epoch"  # least-squares scale refit: "epoch" (winner), "step" or "never"

    def quant_config(self, kind: str) -> compress.QuantConfig:
        """The ``quantize_`` config this stage applies to layers of ``kind``."""
        bits = {"conv": {"weight_bits": self.weight_bits}, "fc": {"weight_bits": None,
                                                                   "fc_weight_bits": self.weight_bits}}[kind]
        return compress.QuantConfig(**bits, act_bits=None, per_channel=self.per_channel,
                                    weight_refit=self.weight_refit)

    def check(self, stage: str) -> None:
        """Raise a MicronetError (message without location) if the settings are unusable for ``stage``."""
        super().check(stage)
        self.quant_config("conv")  # bits and refit schedule are checked by QuantConfig

    def compress_(self, model: nn.Module, kind: str | None, calibration: Calibration, *,
                  progress: bool = False) -> None:
        """Attach the weight quantizers (masks fixed first, so quantized zeros stay the pruned ones)."""
        compress.freeze_masks_(model)
        compress.quantize_(model, self.quant_config(kind))

    def step_hook(self, model: nn.Module, kind: str | None) -> StepHook | None:
        """Refit the weight scales at every step, or at each epoch's first step (the winner's rule)."""
        if self.weight_refit == "never":
            return None
        layers = [m for _, m in state.select_layers(model, (kind,))]

        def refit_scales(step: int, batch: int) -> None:
            if self.weight_refit == "step" or batch == 0:
                for layer in layers:
                    compress.refit_weight_scales_(layer)

        return refit_scales

    def summary(self, kind: str | None) -> str:
        """What the stage's compression is, in a few words."""
        grain = "per-channel" if self.per_channel else "per-tensor"
        return f"{kind} weights {self.weight_bits}-bit ({grain}, refit {self.weight_refit})"


@dataclass(frozen=True)
class SkipRLSettings(TrainSettings):
    """SkipNet's hybrid RL stage: task loss + rl_weight · REINFORCE on Bernoulli-sampled gates (skip_rl.py).

    Defaults from the official SkipNet code (``cifar/train_rl.py``): alpha 0.1, rl_weight 0.01, gamma 1,
    SGD lr 1e-4, momentum 0.9, weight decay 1e-4, and the RL term summed over the batch (``rl_reduction``
    "sum": its ``action.reinforce`` next to a mean CE; "mean" is the PyramidNet entry's, batch-size times
    weaker at the same rl_weight). ``alpha`` is the compute-accuracy knob: the reward per skipped block is
    alpha / number of gates, against a final reward of -CE per image.
    """

    lr: float = 1e-4
    weight_decay: float = 1e-4
    alpha: float = 0.1
    rl_weight: float = 0.01
    gamma: float = 1.0
    rl_reduction: str = "sum"  # over the batch's images: "sum" (official SkipNet) or "mean" (PyramidNet entry)

    def check(self, stage: str) -> None:
        """Raise a MicronetError (message without location) if the settings are unusable for ``stage``."""
        super().check(stage)
        if not (math.isfinite(self.alpha) and math.isfinite(self.rl_weight)):
            raise MicronetError(f"alpha and rl_weight must be finite numbers, got {self.alpha} and {self.rl_weight}")
        if self.rl_reduction not in RL_REDUCTIONS:
            raise MicronetError(f"rl_reduction must be one of {', '.join(RL_REDUCTIONS)}, got {self.rl_reduction!r}")
        if self.alpha < 0:
            raise MicronetError(f"alpha (the reward per skipped block) must be non-negative, got {self.alpha}")
        if self.rl_weight < 0 or not 0 <= self.gamma <= 1:
            raise MicronetError(f"rl_weight must be non-negative and gamma in [0, 1], got {self.rl_weight} "
                                f"and {self.gamma}")

    def auxiliary_loss(self, model: nn.Module, logits: Tensor, labels: Tensor) -> Tensor | None:
        """rl_weight · L_RL of the last forward's gate samples, rewarded by each image's -CE."""
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        probs, actions = torch.stack(model.gate_probs).float(), torch.stack(model.gate_masks).float()
        return self.rl_weight * policy_gradient_loss(probs, actions, ce, self.alpha, self.gamma,
                                                     reduction=self.rl_reduction)

    def summary(self, kind: str | None) -> str:
        """What the stage does, in a few words."""
        return (f"SkipNet hybrid RL (alpha {self.alpha:g}, rl_weight {self.rl_weight:g} on the batch "
                f"{self.rl_reduction}, gamma {self.gamma:g})")


@dataclass(frozen=True)
class BNRecalSettings(StageSettings):
    """The BatchNorm-recalibration stage: forward passes only, a cumulative average over its batches.

    Its length is ``passes`` over the training split (default 1: what the winner did in data terms, one
    forward epoch over the augmented training set, spec training.md §3.6; its 700 batches of 64 = 44,800 images
    are one pass over the 45,000-image split), or an explicit ``batches`` count. ``--epochs N`` scales it by
    N / (the recipe's epochs of the stage before it), so it keeps its size relative to the training stages
    (the 2019 recipe's one pass after 300 epochs becomes 1/300 pass, 3 batches, under ``--epochs 1``)."""

    passes: float = 1.0
    batches: int = 0  # an explicit batch count instead of ``passes`` (0: from passes)
    epochs_follow_previous: ClassVar[bool] = True  # --epochs rescales instead of setting (recipe.apply_overrides)

    def batch_count(self, images: int) -> int:
        """Batches the stage runs for a training split of ``images`` images (at least one)."""
        return self.batches or max(1, math.ceil(self.passes * images / self.batch_size))

    def check(self, stage: str) -> None:
        """Raise a MicronetError (message without location) if the settings are unusable for ``stage``."""
        super().check(stage)
        if self.batches < 0 or self.passes <= 0:
            raise MicronetError(f"passes must be positive and batches non-negative, got {self.passes} and "
                                f"{self.batches}")


@dataclass(frozen=True)
class StageSpec:
    """What one stage is: its settings class (keys, defaults, validation), its layers, what it trains."""

    name: str
    settings: type[StageSettings]
    layers: str | None = None  # the layer kind it compresses (compress.state.LAYER_KINDS), if any
    trains: str = "all"  # "all"; "classifier" (the rest frozen, BN in eval mode); "bn-statistics" (no optimizer)
    from_scratch: bool = False  # builds a fresh model instead of starting from the previous stage
    amp: bool = False  # bf16 autocast allowed for the student
    gates: str | None = None  # gate stages: "threshold" (hard gates, straight-through) or "sample" (Bernoulli)

    def check_model(self, model: nn.Module) -> None:
        """Raise a MicronetError if this stage cannot train ``model`` (a gate stage needs a gated model)."""
        if self.gates is not None and not is_gated(model):
            raise MicronetError(f"stage {self.name!r} trains SkipNet gates, but {type(model).__name__} has none "
                                "(use a gated model such as pyramidskipnet272_a200)")

    @property
    def compresses(self) -> bool:
        """Whether the stage adds compression to the model."""
        return self.settings.compress_ is not StageSettings.compress_

    def compress_(self, model: nn.Module, settings: StageSettings, calibration: Calibration, *,
                  progress: bool = False) -> None:
        """Attach this stage's compression to ``model`` with ``settings`` (``progress``: calibration bars)."""
        settings.compress_(model, self.layers, calibration, progress=progress)

    def step_hook(self, model: nn.Module, settings: StageSettings) -> StepHook | None:
        """This stage's per-step compression maintenance, or None."""
        return settings.step_hook(model, self.layers)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters the stage optimises; classifier stages freeze everything else (``requires_grad_``)."""
        if self.trains == "classifier":
            name = state.classifier_name(model)
            if name is None:
                raise MicronetError(f"stage {self.name!r} trains the classifier, but the model has none")
            model.requires_grad_(False)
            model.get_submodule(name).requires_grad_(True)
        return [p for p in model.parameters() if p.requires_grad]

    def set_mode(self, model: nn.Module) -> None:
        """Train mode, except classifier stages keep the backbone as recalibrated (BN on running statistics);
        gates sample only in a "sample" stage (elsewhere hard gates, straight-through in training)."""
        model.train(self.trains != "classifier")
        if is_gated(model):
            model.gate_sampling = self.gates == "sample"

    def summary(self, settings: StageSettings) -> str:
        """What this stage compresses with ``settings``, in a few words."""
        return settings.summary(self.layers)


# bf16 autocast only where the student is still a float network (spec training.md §6): in the quantized stages
# bf16 activations would be rounded to 8 significant bits before the quantizer decides its rounding.
# skip-rl follows pruning (the PyramidNet entry applied RL to the pruned network, spec §2.6) and precedes
# quantization, whose stages then fine-tune with hard (straight-through) gates.
STAGE_SPECS: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("teacher", TrainSettings, from_scratch=True, amp=True),
    StageSpec("student", TrainSettings, from_scratch=True, amp=True),
    StageSpec("skip-sp", TrainSettings, from_scratch=True, amp=True, gates="threshold"),
    StageSpec("prune", PruneSettings, layers="conv", amp=True),
    StageSpec("skip-rl", SkipRLSettings, amp=True, gates="sample"),
    StageSpec("quant-act", ActQuantSettings, layers="conv"),
    StageSpec("quant-weight", WeightQuantSettings, layers="conv"),
    StageSpec("bn-recal", BNRecalSettings, trains="bn-statistics"),
    StageSpec("prune-fc", PruneSettings, layers="fc", trains="classifier"),
    StageSpec("quant-fc", WeightQuantSettings, layers="fc", trains="classifier"),
)}
#: The stages in pipeline order (the CLI's choices).
STAGES = tuple(STAGE_SPECS)
FROM_SCRATCH = tuple(name for name, spec in STAGE_SPECS.items() if spec.from_scratch)
#: Each stage's slot in the seed derivation: fixed, so adding a stage never changes another's random streams.
SEED_INDEX = {name: i for i, name in enumerate(("teacher", "student", "prune", "quant-act", "quant-weight", "bn-recal",
                                                "prune-fc", "quant-fc", "skip-sp", "skip-rl"))}
