"""The training loop and its runtime: devices/DDP, precision, LR schedule, one epoch, resume state, logs.

Read top to bottom: ``Runtime`` says where and how tensors run; ``lr_at`` is the schedule;
``train_epoch`` is the whole inner loop (no host syncs per step: metrics accumulate on the device
and are read every ``sync_every`` steps, which is also when a non-finite loss is noticed);
``resume_state``/``restore_state`` turn optimizer and RNG state into tensors for a safetensors file.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from micronet.data import Normalization
from micronet.errors import MicronetError
from micronet.models import GateStats, is_gated
from micronet.progress import progress_bar
from micronet.training.batches import BatchStream


class TrainingDiverged(MicronetError):
    """The loss became NaN or infinite; the stage stopped and its last good checkpoint was kept."""

    exit_code = 3


# ----------------------------------------------------------------------------------------------- runtime
@dataclass
class Runtime:
    """Where the stage runs: device, process group, precision and compilation choices."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp: bool = False  # bf16 autocast (CUDA only)
    channels_last: bool = False
    compile: bool = False
    process_group: bool = False  # joined a process group (always when world_size > 1; forced at 1 for checks)

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True in a process group: under torchrun with more than one process, or one forced at world size 1."""
        return self.world_size > 1 or self.process_group

    def autocast(self, enabled: bool = True):
        """The forward-pass precision context (bf16 on CUDA when AMP is on and ``enabled``)."""
        if enabled and self.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def barrier(self) -> None:
        """Wait for every rank (no-op when single-process)."""
        if self.distributed:
            dist.barrier()

    def sync_buffers(self, model: nn.Module) -> None:
        """Copy rank 0's buffers (BN statistics, masks, scales) to every rank.

        DDP broadcasts buffers at the start of each forward, so after the last step every rank has its
        own BN update; this makes the replicas identical again before evaluating or saving.
        """
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer, 0)

    def all_reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks in place (no-op when single-process)."""
        if self.distributed:
            dist.all_reduce(t)
        return t


def setup_runtime(device: str = "auto", *, amp: bool | None = None, channels_last: bool | None = None,
                  compile: bool = False, deterministic: bool = False, process_group: bool = False) -> Runtime:
    """Pick the device and join the torchrun process group if ``WORLD_SIZE`` > 1 (nccl on GPU, gloo on CPU).

    ``deterministic``: cuDNN/cuBLAS pick reproducible kernels (no autotuning), so a resumed run can be compared
    bit for bit with an uninterrupted one. ``process_group``: join the group even at world size 1, so DDP and
    NCCL run on a one-GPU machine (``make gpu-check``).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MicronetError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise MicronetError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    if deterministic:
        # cuBLAS reads this when it first initialises: before any CUDA work in a fresh process (torchrun's).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an op without a deterministic kernel warns (the bit-identity comparison then tells).
        torch.use_deterministic_algorithms(True, warn_only=True)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MicronetError("--device cuda asked for, but PyTorch sees no CUDA device")
        if dev.index is None:
            dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise MicronetError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(dev)
        # TF32 matmuls/convs: free speed on Ampere+ for the fp32 parts (quantizer maths is fp32 in-op).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not deterministic  # autotuning may pick different kernels per run
        torch.backends.cudnn.deterministic = deterministic
    grouped = world_size > 1 or process_group
    if grouped and not dist.is_initialized():
        if world_size == 1:  # a forced group outside torchrun: a one-process rendezvous on this machine
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    cuda = dev.type == "cuda"
    return Runtime(dev, rank, world_size, amp=cuda if amp is None else amp and cuda,
                   channels_last=cuda if channels_last is None else channels_last, compile=compile,
                   process_group=grouped)


def prepare_input(images: Tensor, normalize: Normalization, rt: Runtime) -> Tensor:
    """uint8 batch on the device -> normalized float32, channels_last if asked."""
    x = normalize(images)
    return x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x


# ----------------------------------------------------------------------------------------------- schedule
def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, start: float) -> float:
    """Linear warm-up from ``start`` to ``peak`` over ``warmup_steps``, then cosine to 0 at ``total_steps``.

    Evaluated per iteration, as the 2019 winner's ``warm_up_cos`` schedule (spec §3.0).
    """
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))) * peak


# ----------------------------------------------------------------------------------------------- one epoch
LossFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (input, labels) -> (loss, logits)


@dataclass
class EpochResult:
    """What one epoch measured (host floats, read once at the end of the epoch)."""

    loss: float
    top1: float
    images: int
    seconds: float
    last_lr: float


@dataclass
class StepContext:
    """Everything ``train_epoch`` needs besides the batches."""

    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    params: list[nn.Parameter]
    lr: Callable[[int], float]
    grad_clip: float | None = None
    before_step: Callable[[int, int], None] | None = None  # (global step, batch index in epoch)
    after_step: Callable[[int], None] | None = None  # (global step) - e.g. a test's injected failure
    sync_every: int = 50
    describe: str = "train"
    progress: bool = True
    # CUDA: torch.cuda.set_sync_debug_mode(sync_debug) from producing a batch (its augmentation) to the end of
    # ``after_step``: "error" makes every host synchronisation raise, naming the op; "warn" warns at each one.
    # The periodic metric reads stay outside. None: off.
    sync_debug: str | None = None


def train_epoch(stream: BatchStream, epoch: int, step: int, ctx: StepContext, normalize: Normalization,
                rt: Runtime) -> tuple[EpochResult, int]:
    """Run one epoch from global ``step``; returns the epoch's result and the next global step."""
    sums = torch.zeros(3, device=rt.device, dtype=torch.float64)  # loss·n, correct, n
    bar = progress_bar(len(stream), f"{ctx.describe} epoch {epoch + 1}", ctx.progress and rt.is_main)
    start, lr = time.perf_counter(), 0.0
    batches = stream.epoch(epoch)
    for k in itertools.count():
        with _host_syncs_raise(ctx.sync_debug, rt.device):
            batch = next(batches, None)
            if batch is None:
                break
            images, labels = (t.to(rt.device, non_blocking=True) for t in batch)
            if ctx.before_step is not None:
                ctx.before_step(step, k)
            lr = ctx.lr(step)
            for group in ctx.optimizer.param_groups:
                group["lr"] = lr
            x = prepare_input(images, normalize, rt)
            loss, logits = ctx.loss_fn(x, labels)
            ctx.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if ctx.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(ctx.params, ctx.grad_clip, foreach=True)
            ctx.optimizer.step()
            with torch.no_grad():
                n = labels.shape[0]
                correct = (logits.argmax(1) == labels).sum()
                sums[0] += loss.detach().double() * n
                sums[1] += correct
                sums[2] += n
            step += 1
            bar.update(1)
            if ctx.after_step is not None:
                ctx.after_step(step)
        if (k + 1) % ctx.sync_every == 0:  # the only host syncs: progress display and the finite check
            _check_finite(sums, epoch, step, ctx.describe)
            bar.set_postfix(loss=f"{float(sums[0] / sums[2]):.4f}", lr=f"{lr:.2e}")
    bar.close()
    totals = rt.all_reduce(sums.clone())
    _check_finite(totals, epoch, step, ctx.describe)
    images_seen = int(totals[2])
    return EpochResult(float(totals[0] / max(images_seen, 1)), float(totals[1] / max(images_seen, 1)),
                       images_seen, time.perf_counter() - start, lr), step


@contextmanager
def _host_syncs_raise(mode: str | None, device: torch.device) -> Iterator[None]:
    """On CUDA, ``torch.cuda.set_sync_debug_mode(mode)`` inside (``StepContext.sync_debug``: "error" or "warn"),
    the previous mode after; nothing on the CPU (a test swaps in a CPU detector here)."""
    if not mode or device.type != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def _check_finite(sums: Tensor, epoch: int, step: int, stage: str) -> None:
    if not bool(torch.isfinite(sums[0])):
        raise TrainingDiverged(
            f"stage {stage}: the loss became non-finite (nan/inf) in epoch {epoch + 1} by step {step}; "
            "stopped, the last good checkpoint is kept (try a lower --lr or grad_clip)"
        )


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def accuracy_sums(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], normalize: Normalization,
                  rt: Runtime, dtype: torch.dtype | None = None) -> Tensor:
    """``[loss·n, top-1 correct, top-5 correct, n]`` summed over ``batches`` and over ranks (float64)."""
    sums = torch.zeros(4, device=rt.device, dtype=torch.float64)
    for images, labels in batches:
        images, labels = images.to(rt.device, non_blocking=True), labels.to(rt.device, non_blocking=True)
        x = prepare_input(images, normalize, rt)
        if dtype is not None:
            x = x.to(dtype)
        # Reported accuracies are fp32 (or the explicit --half dtype), like `micronet eval` and the exported model.
        logits = model(x).float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        sums[0] += loss.double()
        sums[1] += hit[:, 0].sum()
        sums[2] += hit.any(1).sum()
        sums[3] += labels.shape[0]
    return rt.all_reduce(sums)


@contextlib.contextmanager
def gate_statistics(model: nn.Module, input_size: tuple[int, ...], rt: Runtime) -> Iterator[dict[str, Any]]:
    """Collect a gated model's decisions over the forwards inside the block (summed over ranks).

    Yields a dict filled on exit with ``GateStats.summary()`` (per-gate rates, executed blocks and MACs per
    image with their histograms); it stays empty for a model without gates.
    """
    out: dict[str, Any] = {}
    if not is_gated(model):
        yield out
        return
    stats = GateStats.for_model(model, tuple(input_size))
    handle = model.register_forward_hook(lambda module, args, output: stats.update(module.executed()))
    try:
        yield out
    finally:
        handle.remove()
    stats.state.copy_(rt.all_reduce(stats.state.to(rt.device)).cpu())
    out["gates"] = stats.summary()


def summarize(sums: Tensor, prefix: str) -> dict[str, float]:
    """Turn ``accuracy_sums`` into ``{prefix_top1, prefix_top5, prefix_loss, prefix_images}`` (percent)."""
    n = max(float(sums[3]), 1.0)
    return {f"{prefix}_top1": 100.0 * float(sums[1]) / n, f"{prefix}_top5": 100.0 * float(sums[2]) / n,
            f"{prefix}_loss": float(sums[0]) / n, f"{prefix}_images": int(sums[3])}


# ----------------------------------------------------------------------------------------------- resume state
def resume_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer and RNG state as (tensors, JSON) for a safetensors file: no pickle involved."""
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, meta


def check_training_state(state: Any, source: str) -> None:
    """Refuse a checkpoint's resume record with missing or mistyped fields before anything uses it."""
    if not isinstance(state, dict) or not isinstance(state.get("optimizer"), dict):
        raise MicronetError(f"{source}: the resume state lacks the optimizer record (not an in-progress checkpoint?)")
    for key in ("epochs_done", "step"):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MicronetError(f"{source}: resume state {key!r} must be a non-negative integer, got {value!r}")


def _same_kind(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(a, int | float) and isinstance(b, int | float):
        return True
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):  # Adam's betas: a tuple saved as a JSON list
        return True
    return type(a) is type(b)


def _index(text: Any) -> int:
    """A parameter index written as decimal digits, or -1."""
    return int(text) if isinstance(text, str) and text.isascii() and text.isdigit() and len(text) < 10 else -1


def _check_resume(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """The saved optimizer and RNG state fit this optimizer: groups, settings, parameter indices and shapes.
    Messages start with "resume state"; ``restore_state`` names the file."""
    own = optimizer.state_dict()["param_groups"]
    groups = meta.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(own):
        raise MicronetError(f"resume state has {len(groups) if isinstance(groups, list) else 'no'} optimizer "
                            f"parameter groups, this stage has {len(own)}")
    shapes: dict[int, tuple[int, ...]] = {}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for mine, saved in zip(own, groups):
        if not isinstance(saved, dict) or set(saved) != set(mine):
            raise MicronetError("resume state's optimizer settings do not match this stage's optimizer")
        if saved["params"] != mine["params"]:
            raise MicronetError("resume state's optimizer covers different parameters than this stage trains")
        for key, value in saved.items():
            if key != "params" and not _same_kind(value, mine[key]):
                raise MicronetError(f"resume state's optimizer setting {key!r} has the wrong type")
    for index, param in zip([i for g in own for i in g["params"]], params):
        shapes[index] = tuple(param.shape)
    for name, value in tensors.items():
        if not name.startswith("optimizer."):
            continue
        _, index, key = (name.split(".", 2) + ["", ""])[:3]
        if _index(index) not in shapes or not value.is_floating_point() or (
                tuple(value.shape) != shapes[int(index)] and value.numel() != 1):
            raise MicronetError(f"resume state tensor {name} does not fit the optimizer (parameter index, shape or "
                                "dtype)")
    scalars = meta.get("scalars", {})
    if not isinstance(scalars, dict) or not all(
            _index(k) in shapes and isinstance(v, dict) and all(
                isinstance(x, int | float | bool | None) for x in v.values()) for k, v in scalars.items()):
        raise MicronetError("resume state's optimizer scalars do not fit the optimizer")
    rng = tensors.get("rng.cpu")
    if rng is not None and (rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape):
        raise MicronetError(f"resume state's CPU random state has shape {tuple(rng.shape)} and dtype {rng.dtype}, "
                            f"expected {tuple(torch.get_rng_state().shape)} uint8")
    cuda = tensors.get("rng.cuda")
    if cuda is not None and (cuda.dtype != torch.uint8 or cuda.dim() != 1):
        raise MicronetError("resume state's CUDA random state is not a uint8 vector")


def restore_state(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any],
                  device: torch.device, source: str = "checkpoint") -> None:
    """Inverse of ``resume_state``: load optimizer state and RNG streams (validated first: one-line errors
    naming ``source``)."""
    try:
        _check_resume(optimizer, tensors, meta)
    except MicronetError as exc:
        raise MicronetError(f"{source}: {exc}") from None
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value.to(device)
    for index, entry in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


# ----------------------------------------------------------------------------------------------- logging
@dataclass
class MetricsLog:
    """Per-stage JSONL log (one object per epoch/event) and optional TensorBoard scalars; rank 0 only."""

    path: Path | None
    tensorboard_dir: Path | None = None
    _writer: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MicronetError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self._writer = SummaryWriter(str(self.tensorboard_dir))

    def write(self, record: dict[str, Any], step: int | None = None) -> None:
        """Append ``record`` as one JSON line (and its numbers to TensorBoard at ``step``)."""
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._writer is not None and step is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def close(self) -> None:
        """Flush and close TensorBoard."""
        if self._writer is not None:
            self._writer.close()
