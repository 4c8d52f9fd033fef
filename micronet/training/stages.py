"""The stages of the compression pipeline (and SkipNet's two) (spec training.md §3) and the drivers that run them.

=============  ==============================  ==========================================================
stage          starts from                     what it does
=============  ==============================  ==========================================================
teacher        scratch (``teacher_model``)     CE training
student        scratch (``model``)             CE training
skip-sp        scratch (a gated ``model``)     SkipNet supervised pre-training: hard gates, straight-through
prune          student (or skip-sp)            conv masks by magnitude (refreshed, then frozen), KD
skip-rl        skip-sp or prune                SkipNet hybrid RL: sampled gates, CE + rl_weight·REINFORCE
quant-act      prune                           activation quantizers calibrated on training batches, KD
quant-weight   quant-act                       conv weight quantizers (least-squares scales), KD
bn-recal       quant-weight                    BatchNorm statistics re-estimated; nothing else changes
prune-fc       bn-recal                        FC mask; backbone frozen and in eval mode, KD
quant-fc       prune-fc                        FC weight quantizer; backbone frozen and in eval mode, KD
=============  ==============================  ==========================================================

A stage reads the previous stage's checkpoint (``--from``) and, for KD, the teacher's; it writes
``OUT/<stage>.safetensors`` after every epoch (atomically, with optimizer and RNG state for
``--resume``) and once more when done (``complete``), plus ``OUT/<stage>.jsonl``. Only rank 0 writes.
What each stage compresses, trains and accepts is its spec in ``training/stage_specs.py``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from micronet import compress, models
from micronet import io as mio
from micronet.data import (
    TRAIN_STATS,
    ImageSet,
    Normalization,
    detect_layout,
    get_normalization,
    load_dataset,
    normalization_record,
    train_stats,
    training_split,
)
from micronet.errors import MicronetError
from micronet.training import provenance
from micronet.training.augment import build_augmentation
from micronet.training.batches import BatchStream, derive_seed
from micronet.training.kd import cross_entropy, kd_loss
from micronet.training.loop import (
    MetricsLog,
    Runtime,
    StepContext,
    accuracy_sums,
    check_training_state,
    gate_statistics,
    lr_at,
    prepare_input,
    restore_state,
    resume_state,
    setup_runtime,
    summarize,
    train_epoch,
)
from micronet.training.recipe import Recipe
from micronet.training.stage_specs import SEED_INDEX, STAGE_SPECS, StageSettings, TrainSettings


@dataclass
class RunOptions:
    """Everything about a run that is not a recipe setting: paths, device, logging, test hooks."""

    data_root: Path
    out: Path
    init_from: Path | None = None  # --from: the previous stage's checkpoint
    teacher: Path | None = None  # --teacher: the distillation teacher's checkpoint
    resume: bool = False
    overwrite: bool = False  # replace a finished checkpoint (kept as STAGE.prev.safetensors until the new one is done)
    rerun_from: str | None = None  # run_all: recompute this stage and every later one
    device: str = "auto"
    amp: bool | None = None  # None: bf16 autocast on CUDA
    channels_last: bool | None = None  # None: on CUDA
    compile: bool = False
    num_workers: int = 0  # CPU DataLoader workers (data on a GPU is augmented there, without workers)
    download: bool = False
    tensorboard: bool = False
    progress: bool = True
    eval_batch_size: int = 500
    after_step: Callable[[int, nn.Module], None] | None = None  # (global step, model) after every optimizer step
    # Checks (make gpu-check): host syncs in a CUDA training step raise; reproducible kernels for bit-identical
    # resumes; a process group (DDP, NCCL on CUDA) even at world size 1.
    sync_debug: str | None = None  # "error" | "warn": torch.cuda.set_sync_debug_mode inside each training step
    deterministic: bool = False
    process_group: bool = False


@dataclass
class StageResult:
    """Where a stage's checkpoint is and what it measured."""

    stage: str
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False
    model: nn.Module | None = field(default=None, repr=False)  # the trained model (None when skipped)


@dataclass
class Splits:
    """Training images, the held-out validation split (model selection) and the test set (reported only)."""

    train: ImageSet
    val: ImageSet | None
    test: ImageSet
    dataset: str


# ----------------------------------------------------------------------------------------------- inputs
def load_splits(recipe: Recipe, options: RunOptions) -> Splits:
    """Load train/test under the data root and hold out the recipe's validation split."""

    dataset = recipe.dataset
    if options.download:  # only an explicit CIFAR layout can be downloaded; auto means the challenge's
        dataset = "cifar100" if dataset == "auto" else dataset
        load_dataset(options.data_root, "test", dataset, download=True)
    layout = detect_layout(options.data_root, dataset)  # fails early, saying what was expected
    train, val = training_split(options.data_root, layout, subsample_to=recipe.subsample,
                                subsample_seed=recipe.subsample_seed, holdout=recipe.holdout,
                                holdout_seed=recipe.holdout_seed, download=options.download)
    test = load_dataset(options.data_root, "test", layout)
    if train.num_classes != test.num_classes:
        raise MicronetError(f"{options.data_root}: train has {train.num_classes} classes but test {test.num_classes}")
    return Splits(train, val, test, layout)


def stage_normalization(recipe: Recipe, splits: Splits) -> Normalization:
    """The recipe's preset, or ``train-stats`` computed on the images the stage trains on (never val/test)."""
    return train_stats(splits.train.images) if recipe.normalization == TRAIN_STATS \
        else get_normalization(recipe.normalization)


def _canonical_model(spec: str, num_classes: int, stage: str | None = None) -> str:
    with torch.device("meta"):  # shapes only: checking a name costs nothing even for big models
        model = models.create(spec, num_classes=num_classes)
    if stage is not None:
        STAGE_SPECS[stage].check_model(model)  # e.g. a gate stage on a model without gates
    return model.micronet_spec["name"]


def _check_input_checkpoint(path: Path, *, role: str, stage: str, expect_stage: str | None, model: str | None,
                            num_classes: int) -> None:
    info = mio.read_header(path)
    history = info["history"]
    last = history[-1] if history else {}
    if expect_stage is not None and last.get("stage") != expect_stage:
        raise MicronetError(f"{role} {path} was written by stage {last.get('stage', 'none')!r}; stage {stage!r} "
                            f"starts from a {expect_stage!r} checkpoint")
    if last and not last.get("complete", True):
        raise MicronetError(f"{role} {path} is an unfinished {last.get('stage')!r} checkpoint; finish it first "
                            "(train-stage ... --resume)")
    spec = info["model"]
    if spec.get("num_classes") != num_classes:
        raise MicronetError(f"{role} {path} predicts {spec.get('num_classes')} classes but the dataset has "
                            f"{num_classes}")
    if model is not None and spec.get("name") != _canonical_model(model, num_classes):
        raise MicronetError(f"{role} {path} holds {spec.get('name')!r}, but the recipe trains {model!r} "
                            "(pass --model to match, or the right --from)")


stage_status = provenance.stage_status


def _expected_provenance(stage: str, recipe: Recipe, splits: Splits, data: provenance.DataIdentity,
                         init_from: Path | None, teacher: Path | None) -> dict[str, Any]:
    num_classes = splits.train.num_classes
    return provenance.stage_provenance(
        stage, recipe, model=_canonical_model(recipe.model_for(stage), num_classes), num_classes=num_classes,
        data=data, init_from=None if STAGE_SPECS[stage].from_scratch else init_from,
        teacher=teacher if recipe.stage(stage).uses_teacher else None)


# ----------------------------------------------------------------------------------------------- stage semantics
def _loss_function(cfg: TrainSettings, forward: nn.Module, model: nn.Module, teacher: nn.Module | None,
                   rt: Runtime, stage: str) -> Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]:
    student_amp = STAGE_SPECS[stage].amp

    def loss_fn(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        with rt.autocast(enabled=student_amp):
            logits = forward(x)
        if cfg.loss == "kd":
            assert teacher is not None
            with torch.no_grad(), rt.autocast():
                teacher_logits = teacher(x)
            loss = kd_loss(logits, teacher_logits, labels, cfg.kd)
        else:
            loss = cross_entropy(logits, labels, cfg.label_smoothing)
        if cfg.gate_penalty:
            loss = loss + cfg.gate_penalty * model.gate_penalty()
        extra = cfg.auxiliary_loss(model, logits, labels)
        if extra is not None:
            loss = loss + extra
        return loss, logits

    return loss_fn


def _load_teacher(path: Path, cfg: TrainSettings, rt: Runtime) -> nn.Module:
    teacher = mio.load(path).model.to(rt.device)
    if rt.channels_last:
        teacher = teacher.to(memory_format=torch.channels_last)
    teacher.requires_grad_(False)
    teacher.train(cfg.teacher_bn == "train")  # "train": the winner's batch-statistics teacher (spec §1.6)
    return teacher


# ----------------------------------------------------------------------------------------------- one stage
def _runtime(options: RunOptions) -> Runtime:
    """The runtime ``options`` ask for."""
    return setup_runtime(options.device, amp=options.amp, channels_last=options.channels_last,
                         compile=options.compile, deterministic=options.deterministic,
                         process_group=options.process_group)


def run_stage(stage: str, recipe: Recipe, options: RunOptions, rt: Runtime | None = None,
              splits: Splits | None = None) -> StageResult:
    """Run one stage of ``recipe``: validate inputs, build or resume the model, train, evaluate, save.

    An existing checkpoint is resumed or reused only with ``resume`` and a matching provenance, and replaced
    only with ``overwrite`` (training/provenance.py)."""
    cfg = recipe.stage(stage)
    rt = rt or _runtime(options)
    path = Path(options.out) / f"{stage}.safetensors"

    # Everything that can be wrong with the inputs is checked before any training.
    splits = splits or load_splits(recipe, options)
    num_classes = splits.train.num_classes
    model_spec = recipe.model_for(stage)
    _canonical_model(model_spec, num_classes, stage)  # unknown model names (and gate stages on plain ones) fail here
    resuming = options.resume and path.exists() and not options.overwrite
    if resuming:
        written_by = mio.read_header(path)["extra"].get("training", {}).get("stage")
        if written_by != stage:
            raise MicronetError(f"--resume: {path} was written by stage {written_by!r}, not {stage!r}")
    if not resuming and not STAGE_SPECS[stage].from_scratch:
        previous = recipe.previous(stage)
        if options.init_from is None:
            raise MicronetError(f"stage {stage!r} starts from a {previous or 'previous-stage'!r} checkpoint: "
                                "pass --from FILE (or run `train-stage all`)")
        _check_input_checkpoint(Path(options.init_from), role="--from", stage=stage, expect_stage=previous,
                                model=model_spec, num_classes=num_classes)
    if cfg.uses_teacher:
        if options.teacher is None:
            raise MicronetError(f"stage {stage!r} distils from a teacher: pass --teacher FILE (or run "
                                "`train-stage all` with a teacher stage), or set loss: ce")
        _check_input_checkpoint(Path(options.teacher), role="--teacher", stage=stage, expect_stage=None,
                                model=None, num_classes=num_classes)
    data = provenance.DataIdentity.of(splits.dataset, splits.train, splits.val, splits.test)
    expected = _expected_provenance(stage, recipe, splits, data, options.init_from, options.teacher)
    action = provenance.decide(path, expected, resume=options.resume, overwrite=options.overwrite,
                               previous=recipe.previous(stage))
    if action == "reuse":
        return StageResult(stage, path, mio.read_header(path)["extra"].get("metrics", {}), skipped=True)
    if rt.is_main:
        if action == "fresh":
            provenance.set_aside(path)  # an --overwrite'n checkpoint waits as STAGE.prev until this one is done
        path.parent.mkdir(parents=True, exist_ok=True)
    rt.barrier()
    run = _StageRun(stage, cfg, recipe, options, rt, splits, path, resuming)
    run.provenance = expected
    run.log_start()
    try:
        return run.recalibrate() if STAGE_SPECS[stage].trains == "bn-statistics" else run.train()
    finally:
        run.log.close()


class _StageRun:
    """State shared by the parts of one stage run: model, data streams, logging, checkpoint writing."""

    def __init__(self, stage: str, cfg: StageSettings, recipe: Recipe, options: RunOptions, rt: Runtime,
                 splits: Splits, path: Path, resuming: bool) -> None:
        self.stage, self.cfg, self.recipe, self.options, self.rt = stage, cfg, recipe, options, rt
        self.spec = STAGE_SPECS[stage]
        self.splits, self.path = splits, path
        index = SEED_INDEX[stage]
        self.stage_seed = derive_seed(recipe.seed, index)
        torch.manual_seed(self.stage_seed)  # identical initial weights on every rank
        self.training_state: dict[str, Any] = {}
        self.resume_tensors: dict[str, Tensor] = {}
        model_spec = recipe.model_for(stage)
        if resuming:
            ck = mio.load(path)
            self.model, self.history = ck.model, ck.history[:-1]
            self.training_state, self.resume_tensors = ck.extra.get("training", {}), ck.extra_tensors
            if self.training_state:
                check_training_state(self.training_state, str(path))
        elif self.spec.from_scratch:
            self.model, self.history = models.create(model_spec, num_classes=splits.train.num_classes), []
        else:
            ck = mio.load(options.init_from)
            self.model, self.history = ck.model, ck.history
        self.spec.check_model(self.model)
        self.model.to(rt.device)
        if rt.channels_last:
            self.model.to(memory_format=torch.channels_last)

        self.normalize = stage_normalization(recipe, splits)
        # On a GPU the whole dataset lives there and is augmented there; on CPU it stays in host memory.
        self.data_device = rt.device if rt.device.type == "cuda" else torch.device("cpu")
        train = splits.train.to(self.data_device)
        augment = build_augmentation(recipe.augment)
        self.train_stream = BatchStream(train, cfg.batch_size, shuffle=True, augment=augment, seed=self.stage_seed,
                                        rank=rt.rank, world_size=rt.world_size, num_workers=options.num_workers)
        # One unsharded stream for calibration/recalibration, so every rank computes identical statistics.
        self.shared_stream = BatchStream(train, cfg.batch_size, shuffle=True, augment=augment,
                                         seed=derive_seed(recipe.seed, index, 7))
        out = path.parent
        self.log = MetricsLog(out / f"{stage}.jsonl" if rt.is_main else None,
                              out / "tensorboard" / stage if options.tensorboard and rt.is_main else None)
        self.entry = {
            "stage": stage, "recipe": recipe.name, "model": model_spec, "settings": dataclasses.asdict(cfg),
            "seed": recipe.seed, "dataset": splits.dataset, "normalization": recipe.normalization,
            "from": Path(options.init_from).name if options.init_from and not self.spec.from_scratch else None,
            "teacher": Path(options.teacher).name if options.teacher and cfg.uses_teacher else None,
            "world_size": rt.world_size,
        }
        self.provenance: dict[str, Any] = {}
        self.started = time.time()
        self.started_text = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started))

    def log_start(self) -> None:
        """The stage's first JSONL line: what runs, on what, from which fingerprint."""
        self.log.write({"event": "start", "stage": self.stage, "time": self.started_text,
                        "fingerprint": self.provenance.get("fingerprint"), "resumed": bool(self.training_state),
                        "model": self.entry["model"], "from": self.entry["from"], "teacher": self.entry["teacher"]})

    # -- data helpers
    def evaluate_split(self, data: ImageSet | None, prefix: str) -> dict[str, float]:
        """Top-1/top-5/loss of the model on ``data`` (sharded over ranks), restoring its train/eval mode."""
        if data is None:
            return {}
        stream = BatchStream(data.to(self.data_device), self.options.eval_batch_size, shuffle=False,
                             rank=self.rt.rank, world_size=self.rt.world_size, even_shards=False)
        was_training = self.model.training
        self.model.eval()
        with gate_statistics(self.model, self.splits.train.images.shape[1:], self.rt) as gates:
            sums = accuracy_sums(self.model, stream.epoch(0), self.normalize, self.rt)
        self.model.train(was_training)
        return {**summarize(sums, prefix), **{f"{prefix}_{k}": v for k, v in gates.items()}}

    def shared_batches(self, count: int) -> Iterator[Tensor]:
        """``count`` normalized augmented training batches, the same on every rank."""
        produced, epoch = 0, -1  # negative epochs never coincide with a training epoch's draws
        while produced < count:
            for images, _ in self.shared_stream.epoch(epoch):
                if produced == count:
                    return
                yield prepare_input(images.to(self.rt.device), self.normalize, self.rt)
                produced += 1
            epoch -= 1

    # -- checkpoints
    def save(self, complete: bool, metrics: dict[str, Any], epochs_done: int, step: int,
             optimizer: torch.optim.Optimizer | None = None, best: dict[str, Any] | None = None) -> None:
        """Write the stage checkpoint atomically (rank 0); in-progress ones carry the resume state."""
        if self.rt.is_main:
            now = time.time()
            record = {**self.entry, "complete": complete, "epochs_done": epochs_done, "metrics": metrics,
                      "fingerprint": self.provenance.get("fingerprint"), "started": self.started_text,
                      "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)) if complete else None,
                      "seconds": round(now - self.started, 3)}
            training: dict[str, Any] = {"stage": self.stage, "complete": complete, "epochs_done": epochs_done,
                                        "step": step, "best": best}
            tensors = None
            if optimizer is not None:
                tensors, training["optimizer"] = resume_state(optimizer)
            extra = {"normalization": self.recipe.normalization, "dataset": self.splits.dataset,
                     "normalization_stats": normalization_record(self.normalize),
                     "training": training, "metrics": metrics, "provenance": self.provenance}
            mio.save(self.path, self.model, history=self.history + [record], metrics=metrics, extra=extra,
                     extra_tensors=tensors)
            if complete:
                provenance.drop_previous(self.path)
        self.rt.barrier()

    # -- the two kinds of stage
    def recalibrate(self) -> StageResult:
        """bn-recal: re-estimate BatchNorm statistics over training batches; nothing else changes."""
        count = self.cfg.batch_count(len(self.splits.train))
        used = compress.recalibrate_bn_(self.model, self.shared_batches(count), batches=count, device=self.rt.device,
                                        progress=self.options.progress and self.rt.is_main)
        metrics = {"bn_batches": used, **self.evaluate_split(self.splits.val, "val"),
                   **self.evaluate_split(self.splits.test, "test")}
        self.log.write({"event": "done", **metrics})
        self.save(True, metrics, 0, 0)
        return StageResult(self.stage, self.path, metrics, model=self.model)

    def train(self) -> StageResult:
        """A training stage: build its compression, then the epoch loop with a checkpoint per epoch."""
        stage, spec, cfg, rt, model = self.stage, self.spec, self.cfg, self.rt, self.model
        resuming = bool(self.training_state)
        if not resuming:
            spec.compress_(model, cfg, lambda count: list(self.shared_batches(count)),
                           progress=self.options.progress and self.rt.is_main)
        params = spec.trainable_parameters(model)
        if not params:
            raise MicronetError(f"stage {stage!r}: nothing to train (every parameter is frozen)")
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                    weight_decay=cfg.weight_decay, foreach=True)
        start_epoch, step, best = 0, 0, None
        if resuming:
            restore_state(optimizer, self.resume_tensors, self.training_state["optimizer"], rt.device,
                          str(self.path))
            start_epoch, step = self.training_state["epochs_done"], self.training_state["step"]
            best = self.training_state.get("best")
            if rt.rank > 0:
                # Only rank 0's random state is in the checkpoint: other ranks get their own fresh stream, so
                # ShakeDrop/SkipNet draws stay independent across replicas (not bit-identical to an
                # uninterrupted multi-process run; the data streams are, being stateless).
                torch.manual_seed(derive_seed(self.stage_seed, rt.rank, 2, start_epoch))
        else:
            torch.manual_seed(derive_seed(self.stage_seed, rt.rank, 1))  # per-rank stream (ShakeDrop, ...)

        forward: nn.Module = model
        if rt.distributed:
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if rt.compile:
            forward = torch.compile(forward)
        teacher = _load_teacher(Path(self.options.teacher), cfg, rt) if cfg.uses_teacher else None
        steps_per_epoch = len(self.train_stream)
        total_steps = cfg.epochs * steps_per_epoch
        warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
        ctx = StepContext(
            optimizer=optimizer,
            loss_fn=_loss_function(cfg, forward, model, teacher, rt, stage),
            params=params,
            lr=lambda s: lr_at(s, total_steps, warmup_steps, cfg.lr, cfg.warmup_start_lr),
            grad_clip=cfg.grad_clip,
            before_step=spec.step_hook(model, cfg),
            after_step=(lambda s: self.options.after_step(s, model)) if self.options.after_step else None,
            describe=stage,
            progress=self.options.progress,
            sync_debug=self.options.sync_debug,
        )
        best_path = self.path.with_name(f"{stage}.best.safetensors")
        metrics: dict[str, Any] = {}
        for epoch in range(start_epoch, cfg.epochs):
            spec.set_mode(model)
            result, step = train_epoch(self.train_stream, epoch, step, ctx, self.normalize, rt)
            rt.sync_buffers(model)
            val = self.evaluate_split(self.splits.val, "val")
            metrics = {"epoch": epoch + 1, "step": step, "lr": result.last_lr, "train_loss": result.loss,
                       "train_top1": 100.0 * result.top1, "seconds": result.seconds,
                       "images_per_s": result.images / max(result.seconds, 1e-9), **val}
            self.log.write(metrics, step)
            if cfg.select == "best" and val and (best is None or val["val_top1"] > best["val_top1"]):
                best = {"epoch": epoch + 1, "val_top1": val["val_top1"]}
                if rt.is_main:
                    mio.save(best_path, model, metrics=metrics)
            if epoch + 1 < cfg.epochs:  # the last epoch goes straight to the final checkpoint
                self.save(False, metrics, epoch + 1, step, optimizer, best)

        if cfg.select == "best" and best is not None:
            rt.barrier()
            selected = mio.load(best_path).model.state_dict()
            mio.load_into(model, {k: v.to(rt.device) for k, v in selected.items()}, source=str(best_path))
        final = {**metrics, **self.evaluate_split(self.splits.val, "val"),
                 **self.evaluate_split(self.splits.test, "test"),
                 "epochs": cfg.epochs, "selected_epoch": best["epoch"] if best else cfg.epochs}
        self.log.write({"event": "done", **final}, step)
        self.save(True, final, cfg.epochs, step)
        if rt.is_main:
            best_path.unlink(missing_ok=True)
        return StageResult(stage, self.path, final, model=model)


# ----------------------------------------------------------------------------------------------- the chain
def run_all(recipe: Recipe, options: RunOptions) -> list[StageResult]:
    """Run every stage of the recipe in order into ``options.out``: reuse finished stages whose provenance matches,
    resume partial ones, refuse (before any work) to reuse or replace anything else unless ``rerun_from`` says so."""
    rt = _runtime(options)
    out = Path(options.out)
    splits = load_splits(recipe, options)
    data = provenance.DataIdentity.of(splits.dataset, splits.train, splits.val, splits.test)
    chain = [s for s in recipe.chain if not (s == "teacher" and options.teacher is not None)]  # brought a teacher
    inputs: dict[str, tuple[Path | None, Path | None]] = {}
    for stage in chain:
        previous = recipe.previous(stage)
        init_from = out / f"{previous}.safetensors" if previous else options.init_from
        teacher = options.teacher or (out / "teacher.safetensors" if "teacher" in recipe.stages else None)
        inputs[stage] = (init_from, teacher)
    expected = {}
    for stage in chain:  # known only where the inputs exist now; plan_chain never needs the others
        init_from, teacher = inputs[stage]
        needed = [p for p, used in ((init_from, not STAGE_SPECS[stage].from_scratch),
                                    (teacher, recipe.stage(stage).uses_teacher)) if used and p is not None]
        known = all(p.is_file() for p in needed)
        expected[stage] = _expected_provenance(stage, recipe, splits, data, init_from, teacher) if known else None
    plan = provenance.plan_chain(chain, out, expected, {s: recipe.previous(s) for s in chain}, options.rerun_from)
    results = []
    for stage in chain:
        path = out / f"{stage}.safetensors"
        if plan[stage] == "reuse":
            results.append(StageResult(stage, path, mio.read_header(path)["extra"].get("metrics", {}), skipped=True))
            continue
        init_from, teacher = inputs[stage]
        stage_options = dataclasses.replace(options, init_from=init_from, teacher=teacher,
                                            resume=plan[stage] == "resume", overwrite=plan[stage] == "rerun")
        results.append(run_stage(stage, recipe, stage_options, rt, splits=splits))
    return results
