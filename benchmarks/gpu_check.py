"""One prepared GPU check (issue 17): does micronet's CUDA path work, sync-free and fast? One command, ≤ 6 min.

    make gpu-check                                    # PYTHONPATH=. python3 benchmarks/gpu_check.py
    PYTHONPATH=. python3 benchmarks/gpu_check.py --cpu --out /tmp/check.json   # the CPU-valid parts, fast

Sections (each reports passed / failed / measured / skipped with the reason, never crashes the run):

a. environment: torch, CUDA, cuDNN, GPU, onnxruntime providers;
b. correctness: the quantizer custom ops, masks and the integer deploy form give the same results on CUDA as
   on the CPU (bit-identical where the maths is integer, else within the stated tolerance); ``score()`` of a
   compressed model is identical on both. ``--cpu``: the fp32 ops against float64 references instead;
c. ``run_all`` (what ``train-stage all`` calls) on a tiny generated CIFAR-format dataset, eager and (time-boxed)
   compiled, and the training step (augmentation included) under ``torch.cuda.set_sync_debug_mode("error")``
   for the float, masked and fake-quant forms: any host sync fails the check and names the op;
d. ``densenet100_k12`` training throughput at batch 256: float / masked / fake-quant (4-bit), synthetic data
   and the real augmentation, eager and compiled; img/s and the fake-quant/float step-time ratio;
e. augmentation alone (2019 policy, Fast-AA policy, Cutout, crop/flip) on the device;
f. DDP under torchrun (1 process, and N where N GPUs exist; NCCL on CUDA) on the tiny pipeline, and a killed
   stage resumed to bit-identical weights;
g. ONNX export verified with onnxruntime's CUDA provider (asserting it was the provider used).

Everything runs with the machine's own packages (no install, no network). Results: one JSON file (``--out``,
default ``benchmarks/results/gpu-check-<date>-<gpu>.json``) and a table on stdout. Exit status 1 when any
check failed. Compiled runs happen in child processes with a time box; the whole run keeps to ``--budget``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pickle
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
sys.path.insert(0, str(ROOT))

from micronet import compress, models  # noqa: E402
from micronet.data import ImageSet, get_normalization  # noqa: E402
from micronet.training import RunOptions, run_all, run_stage  # noqa: E402
from micronet.training.augment import Augmentation, AugmentConfig  # noqa: E402
from micronet.training.batches import BatchStream  # noqa: E402
from micronet.training.kd import cross_entropy  # noqa: E402
from micronet.training.loop import StepContext, setup_runtime, train_epoch  # noqa: E402
from micronet.training.recipe import parse_recipe  # noqa: E402

TARGET_IMG_S = 20_000  # densenet100_k12 float, bf16 + channels_last + compile + real augmentation, one H100/H200
TARGET_FQ_RATIO = 1.3  # fake-quant step time / float step time
TARGET_AUG_FACTOR = 5.0  # augmentation alone / training throughput
TINY_MODEL = "densenet_bc:depth=10,growth=4"


# ----------------------------------------------------------------------------------------------- plumbing
class Skip(Exception):
    """A section (or part) that cannot run here; the message says why."""


@dataclasses.dataclass
class Settings:
    """What this run may use."""

    cuda: bool
    budget: float  # seconds for the whole run
    start: float
    work: Path
    model: str  # throughput model
    batch: int  # throughput batch size
    steps: int  # timed throughput steps
    warmup: int

    def left(self) -> float:
        """Seconds left of the run's budget."""
        return self.budget - (time.perf_counter() - self.start)


def _run_section(name: str, fn: Callable[[Settings], dict[str, Any]], s: Settings, need: float) -> dict[str, Any]:
    """Run one section; a missing package or device becomes "skipped", any other error "failed" (never raised)."""
    start = time.perf_counter()
    if s.left() < need:
        return {"status": "skipped", "why": f"time budget: {s.left():.0f} s left, section needs ~{need:.0f} s",
                "seconds": 0.0}
    try:
        result = fn(s)
        result.setdefault("status", "passed")
    except Skip as exc:
        result = {"status": "skipped", "why": str(exc)}
    except ImportError as exc:
        result = {"status": "skipped", "why": f"missing package: {exc}"}
    except Exception as exc:  # report and go on: one broken section must not hide the others
        result = {"status": "failed", "why": f"{type(exc).__name__}: {str(exc).strip()[:500]}",
                  "traceback": traceback.format_exc(limit=-8).splitlines()[-16:]}
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _boxed(part: str, s: Settings, timeout: float) -> dict[str, Any]:
    """Run ``--part PART`` in a child process with a time box (torch.compile cannot be interrupted in-process)."""
    timeout = min(timeout, s.left() - 5)
    if timeout < 20:
        return {"status": "skipped", "why": f"time budget: {s.left():.0f} s left"}
    out = s.work / f"part-{part}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--part-out", str(out),
           "--work", str(s.work), "--model", s.model, "--batch-size", str(s.batch), "--steps", str(s.steps),
           "--warmup", str(s.warmup)]
    if not s.cuda:
        cmd.append("--cpu")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "skipped", "why": f"time box of {timeout:.0f} s ran out (torch.compile too slow here?)"}
    if out.is_file():
        return json.loads(out.read_text())
    return {"status": "failed", "why": f"child exited {done.returncode}", "stderr": done.stderr[-3000:].splitlines()}


@contextmanager
def sync_errors(enabled: bool):
    """``torch.cuda.set_sync_debug_mode("error")`` inside, the previous mode after (no-op on the CPU)."""
    if not enabled:
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def _where_synced(exc: BaseException) -> list[str]:
    """The innermost frames of a sync error (the op that synchronised and who called it)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return [f"{Path(f.filename).name}:{f.lineno} {f.name}: {(f.line or '').strip()}" for f in frames[-6:]]


# ----------------------------------------------------------------------------------------------- tiny data
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (250, 190, 190), (0, 128, 128)]


def _blobs(labels: list[int], seed: int) -> np.ndarray:
    """uint8 N×3×32×32: a disc of the class colour on dim noise (learnable in a few epochs)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, size=(len(labels), 3, 32, 32), dtype=np.int64)
    yy, xx = np.mgrid[0:32, 0:32]
    for i, label in enumerate(labels):
        cy, cx = rng.integers(8, 24, size=2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 49
        for c in range(3):
            images[i, c][disc] = PALETTE[label][c]
    return images.astype(np.uint8)


def write_tiny_cifar10(root: Path, train_per_class: int = 10, test_per_class: int = 5) -> Path:
    """``root/cifar-10-batches-py`` in torchvision's layout (5 train batches, test batch, meta)."""
    base = root / "cifar-10-batches-py"
    if base.is_dir():
        return root
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    labels = rng.permutation([c for c in range(10) for _ in range(train_per_class)]).tolist()
    images = _blobs(labels, 2).reshape(len(labels), -1)

    def dump(name: str, obj: dict) -> None:
        with open(base / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    for i, part in enumerate(np.array_split(np.arange(len(labels)), 5)):
        dump(f"data_batch_{i + 1}", {"labels": [labels[j] for j in part], "data": images[part],
                                     "batch_label": f"training batch {i + 1} of 5",
                                     "filenames": [f"{j}.png" for j in part]})
    test = rng.permutation([c for c in range(10) for _ in range(test_per_class)]).tolist()
    dump("test_batch", {"labels": test, "data": _blobs(test, 4).reshape(len(test), -1),
                        "batch_label": "testing batch 1 of 1", "filenames": [f"t{j}.png" for j in range(len(test))]})
    dump("batches.meta", {"label_names": [f"class{c}" for c in range(10)], "num_cases_per_batch": 10000,
                          "num_vis": 3072})
    return root


def tiny_recipe(policy: str | None = "micronet2019", epochs: int = 1) -> dict[str, Any]:
    """All eight stages, one short epoch each, on the tiny DenseNet with the 2019 augmentation."""
    e = {"epochs": epochs, "lr": 0.05, "warmup_epochs": 0.5, "warmup_start_lr": 0.01}
    return {
        "name": "gpu-check-tiny", "model": TINY_MODEL, "teacher_model": TINY_MODEL, "seed": 0,
        "data": {"normalization": "cifar10", "holdout": 0},
        "augment": {"policy": policy, "ops_per_image": 2, "pad_fill": "mean", "cutout": 16},
        "train": {"batch_size": 32, "loss": "kd"},
        "stages": {
            "teacher": {**e, "loss": "ce"}, "student": {**e, "loss": "ce"},
            "prune": {**e, "sparsity": 0.75, "mask_update_every": 2, "mask_update_until": 4},
            "quant-act": {**e, "act_bits": 4}, "quant-weight": {**e, "weight_bits": 4},
            "bn-recal": {"batches": 2},
            "prune-fc": {**e, "sparsity": 0.5, "scope": "layer", "mask_update_every": 2, "mask_update_until": 4},
            "quant-fc": {**e, "weight_bits": 4},
        },
    }


def _compressed_tiny(device: torch.device, seed: int = 0) -> torch.nn.Module:
    """The tiny DenseNet, 50 % pruned, 4-bit weights and activations (calibrated on seeded inputs)."""
    torch.manual_seed(seed)
    model = models.create(TINY_MODEL, num_classes=10).to(device)
    compress.prune_(model, compress.SparsityConfig(0.5))
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(device)
    compress.quantize_(model, compress.QuantConfig(weight_bits=4, act_bits=4), calib)
    return model.eval()


# ----------------------------------------------------------------------------------------------- a. environment
def section_env(s: Settings) -> dict[str, Any]:
    """Versions, the GPU, onnxruntime's providers."""
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda_available": torch.cuda.is_available(), "mode": "cuda" if s.cuda else "cpu"}
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except ImportError:
        env["torchvision"] = None
    if torch.cuda.is_available():
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    for package in ("onnx", "onnxruntime"):
        try:
            module = __import__(package)
            env[package] = module.__version__
        except ImportError:
            env[package] = None
    if env["onnxruntime"]:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    env["cpu_threads"] = torch.get_num_threads()
    return {"status": "passed", **env}


# ----------------------------------------------------------------------------------------------- b. correctness
def _compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    diff = (a - b).abs()
    return {"identical": bool(torch.equal(a, b)), "max_abs": float(diff.max()) if diff.numel() else 0.0}


def section_correctness(s: Settings) -> dict[str, Any]:
    """Quantizer ops, masks, deploy form and score: CUDA vs CPU (``--cpu``: fp32 vs float64 references)."""
    from micronet.compress import ops
    from micronet.scoring import score

    checks: dict[str, dict[str, Any]] = {}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, 8, 8, generator=g) * 3
    scale = torch.rand(1, 16, 1, 1, generator=g) * 0.5 + 0.05
    fq = ops.fake_quant(x, scale, -8, 7)
    rc = ops.round_clamp(x * 4, -8, 7)
    model = _compressed_tiny(torch.device("cpu"))
    images = torch.randn(32, 3, 32, 32, generator=g)
    deploy = compress.deploy_form(model)
    with torch.no_grad():
        logits, deploy_logits = model(images), deploy(images)
    masks = {n: m.mask for n, m in model.named_modules() if isinstance(m, compress.WeightMask)}
    if s.cuda:
        dev = torch.device("cuda")
        c = _compare(fq, ops.fake_quant(x.to(dev), scale.to(dev), -8, 7))
        checks["fake_quant"] = {**c, "rule": "bit-identical (fp32 divide and round are IEEE on both)",
                                "passed": c["identical"]}
        c = _compare(rc, ops.round_clamp((x * 4).to(dev), -8, 7))
        checks["round_clamp"] = {**c, "rule": "bit-identical (integer result)", "passed": c["identical"]}
        xg, sg = x.clone().requires_grad_(), scale.clone().requires_grad_()
        ops.fake_quant(xg, sg, -8, 7).square().sum().backward()
        xd, sd = x.to(dev).requires_grad_(), scale.to(dev).requires_grad_()
        ops.fake_quant(xd, sd, -8, 7).square().sum().backward()
        cx, cs = _compare(xg.grad, xd.grad), _compare(sg.grad, sd.grad)
        rel = cs["max_abs"] / float(sg.grad.abs().max())
        checks["fake_quant_backward"] = {"x_grad": cx, "scale_grad": cs, "scale_grad_rel": rel,
                                         "rule": "x grad bit-identical; scale grad (a sum) within 1e-5 relative",
                                         "passed": cx["identical"] and rel <= 1e-5}
        cuda_model = _compressed_tiny(dev)
        cuda_masks = {n: m.mask for n, m in cuda_model.named_modules() if isinstance(m, compress.WeightMask)}
        same = all(torch.equal(masks[n], cuda_masks[n].cpu()) for n in masks)
        checks["masks"] = {"layers": len(masks), "identical": same, "passed": same,
                           "rule": "magnitude masks chosen on CUDA equal the CPU's (same seeded weights)"}
        deploy_cuda = compress.deploy_form(model.to(dev))
        with torch.no_grad():
            cuda_logits = deploy_cuda(images.to(dev))
        c = _compare(deploy_logits, cuda_logits)
        agree = float((deploy_logits.argmax(1) == cuda_logits.argmax(1).cpu()).float().mean())
        checks["deploy_form"] = {**c, "top1_agree": agree, "passed": c["max_abs"] <= 1e-3 and agree == 1.0,
                                 "rule": "integer-form logits within 1e-3, same top-1 (float affines in between)"}
        model = model.cpu()
        report_cpu, report_cuda = score(model), score(model.to(dev))
        same = (report_cpu.ops, report_cpu.params, report_cpu.score) == (report_cuda.ops, report_cuda.params,
                                                                         report_cuda.score)
        checks["score"] = {"cpu": report_cpu.score, "cuda": report_cuda.score, "identical": same, "passed": same,
                           "rule": "score() identical on CPU and CUDA"}
    else:
        ref = (torch.clamp(torch.round(x.double() / scale.double()), -8, 7) * scale.double())
        wrong = int(((fq.double() - ref).abs() > 1e-6).sum())
        checks["fake_quant"] = {"mismatches": wrong, "passed": wrong == 0,
                                "rule": "fp32 op equals the float64 formula (to 1e-6) on every element"}
        ref = torch.clamp(torch.round(x.double() * 4), -8, 7)
        checks["round_clamp"] = {**_compare(rc, ref), "passed": torch.equal(rc.double(), ref),
                                 "rule": "equals the float64 formula exactly (integer result)"}
        density = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
        checks["masks"] = {"layers": len(masks), "density": density, "passed": abs(density - 0.5) < 0.02,
                           "rule": "global 50 % pruning keeps about half of the weights"}
        with torch.no_grad():
            deploy64 = compress.deploy_form(model).double()(images.double())
        c = _compare(deploy_logits, deploy64)
        agree = float((deploy_logits.argmax(1) == deploy64.argmax(1)).float().mean())
        checks["deploy_form"] = {**c, "top1_agree": agree, "training_form_max_abs": _compare(logits, deploy_logits),
                                 "passed": c["max_abs"] <= 1e-3 and agree == 1.0,
                                 "rule": "fp32 integer form within 1e-3 of its float64 run, same top-1"}
        report = score(model)
        checks["score"] = {"cpu": report.score, "passed": math.isfinite(report.score) and report.score > 0,
                           "rule": "score() runs (the CUDA comparison needs a GPU)"}
    failed = [k for k, v in checks.items() if not v["passed"]]
    return {"status": "failed" if failed else "passed", "failed": failed, "checks": checks}


# ----------------------------------------------------------------------------------------------- c. pipeline + syncs
def section_pipeline(s: Settings) -> dict[str, Any]:
    """``run_all`` on tiny data (eager), then the sync-checked training step for every model form."""
    root = write_tiny_cifar10(s.work / "data")
    recipe = parse_recipe(tiny_recipe(), "gpu-check-tiny.yaml")
    device = "cuda" if s.cuda else "cpu"
    out = s.work / "run-eager"
    start = time.perf_counter()
    results = run_all(recipe, RunOptions(data_root=root, out=out, device=device, progress=False,
                                         eval_batch_size=100))
    stages = {r.stage: {k: r.metrics.get(k) for k in ("test_top1", "train_loss") if k in r.metrics}
              for r in results}
    eager = {"stages": stages, "seconds": round(time.perf_counter() - start, 1),
             "complete": len(results) == len(recipe.chain) and all(r.path.is_file() for r in results)}
    syncs = sync_check(s, compiled=False)
    failed = not eager["complete"] or any(v["status"] == "failed" for v in syncs.values())
    return {"status": "failed" if failed else "passed", "run_all_eager": eager, "sync_check_eager": syncs,
            "device": device, "amp": s.cuda, "channels_last": s.cuda}


def sync_check(s: Settings, compiled: bool) -> dict[str, dict[str, Any]]:
    """A few real training steps per form (float, masked, fake-quant) with every host sync an error (CUDA)."""
    rt = setup_runtime("cuda" if s.cuda else "cpu", compile=compiled)
    normalize = get_normalization("cifar10")
    aug = Augmentation(AugmentConfig(policy="micronet2019", ops_per_image=2, pad_fill="mean", cutout=16))
    g = torch.Generator().manual_seed(0)
    n, batch = 96, 32
    data = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(rt.device),
                    torch.randint(0, 10, (n,), generator=g).to(rt.device), tuple(str(i) for i in range(10)))
    out: dict[str, dict[str, Any]] = {}
    for kind in ("float", "masked", "fake-quant"):
        torch.manual_seed(0)
        model = models.create(TINY_MODEL, num_classes=10).to(rt.device)
        if kind != "float":
            compress.prune_(model, compress.SparsityConfig(0.75))
            compress.freeze_masks_(model)
        if kind == "fake-quant":
            compress.quantize_(model, compress.QuantConfig(weight_bits=4, act_bits=4), normalize(data.images[:32]))
        if rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        forward = torch.compile(model) if compiled else model
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=True)

        def loss_fn(x: torch.Tensor, y: torch.Tensor, forward=forward):
            with rt.autocast():
                logits = forward(x)
            return cross_entropy(logits, y), logits

        checking = {"on": False}

        def augment(x: torch.Tensor, gen: torch.Generator, checking=checking) -> torch.Tensor:
            with sync_errors(checking["on"]):
                return aug(x, gen)

        ctx = StepContext(opt, loss_fn, params, lambda step: 0.01, progress=False, describe=kind, sync_every=10**9,
                          before_step=lambda step, k, checking=checking: _set_sync(checking["on"]),
                          after_step=lambda step: _set_sync(False))
        try:
            # Epoch 0 warms up (cuDNN autotuning, compilation, cached constants); epoch 1 runs with syncs as errors.
            train_epoch(BatchStream(data, batch, shuffle=True, augment=augment, seed=0), 0, 0, ctx, normalize, rt)
            checking["on"] = s.cuda
            result, _ = train_epoch(BatchStream(data, batch, shuffle=True, augment=augment, seed=0), 1, 3, ctx,
                                    normalize, rt)
            out[kind] = {"status": "passed" if s.cuda else "skipped",
                         "why": None if s.cuda else "no CUDA: the steps ran, sync detection needs a GPU",
                         "steps": 2 * math.ceil(n / batch), "loss": result.loss}
        except RuntimeError as exc:
            _set_sync(False)
            if "synchroniz" not in str(exc):
                raise
            out[kind] = {"status": "failed", "why": f"host sync in the training step: {str(exc)[:300]}",
                         "where": _where_synced(exc)}
    return out


def _set_sync(on: bool) -> None:
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("error" if on else "default")


def part_compiled_pipeline(s: Settings) -> dict[str, Any]:
    """Child process: the student and quant-weight stages with ``--compile``, and the compiled sync check."""
    root = write_tiny_cifar10(s.work / "data")
    recipe = parse_recipe(tiny_recipe(), "gpu-check-tiny.yaml")
    eager = s.work / "run-eager"
    device = "cuda" if s.cuda else "cpu"
    base = RunOptions(data_root=root, out=s.work / "run-compiled", device=device, compile=True, progress=False,
                      eval_batch_size=100)
    stages = {}
    start = time.perf_counter()
    r = run_stage("student", recipe, base)
    stages["student"] = {"test_top1": r.metrics.get("test_top1")}
    if (eager / "quant-act.safetensors").is_file():
        r = run_stage("quant-weight", recipe, dataclasses.replace(base, init_from=eager / "quant-act.safetensors",
                                                                   teacher=eager / "teacher.safetensors"))
        stages["quant-weight"] = {"test_top1": r.metrics.get("test_top1")}
    syncs = sync_check(s, compiled=True)
    failed = any(v["status"] == "failed" for v in syncs.values())
    return {"status": "failed" if failed else "passed", "stages": stages,
            "seconds_stages": round(time.perf_counter() - start, 1), "sync_check_compiled": syncs}


# ----------------------------------------------------------------------------------------------- d. throughput
def measure_training(kind: str, s: Settings, compiled: bool, augmented: bool, model_name: str) -> float:
    """Images/s of timed training steps (the real loop) on device-resident uint8 data, optionally augmented."""
    import train_speed

    rt = setup_runtime("cuda" if s.cuda else "cpu", compile=compiled)
    normalize = get_normalization("cifar100")
    g = torch.Generator().manual_seed(0)
    n = s.batch * max(s.steps, s.warmup)
    data = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(rt.device),
                    torch.randint(0, 100, (n,), generator=g).to(rt.device), tuple(str(i) for i in range(100)))
    model = train_speed.build(kind, model_name, rt.device, normalize(data.images[: s.batch]))
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    forward = torch.compile(model) if compiled else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=True)

    def loss_fn(x: torch.Tensor, y: torch.Tensor):
        with rt.autocast():
            logits = forward(x)
        return cross_entropy(logits, y), logits

    aug = Augmentation(AugmentConfig(policy="micronet2019", ops_per_image=2, pad_fill="mean", cutout=16)) \
        if augmented else None
    ctx = StepContext(opt, loss_fn, params, lambda step: 0.01, progress=False, describe=kind, sync_every=10**9)
    speed = 0.0
    for epoch, count in enumerate((s.warmup, s.steps)):
        stream = BatchStream(ImageSet(data.images[: s.batch * count], data.labels[: s.batch * count], data.classes),
                             s.batch, shuffle=True, augment=aug, seed=epoch, drop_last=True)
        if s.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result, _ = train_epoch(stream, epoch, 0, ctx, normalize, rt)  # ends with a host read: synchronised
        speed = result.images / (time.perf_counter() - start)
    return speed


def _throughput(s: Settings, compiled: bool, kinds: tuple[str, ...]) -> dict[str, Any]:
    model_name = s.model
    rows: dict[str, dict[str, float]] = {}
    for kind in kinds:
        rows[kind] = {}
        for augmented in (False, True):
            label = "real_augmentation" if augmented else "synthetic"
            rows[kind][label] = round(measure_training(kind, s, compiled, augmented, model_name), 1)
    result: dict[str, Any] = {"model": model_name, "batch": s.batch, "steps": s.steps, "img_per_s": rows}
    if "fake-quant" in rows and "float" in rows:
        result["fake_quant_over_float_step_time"] = round(rows["float"]["real_augmentation"]
                                                          / rows["fake-quant"]["real_augmentation"], 3)
    return result


def section_throughput(s: Settings) -> dict[str, Any]:
    """Eager throughput of every form (compiled: a time-boxed child process)."""
    result = _throughput(s, False, ("float", "masked", "fake-quant"))
    return {"status": "measured", "eager": result}


def part_compiled_throughput(s: Settings) -> dict[str, Any]:
    """Child process: compiled throughput of the float and fake-quant steps (the targets' forms)."""
    return {"status": "measured", **_throughput(s, True, ("float", "fake-quant"))}


# ----------------------------------------------------------------------------------------------- e. augmentation
def section_augmentation(s: Settings) -> dict[str, Any]:
    """Images/s of each augmentation pipeline alone on the device."""
    import augment_speed

    device = torch.device("cuda" if s.cuda else "cpu")
    iters = 50 if s.cuda else 2
    rows = {label: round(augment_speed.measure(cfg, device, s.batch, iters), 1)
            for label, cfg in augment_speed.pipelines().items()}
    with sync_errors(s.cuda):  # the policy pipelines must not synchronise either
        for cfg in augment_speed.pipelines().values():
            Augmentation(cfg)(torch.zeros(8, 3, 32, 32, dtype=torch.uint8, device=device),
                              torch.Generator().manual_seed(0))
    return {"status": "measured", "device": str(device), "batch": s.batch, "img_per_s": rows,
            "fast_aa_policy": augment_speed.fast_aa_policy()[1], "synchronised": False if s.cuda else None}


# ----------------------------------------------------------------------------------------------- f. DDP + resume
DDP_SCRIPT = """
import json, sys, dataclasses
from pathlib import Path
import torch
import torch.distributed as dist
from micronet.training import RunOptions, run_stage
from micronet.training.recipe import parse_recipe

root, out, recipe_json, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
recipe = parse_recipe(json.loads(Path(recipe_json).read_text()), "tiny.yaml")
base = RunOptions(data_root=root, out=out / "straight", device=device, progress=False, eval_batch_size=100)
straight = run_stage("student", recipe, base)

class Kill(Exception):
    pass

def kill(step, model):
    if step == KILL_AT:
        raise Kill()

KILL_AT = int(sys.argv[5])
try:
    run_stage("student", recipe, dataclasses.replace(base, out=out / "killed", after_step=kill))
    killed = False
except Kill:
    killed = True
resumed = run_stage("student", recipe, dataclasses.replace(base, out=out / "killed", resume=True))
a, b = straight.model.state_dict(), resumed.model.state_dict()
same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
rank = dist.get_rank() if dist.is_initialized() else 0
result = {"rank": rank, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
          "backend": dist.get_backend() if dist.is_initialized() else None, "killed": killed,
          "resumed_identical": same, "test_top1": straight.metrics.get("test_top1")}
(out / f"rank{rank}.json").write_text(json.dumps(result))
if dist.is_initialized():
    dist.destroy_process_group()
"""


def section_ddp(s: Settings) -> dict[str, Any]:
    """torchrun with 1 process (and N = GPU count when > 1), then a killed-and-resumed stage on each."""
    root = write_tiny_cifar10(s.work / "data")
    recipe = tiny_recipe(epochs=2)
    recipe_path = s.work / "ddp-recipe.json"
    recipe_path.write_text(json.dumps(recipe))
    script = s.work / "ddp_resume.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    counts = [1] + ([torch.cuda.device_count()] if s.cuda and torch.cuda.device_count() > 1 else [])
    runs = {}
    for n in counts:
        out = s.work / f"ddp-{n}"
        per_rank = math.ceil(100 / n)  # 100 training images, no holdout
        kill_at = math.ceil(per_rank / 32) + 1  # the second step of epoch 2 (after the epoch-1 checkpoint)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(script),
               str(root), str(out), str(recipe_path), "cuda" if s.cuda else "cpu", str(kill_at)]
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(30.0, min(150.0, s.left() - 10)),
                              env=env)
        ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
        ok = done.returncode == 0 and len(ranks) == n and all(r["killed"] and r["resumed_identical"] for r in ranks)
        runs[f"nproc={n}"] = {"passed": ok, "returncode": done.returncode, "ranks": ranks,
                              **({} if ok else {"stderr": done.stderr[-2000:].splitlines()})}
    notes = "with 1 process there is no process group (world size 1), so NCCL itself runs only when N > 1"
    if len(counts) == 1:
        notes += "; only one device here, so no N > 1 run"
    failed = [k for k, v in runs.items() if not v["passed"]]
    return {"status": "failed" if failed else "passed", "runs": runs, "note": notes}


# ----------------------------------------------------------------------------------------------- g. ONNX on CUDA
def section_export(s: Settings) -> dict[str, Any]:
    """Export the compressed tiny model and verify it with onnxruntime's CUDA provider."""
    if not s.cuda:
        raise Skip("no CUDA (CPU mode): the CUDA provider check needs a GPU; CPU export is covered by tests/export")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        raise Skip(f"onnxruntime-gpu absent (providers: {', '.join(onnxruntime.get_available_providers())})")
    from micronet.export import export_onnx

    model = _compressed_tiny(torch.device("cpu"))
    report = export_onnx(model, s.work / "tiny.onnx", device="cuda", samples=128, force=True, timing=False)
    providers = report.parity.providers if report.parity else []
    used = bool(providers) and providers[0] == "CUDAExecutionProvider"
    return {"status": "passed" if used and report.parity.passed else "failed", "providers": providers,
            "parity_mode": report.parity.mode, "max_abs": report.parity.max_abs, "file_bytes": report.file_bytes}


# ----------------------------------------------------------------------------------------------- targets, output
def targets(results: dict[str, Any], cuda: bool) -> dict[str, Any]:
    """The issue's CUDA targets against what was measured (``None``: not measured)."""
    if not cuda:
        return {"note": "CPU mode: the targets are CUDA targets; nothing here is a measurement of them"}
    compiled = results.get("d_throughput", {}).get("compiled", {})
    float_aug = compiled.get("img_per_s", {}).get("float", {}).get("real_augmentation")
    ratio = compiled.get("fake_quant_over_float_step_time")
    aug = results.get("e_augmentation", {}).get("img_per_s", {})
    policy_speeds = [v for k, v in aug.items() if "policy" in k]
    syncs = [v.get("status") for key in ("sync_check_eager",) for v in results.get("c_pipeline", {}).get(key, {})
             .values()] + [v.get("status") for v in results.get("c_pipeline", {}).get("compiled", {})
                           .get("sync_check_compiled", {}).values()]
    return {
        "float_compiled_real_aug_img_s": {"target": f">= {TARGET_IMG_S}", "measured": float_aug,
                                          "met": None if float_aug is None else float_aug >= TARGET_IMG_S},
        "fake_quant_over_float": {"target": f"<= {TARGET_FQ_RATIO}", "measured": ratio,
                                  "met": None if ratio is None else ratio <= TARGET_FQ_RATIO},
        "augmentation_over_training": {
            "target": f">= {TARGET_AUG_FACTOR}x", "measured": None if not (policy_speeds and float_aug) else
            round(min(policy_speeds) / float_aug, 2),
            "met": None if not (policy_speeds and float_aug) else min(policy_speeds) >= TARGET_AUG_FACTOR * float_aug},
        "zero_host_syncs": {"measured": syncs, "met": None if not syncs else all(x == "passed" for x in syncs)},
    }


def print_table(results: dict[str, Any]) -> None:
    """A readable summary: one line per section and sub-check."""
    lines = []
    for name, r in results["sections"].items():
        detail = r.get("why") or ""
        lines.append(f"{name:<16} {r['status']:<9} {r.get('seconds', 0):>7.1f}s  {detail}"[:160])
        for key in ("checks", "sync_check_eager", "runs"):
            for sub, v in (r.get(key) or {}).items():
                state = v.get("status") or ("passed" if v.get("passed") else "failed")
                lines.append(f"  {sub:<22} {state}  {v.get('why') or v.get('rule') or ''}"[:160])
        for label, block in (("eager", r.get("eager")), ("compiled", r.get("compiled"))):
            if isinstance(block, dict) and "img_per_s" in block:
                for kind, v in block["img_per_s"].items():
                    lines.append(f"  {label:<8} {kind:<12} synthetic {v['synthetic']:>10,.0f} img/s   "
                                 f"real aug {v['real_augmentation']:>10,.0f} img/s")
        if name == "e_augmentation" and "img_per_s" in r:
            for label, v in r["img_per_s"].items():
                lines.append(f"  {label:<38} {v:>12,.0f} img/s")
    lines.append("targets: " + json.dumps(results["targets"]))
    print("\n".join(lines))


PARTS = {"compiled_pipeline": part_compiled_pipeline, "compiled_throughput": part_compiled_throughput}


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when nothing failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/gpu-check-<date>-<gpu>.json)")
    parser.add_argument("--model", default="densenet100_k12", help="the throughput model (section d)")
    parser.add_argument("--cpu", action="store_true", help="CPU-valid parts only (automatic without CUDA)")
    parser.add_argument("--budget", type=float, default=345.0, help="seconds for the whole run (GPU mode)")
    parser.add_argument("--batch-size", type=int, default=None, help="throughput batch (256 on CUDA, 8 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed throughput steps (30 on CUDA, 1 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed throughput steps (10 on CUDA, 1 on CPU)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    work = args.work or Path(tempfile.mkdtemp(prefix="micronet-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    s = Settings(cuda=cuda, budget=args.budget, start=time.perf_counter(), work=work, model=args.model,
                 batch=args.batch_size or (256 if cuda else 8), steps=args.steps or (30 if cuda else 1),
                 warmup=args.warmup or (10 if cuda else 1))
    if not cuda:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.part:
        result = _run_section(args.part, PARTS[args.part], s, 0)
        args.part_out.write_text(json.dumps(result, default=str))
        return 0

    sections: dict[str, dict[str, Any]] = {}
    sections["a_environment"] = _run_section("a", section_env, s, 0)
    sections["b_correctness"] = _run_section("b", section_correctness, s, 10)
    sections["c_pipeline"] = _run_section("c", section_pipeline, s, 30)
    sections["d_throughput"] = _run_section("d", section_throughput, s, 30)
    sections["e_augmentation"] = _run_section("e", section_augmentation, s, 10)
    sections["f_ddp"] = _run_section("f", section_ddp, s, 40)
    sections["g_export"] = _run_section("g", section_export, s, 10)
    # The compiled runs last: they are the slowest and the least certain to fit; each is time-boxed.
    if cuda:
        sections["c_pipeline"]["compiled"] = _boxed("compiled_pipeline", s, 100)
        sections["d_throughput"]["compiled"] = _boxed("compiled_throughput", s, 170)
        for key in ("c_pipeline", "d_throughput"):
            if sections[key]["compiled"].get("status") == "failed" and sections[key]["status"] != "skipped":
                sections[key]["status"] = "failed"
    else:
        why = "CPU mode: torch.compile is checked on CUDA only (too slow for a quick CPU run)"
        sections["c_pipeline"]["compiled"] = {"status": "skipped", "why": why}
        sections["d_throughput"]["compiled"] = {"status": "skipped", "why": why}
    env = sections["a_environment"]
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", (env.get("gpus") or ["cpu"])[0]).strip("-").lower() if cuda else "cpu"
    results = {"check": "micronet gpu-check (issue 17)", "mode": "cuda" if cuda else "cpu",
               "date": datetime.datetime.now().isoformat(timespec="seconds"), "gpu": gpu,
               "seconds": round(time.perf_counter() - s.start, 1), "sections": sections}
    results["targets"] = targets(sections, cuda)
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu-check-{datetime.date.today()}-{gpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print_table(results)
    print(f"results: {out} ({results['seconds']} s)")
    return 1 if any(r["status"] == "failed" for r in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
