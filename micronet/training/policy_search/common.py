"""What both searches share: settings (and the resume check), split-model training, the any-of-V reward,
policy files and the per-trial log."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from micronet import io, models
from micronet.data import ImageSet, Normalization
from micronet.errors import MicronetError
from micronet.training.augment import Augmentation, AugmentConfig, AugmentPolicy, PolicyAugment, parse_policy
from micronet.training.batches import Augment, BatchStream, derive_seed
from micronet.training.loop import Runtime, StepContext, lr_at, prepare_input, train_epoch

METHODS = ("fastaa", "aws")
SAMPLERS = ("tpe", "random")
SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class SearchSettings:
    """Every size of a search. Two runs with equal settings (and data) produce the same policy."""

    method: str = "fastaa"
    sampler: str = "tpe"  # fastaa only: "tpe" (Fast AutoAugment) or "random" (the baseline)
    model: str = "wrn:depth=40,width=2"  # zoo name or FAMILY:key=value spec; Fast AA searched with WRN-40-2
    normalization: str = "fastaa"
    seed: int = 0
    # the model(s) that score policies
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    weight_decay: float = 5e-4
    crop_padding: int = 4  # the baseline augmentation: crop, flip, Cutout
    cutout: int = 16
    eval_batch_size: int = 500
    # Fast AutoAugment (paper/official defaults: K=5, D_A 40 %, B=200, T=2 rounds, N=10, 5 sub-policies x 2 ops)
    splits: int = 5
    holdout: float = 0.4
    trials: int = 200
    rounds: int = 2
    policies_per_trial: int = 5
    ops: int = 2
    top: int = 10
    views: int = 5
    startup_trials: int = 10  # TPE's random start-up trials
    # AWS AutoAugment
    loops: int = 50
    episodes: int = 8  # fine-tuned copies (sampled pairs) per PPO update
    finetune_epochs: int = 2  # reward: mean of the best 2 validation accuracies of the fine-tuning epochs
    finetune_lr: float = 0.01
    ppo_epochs: int = 10
    ppo_lr: float = 0.05
    clip: float = 0.2
    max_kl: float = 0.05  # early stop of the PPO steps once KL(old || new) exceeds this
    entropy_weight: float = 1e-5
    baseline_decay: float = 0.9
    keep: int = 0  # pairs written to the policy file, most probable first (0: all 1296)

    def validate(self) -> None:
        """One-line errors for impossible settings (checked before anything touches the disk)."""
        if self.method not in METHODS:
            raise MicronetError(f"unknown search method {self.method!r}; choose {', '.join(METHODS)}")
        if self.sampler not in SAMPLERS:
            raise MicronetError(f"unknown sampler {self.sampler!r}; choose {', '.join(SAMPLERS)}")
        positive = ("epochs", "batch_size", "eval_batch_size", "splits", "trials", "rounds", "policies_per_trial",
                    "ops", "top", "views", "loops", "episodes", "finetune_epochs", "ppo_epochs")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise MicronetError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("startup_trials", "keep", "crop_padding", "cutout", "weight_decay", "entropy_weight"):
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise MicronetError(f"--{name.replace('_', '-')} must not be negative")
        for name in ("lr", "finetune_lr", "ppo_lr", "clip", "max_kl"):
            if not getattr(self, name) > 0:
                raise MicronetError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 < self.holdout < 1:
            raise MicronetError(f"--holdout (the D_A fraction) must be in (0, 1), got {self.holdout}")
        if not 0 <= self.baseline_decay < 1:
            raise MicronetError(f"--baseline-decay must be in [0, 1), got {self.baseline_decay}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able data."""
        return dataclasses.asdict(self)


def open_search(out: Path, settings: SearchSettings, data_id: dict[str, Any], resume: bool) -> None:
    """Check that ``out`` can hold this search (new, or resumed with identical settings); then write the record.

    The check runs before anything is written, so a refused search leaves the disk as it was.
    """
    record = {"settings": settings.to_dict(), "data": data_id}
    path = out / SETTINGS_FILE
    if path.is_file():
        if not resume:
            raise MicronetError(f"{out} already holds a search; pass --resume to continue it or choose another --out")
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MicronetError(f"cannot read {path}: {exc}") from None
        if old != record:
            diff = sorted(k for k in {**old.get("settings", {}), **record["settings"]}
                          if old.get("settings", {}).get(k) != record["settings"].get(k))
            what = f"settings differ ({', '.join(diff)})" if diff else "the data differ"
            raise MicronetError(f"cannot resume {out}: {what}; resume with the original settings or use a new --out")
        return
    if resume:
        raise MicronetError(f"--resume: {out} holds no search to continue")
    if out.exists() and any(out.iterdir()):
        raise MicronetError(f"{out} exists and is not empty; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def data_identity(data: ImageSet) -> dict[str, Any]:
    """A cheap fingerprint of the data a search runs on (size, classes, pixel and label sums)."""
    return {"images": len(data), "classes": data.num_classes, "pixel_sum": int(data.images.sum(dtype=torch.int64)),
            "label_sum": int(data.labels.sum())}


def baseline_augmentation(settings: SearchSettings) -> Augmentation:
    """The baseline transforms every model and every scored view gets: pad-crop, flip, Cutout."""
    return Augmentation(AugmentConfig(policy=None, crop_padding=settings.crop_padding, flip=True,
                                      cutout=settings.cutout))


def with_policy(policy: AugmentPolicy | None, baseline: Augmentation | None) -> Augment | None:
    """``policy`` followed by the baseline transforms (as Fast AA's and AWS's training pipelines order them)."""
    apply = PolicyAugment(policy) if policy is not None else None
    if apply is None:
        return baseline
    if baseline is None:
        return apply

    def augment(x: Tensor, g: torch.Generator) -> Tensor:
        return baseline(apply(x, g), g)

    return augment


def make_policy(subpolicies: list[list[list]], name: str = "candidate",
                weights: list[float] | None = None) -> AugmentPolicy:
    """An AugmentPolicy from plain ``[[op, probability, level], ...]`` sub-policies (Fast-AA levels)."""
    obj: dict[str, Any] = {"levels": "fast-autoaugment", "policy": subpolicies}
    if weights is not None:
        obj["weights"] = weights
    return parse_policy(obj, name)


def train_model(spec: str | nn.Module, data: ImageSet, settings: SearchSettings, rt: Runtime, normalize: Normalization,
                augment: Augment | None, seed: int, *, epochs: int | None = None, lr: float | None = None,
                progress: bool = False, describe: str = "search",
                on_epoch: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Train ``spec`` (a zoo name/spec, or a model to continue) on ``data`` with SGD + cosine, as the stages do;
    ``on_epoch(model)`` runs after every epoch."""
    torch.manual_seed(seed)
    model = models.create(spec, num_classes=data.num_classes) if isinstance(spec, str) else spec
    model.to(rt.device).train()
    data_device = rt.device if rt.device.type == "cuda" else torch.device("cpu")
    stream = BatchStream(data.to(data_device), settings.batch_size, shuffle=True, augment=augment, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr or settings.lr, momentum=0.9, nesterov=True,
                                weight_decay=settings.weight_decay)
    epochs = epochs or settings.epochs
    total, peak = epochs * len(stream), lr or settings.lr

    def loss_fn(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        with rt.autocast():
            logits = model(x)
        return torch.nn.functional.cross_entropy(logits.float(), labels), logits

    ctx = StepContext(optimizer, loss_fn, params, lr=lambda s: lr_at(s, total, 0, peak, 0.0), progress=progress,
                      describe=describe)
    step = 0
    for epoch in range(epochs):
        _, step = train_epoch(stream, epoch, step, ctx, normalize, rt)
        if on_epoch is not None:
            on_epoch(model)
            model.train()
    return model.eval()


def _views_correct(model: nn.Module, data: ImageSet, augment: Augment | None, views: int, seed: int,
                   normalize: Normalization, rt: Runtime, batch_size: int) -> Tensor:
    """Per image: whether any of ``views`` augmented copies is classified correctly (bool, on the host)."""
    data_device = rt.device if rt.device.type == "cuda" else torch.device("cpu")
    stream = BatchStream(data.to(data_device), batch_size, shuffle=False)
    hits = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for k, (images, labels) in enumerate(stream.epoch(0)):
            hit = torch.zeros_like(labels, dtype=torch.bool, device=rt.device)
            labels = labels.to(rt.device)
            for v in range(views):
                # View v of batch k is the same draw whatever V is, so more views can only add hits.
                g = torch.Generator().manual_seed(derive_seed(seed, k, v))
                x = augment(images, g) if augment is not None else images
                with rt.autocast():
                    logits = model(prepare_input(x.to(rt.device), normalize, rt))
                hit |= logits.argmax(1) == labels
            hits.append(hit.cpu())
    model.train(was_training)
    return torch.cat(hits)


def any_of_views_accuracy(model: nn.Module, data: ImageSet, augment: Augment | None, views: int, seed: int,
                          normalize: Normalization, rt: Runtime, batch_size: int = 500) -> float:
    """Fast AutoAugment's reward: the fraction of images classified correctly in at least one of ``views``
    augmented copies (the official search's max over views), in [0, 1]."""
    return float(_views_correct(model, data, augment, views, seed, normalize, rt, batch_size).double().mean())


def save_model(path: Path, model: nn.Module, extra: dict[str, Any]) -> None:
    """Write a search model atomically (a resumed search loads it instead of training again)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    io.save(path, model, extra=extra)


def load_model(path: Path, rt: Runtime) -> nn.Module:
    """A model written by ``save_model``, on the runtime's device, in eval mode."""
    return io.load(path).model.to(rt.device).eval()


def append_log(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line (one trial or one loop)."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def write_policy(path: Path, subpolicies: list[list[list]], *, name: str, searched_on: str, metadata: dict[str, Any],
                 weights: list[float] | None = None) -> Path:
    """Write a policy JSON (object form: bare-list compatible ``policy`` plus provenance), atomically."""
    obj: dict[str, Any] = {"name": name, "description": f"searched by `micronet augment search` ({metadata['method']})",
                           "levels": "fast-autoaugment", "fill": "black", "searched_on": searched_on,
                           "metadata": metadata, "policy": subpolicies}
    if weights is not None:
        obj["weights"] = weights
    parse_policy(json.loads(json.dumps(obj)), name)  # what we write must load
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes sharing OUT (one per GPU) may race
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)
    return path


ProgressFn = Callable[[int], None]
