"""One prepared GPU check (issue 17): does micronet's CUDA path work, sync-free and fast? One command, ≤ 6 min.

    make gpu-check                                    # PYTHONPATH=. python3 benchmarks/gpu_check.py
    PYTHONPATH=. python3 benchmarks/gpu_check.py --cpu --out /tmp/check.json   # the CPU-valid parts, fast
    PYTHONPATH=. python3 benchmarks/gpu_check.py --sections a,b,e               # some sections only

Sections (each reports passed / failed / measured / skipped with the reason, never crashes the run), in the order
they run on CUDA (the targets' measurements first, the slowest and least certain last):

a. environment: torch, CUDA, cuDNN, GPU, onnxruntime providers, and which packages are missing (what that skips);
b. correctness: the quantizer custom ops, masks and the integer deploy form give the same results on CUDA as on
   the CPU (bit-identical where the maths is integer, else within the stated tolerance); ``score()`` of a
   compressed model is identical on both; every augmentation op on CUDA (TF32 on, as in training) against the CPU.
   ``--cpu``: the fp32 ops against float64 references instead;
c. ``run_all`` (what ``train-stage all`` calls) on a tiny generated CIFAR-format dataset with
   ``RunOptions(sync_debug="error")``: inside the real loop, every host sync from a batch's augmentation to the end
   of its step raises and is reported with the op's location; the rest of the chain then runs with
   ``sync_debug="warn"`` to list any further sync sites. Compiled (``--compile``): a time-boxed child, run last;
d. ``densenet100_k12`` training throughput at batch 256: float / masked / fake-quant (4-bit), the real augmentation
   first, then synthetic data (same model, compiled once per kind); img/s and the fake-quant/float step-time ratio
   from the synthetic rows (the target's) and from the augmented ones. Compiled: a time-boxed child that writes
   its results after every measurement (a time-out keeps what it measured), run before e, f and g;
e. augmentation alone (2019 policy, Fast-AA policy, Cutout, crop/flip) on the device, eagerly and (CUDA) replayed
   as a CUDA graph (``AugmentConfig(cuda_graph=True)``), the two compared bit for bit;
f. DDP under torchrun on the tiny pipeline, with a process group even for 1 process (NCCL on CUDA, gloo on the CPU;
   N processes where N GPUs exist, 2 gloo processes in CPU mode) and deterministic kernels: a killed stage resumes
   to bit-identical weights;
g. ONNX export verified with onnxruntime's CUDA provider (asserting it was the provider used).

Runs with the machine's own packages (no install, no network): torch is required, micronet is imported inside each
section, so a missing package (pyyaml, safetensors, tabulate, tqdm, onnx...) skips only what needs it, naming it.
Results: one JSON file (``--out``, default ``benchmarks/results/gpu-check-<date>-<gpu>.json``, rewritten after
every section, so an interrupted run keeps what it measured) and a table on stdout. Exit status 1 when any check
failed, 3 when nothing failed but a part ran out of time ("complete": false, listed under "incomplete").
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import os
import pickle
import platform
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
sys.path.insert(0, str(ROOT))

TARGET_IMG_S = 20_000  # densenet100_k12 float, bf16 + channels_last + compile + real augmentation, one H100/H200
TARGET_FQ_RATIO = 1.3  # fake-quant step time / float step time
TARGET_AUG_FACTOR = 5.0  # augmentation alone / training throughput
TINY_MODEL = "densenet_bc:depth=10,growth=4"
SECTION_KEYS = {"a": "a_environment", "b": "b_correctness", "c": "c_pipeline", "d": "d_throughput",
                "e": "e_augmentation", "f": "f_ddp", "g": "g_export"}
# Import name -> (pip name, what needs it). A bare GPU machine may have only torch, torchvision, onnx, onnxruntime.
PACKAGES = {
    "torchvision": ("torchvision", "augmentation: b, c, d, e, f"),
    "numpy": ("numpy", "the tiny dataset: c, f"),
    "safetensors": ("safetensors", "checkpoints, so every train-stage run: c, f"),
    "onnx": ("onnx", "export: g"),
    "onnxscript": ("onnxscript", "export: g"),
    "ml_dtypes": ("ml-dtypes", "export: g"),
    "onnxruntime": ("onnxruntime", "export verification: g (onnxruntime-gpu for its CUDA provider)"),
    "yaml": ("pyyaml", "recipe files (not used here)"),
    "tabulate": ("tabulate", "printed tables (not used here)"),
    "tqdm": ("tqdm", "progress bars (not used here)"),
    "click": ("click", "the micronet CLI (not used here)"),
}


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
    part_out: Path | None = None  # a child's result file, rewritten after every measurement

    def left(self) -> float:
        """Seconds left of the run's budget."""
        return self.budget - (time.perf_counter() - self.start)

    def partial(self, result: dict[str, Any]) -> None:
        """A child's results so far (what survives its time box)."""
        if self.part_out is not None:
            write_json(self.part_out, result)


def write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` atomically (a reader never sees half a file, even if this process is killed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def _missing(exc: ImportError) -> str:
    name = (exc.name or "").split(".")[0]
    if name in PACKAGES:
        return f"missing package {PACKAGES[name][0]} (needed for {PACKAGES[name][1]})"
    return f"missing package: {name or exc}"


def require(*modules: str) -> None:
    """Import each module now, so a section without its packages is skipped before doing any work."""
    for name in modules:
        importlib.import_module(name)


def _run_section(name: str, fn: Callable[[Settings], dict[str, Any]], s: Settings, need: float) -> dict[str, Any]:
    """Run one section; a missing package or device becomes "skipped", any other error "failed" (never raised)."""
    start = time.perf_counter()
    if s.left() < need:
        return {"status": "skipped", "incomplete": True, "seconds": 0.0,
                "why": f"time budget: {s.left():.0f} s left, section needs ~{need:.0f} s"}
    try:
        result = fn(s)
        result.setdefault("status", "passed")
    except Skip as exc:
        result = {"status": "skipped", "why": str(exc)}
    except ImportError as exc:
        result = {"status": "skipped", "why": _missing(exc)}
    except Exception as exc:  # report and go on: one broken section must not hide the others
        result = {"status": "failed", "why": f"{type(exc).__name__}: {str(exc).strip()[:500]}",
                  "traceback": traceback.format_exc(limit=-8).splitlines()[-16:]}
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill a child started in its own session and everything it started (torchrun workers, compile workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_boxed(cmd: list[str], timeout: float, log: Path, env: dict[str, str]) -> tuple[int | None, str]:
    """Run ``cmd`` in a new session for at most ``timeout`` s; (exit code or None on time-out, output tail)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code = None
    return code, log.read_text(errors="replace")[-3000:]


def _child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra}


def _boxed(part: str, s: Settings, timeout: float) -> dict[str, Any]:
    """Run ``--part PART`` in a child process with a time box (torch.compile cannot be interrupted in-process)."""
    timeout = min(timeout, s.left() - 5)
    if timeout < 20:
        return {"status": "skipped", "incomplete": True, "why": f"time budget: {s.left():.0f} s left"}
    out = s.work / f"part-{part}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--part-out", str(out),
           "--work", str(s.work), "--model", s.model, "--batch-size", str(s.batch), "--steps", str(s.steps),
           "--warmup", str(s.warmup), "--budget", str(timeout)]
    if not s.cuda:
        cmd.append("--cpu")
    start = time.perf_counter()
    code, tail = run_boxed(cmd, timeout, s.work / f"part-{part}.log", _child_env())
    seconds = round(time.perf_counter() - start, 1)
    result = json.loads(out.read_text()) if out.is_file() else {}
    if code is None:
        kept = "; the results measured before are kept" if result else ""
        return {**result, "status": "incomplete", "incomplete": True, "seconds": seconds,
                "why": f"time box of {timeout:.0f} s ran out (torch.compile too slow here?){kept}",
                "log_tail": tail.splitlines()[-12:]}
    if result and "status" in result:
        return {**result, "seconds": seconds}
    return {**result, "status": "failed", "why": f"child exited {code} without a result", "seconds": seconds,
            "log_tail": tail.splitlines()[-20:]}


def _where(exc: BaseException) -> list[str]:
    """The innermost frames of an error (for a sync error: the op that synchronised and who called it)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return [f"{Path(f.filename).name}:{f.lineno} {f.name}: {(f.line or '').strip()}" for f in frames[-6:]]


@contextmanager
def sync_errors(enabled: bool) -> Iterator[None]:
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


@contextmanager
def warned_syncs() -> Iterator[Counter]:
    """Collect the Python call sites of ``set_sync_debug_mode("warn")`` warnings (micronet frames), with counts."""
    sites: Counter = Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always")

        def record(message, category, filename, lineno, file=None, line=None) -> None:
            if "synchroniz" not in str(message):
                return
            frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-1]
                      if "micronet" in f.filename or "torch/nn" in f.filename]
            sites[" < ".join(reversed(frames[-4:])) or f"{Path(filename).name}:{lineno}"] += 1

        warnings.showwarning = record
        yield sites


def is_sync_error(exc: BaseException) -> bool:
    """True for the error ``set_sync_debug_mode("error")`` raises."""
    return isinstance(exc, RuntimeError) and "synchroniz" in str(exc)


def checked_run(run: Callable[[str | None], Any], cuda: bool) -> tuple[Any, dict[str, Any]]:
    """``run(sync_debug)`` with host syncs as errors; after one, the rest runs with warnings listing every site."""
    if not cuda:
        return run(None), {"status": "skipped", "why": "no CUDA: sync detection needs a GPU (the CPU analogue is "
                                                        "tests/training/test_step_syncs.py)"}
    try:
        return run("error"), {"status": "passed", "mode": "error", "syncs": 0}
    except RuntimeError as exc:
        if not is_sync_error(exc):
            raise
        first = {"error": str(exc).strip()[:300], "where": _where(exc)}
    with warned_syncs() as sites:
        value = run("warn")
    return value, {"status": "failed", "mode": "error, then warn for the rest", "first": first,
                   "syncs": 1 + sum(sites.values()), "sites": dict(sites.most_common(12))}


# ----------------------------------------------------------------------------------------------- tiny data
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (250, 190, 190), (0, 128, 128)]


def _blobs(labels: list[int], seed: int):
    """uint8 N×3×32×32: a disc of the class colour on dim noise (learnable in a few epochs)."""
    import numpy as np

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
    import numpy as np

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
    from micronet import compress, models

    torch.manual_seed(seed)
    model = models.create(TINY_MODEL, num_classes=10).to(device)
    compress.prune_(model, compress.SparsityConfig(0.5))
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(device)
    compress.quantize_(model, compress.QuantConfig(weight_bits=4, act_bits=4), calib)
    return model.eval()


# ----------------------------------------------------------------------------------------------- a. environment
def section_env(s: Settings) -> dict[str, Any]:
    """Versions, the GPU, onnxruntime's providers, and the packages this machine lacks (what that skips)."""
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda_available": torch.cuda.is_available(), "mode": "cuda" if s.cuda else "cpu"}
    if torch.cuda.is_available():
        env.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    versions, missing = {}, {}
    for module, (pip_name, needed_for) in PACKAGES.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # click deprecates __version__
                versions[pip_name] = getattr(importlib.import_module(module), "__version__", "present")
        except ImportError:
            versions[pip_name] = None
            missing[pip_name] = needed_for
    env["packages"], env["missing_packages"] = versions, missing
    if versions.get("onnxruntime"):
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    env["cpu_threads"] = torch.get_num_threads()
    why = "; ".join(f"{k} missing (skips {v})" for k, v in missing.items()) or None
    return {"status": "passed", **({"why": why} if why else {}), **env}


# ----------------------------------------------------------------------------------------------- b. correctness
def _compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    diff = (a - b).abs()
    return {"identical": bool(torch.equal(a, b)), "max_abs": float(diff.max()) if diff.numel() else 0.0,
            "mismatched": int((diff > 0).sum())}


# Magnitudes spread over both policies' ranges, one per image; blend-based ops may differ by one level (a fused
# multiply-add rounds once), the rest must be bit-identical.
AUG_RANGES = {"ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3), "TranslateX": (-14.4, 14.4), "TranslateY": (-14.4, 14.4),
              "Rotate": (-30.0, 30.0), "Solarize": (0.0, 256.0), "Posterize": (0.0, 8.0), "Contrast": (0.1, 1.9),
              "Color": (0.1, 1.9), "Brightness": (0.1, 1.9), "Sharpness": (0.1, 1.9), "Cutout": (0.0, 16.0)}
BLENDS = {"Contrast", "Color", "Brightness", "Sharpness"}


def augment_ops_check(dev: torch.device) -> dict[str, dict[str, Any]]:
    """Every augmentation op on ``dev`` against the CPU, with TF32 on (as training sets it), same per-image inputs."""
    from micronet.training import augment
    from micronet.training.augment import OPS, Augmentation, AugmentConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=g)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    checks: dict[str, dict[str, Any]] = {}
    try:
        for name, op in OPS.items():
            if name == "Identity":
                continue
            low, high = AUG_RANGES.get(name, (0.0, 0.0))
            m = torch.linspace(low, high, x.shape[0], dtype=torch.float64)
            if name == "Posterize":
                m = m.floor()
            fill = augment.MEAN_COLOUR
            cpu = op(x, m, fill, torch.Generator().manual_seed(1))
            on_dev = op(x.to(dev), m.to(dev), fill, torch.Generator().manual_seed(1))
            c = _compare(cpu, on_dev)
            rule = "within 1 level" if name in BLENDS else "bit-identical"
            checks[f"op {name}"] = {**c, "rule": rule,
                                    "passed": c["max_abs"] <= 1 if name in BLENDS else c["identical"]}
        aug = Augmentation(AugmentConfig(policy="micronet2019", ops_per_image=2, pad_fill="mean", cutout=16))
        cpu = aug(x, torch.Generator().manual_seed(2))
        c = _compare(cpu, aug(x.to(dev), torch.Generator().manual_seed(2)))
        share = c["mismatched"] / cpu.numel()
        checks["policy batch"] = {**c, "mismatched_share": share, "passed": share < 1e-3,
                                  "rule": "2019 policy x2 + crop/flip/cutout: < 0.1 % of values differ (blend rounding "
                                          "only; the same draws choose the same ops)"}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return checks


def section_correctness(s: Settings) -> dict[str, Any]:
    """Quantizer ops, masks, deploy form, score and augmentation ops: CUDA vs CPU (``--cpu``: fp32 vs float64)."""
    from micronet import compress
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
        try:
            checks.update(augment_ops_check(dev))
        except ImportError as exc:
            checks["augment ops"] = {"status": "skipped", "why": _missing(exc), "passed": True}
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
    """``run_all`` on tiny data (eager) with host syncs in the training steps as errors (CUDA)."""
    require("safetensors", "numpy", "torchvision")
    from micronet.training import RunOptions, run_all
    from micronet.training.recipe import parse_recipe

    root = write_tiny_cifar10(s.work / "data")
    recipe = parse_recipe(tiny_recipe(), "gpu-check-tiny.yaml")
    device = "cuda" if s.cuda else "cpu"
    base = RunOptions(data_root=root, out=s.work / "run-eager", device=device, progress=False, eval_batch_size=100)
    start = time.perf_counter()
    results, syncs = checked_run(lambda mode: run_all(recipe, dataclasses.replace(base, sync_debug=mode)), s.cuda)
    stages = {r.stage: {k: r.metrics.get(k) for k in ("test_top1", "train_loss") if k in r.metrics}
              for r in results}
    eager = {"stages": stages, "seconds": round(time.perf_counter() - start, 1),
             "complete": len(results) == len(recipe.chain) and all(r.path.is_file() for r in results)}
    failed = not eager["complete"] or syncs["status"] == "failed"
    return {"status": "failed" if failed else "passed", "run_all_eager": eager, "sync_check_eager": syncs,
            "device": device, "amp": s.cuda, "channels_last": s.cuda}


def part_compiled_pipeline(s: Settings) -> dict[str, Any]:
    """Child process: the student and quant-weight stages with ``--compile``, host syncs checked in their steps."""
    require("safetensors", "numpy", "torchvision")
    from micronet.training import RunOptions, run_stage
    from micronet.training.recipe import parse_recipe

    root = write_tiny_cifar10(s.work / "data")
    recipe = parse_recipe(tiny_recipe(), "gpu-check-tiny.yaml")
    eager = s.work / "run-eager"
    base = RunOptions(data_root=root, out=s.work / "run-compiled", device="cuda" if s.cuda else "cpu", compile=True,
                      progress=False, eval_batch_size=100)
    result: dict[str, Any] = {"status": "incomplete", "stages": {}, "sync_check_compiled": {}}
    runs = [("student", base)]
    if (eager / "quant-act.safetensors").is_file():
        runs.append(("quant-weight", dataclasses.replace(base, init_from=eager / "quant-act.safetensors",
                                                         teacher=eager / "teacher.safetensors")))
    for stage, options in runs:
        r, syncs = checked_run(lambda mode, st=stage, o=options: run_stage(st, recipe, dataclasses.replace(
            o, sync_debug=mode, resume=mode == "warn")), s.cuda)
        result["stages"][stage] = {"test_top1": r.metrics.get("test_top1")}
        result["sync_check_compiled"][stage] = syncs
        s.partial(result)
    failed = any(v["status"] == "failed" for v in result["sync_check_compiled"].values())
    return {**result, "status": "failed" if failed else "passed"}


# ----------------------------------------------------------------------------------------------- d. throughput
class Trainer:
    """One model form in the real training loop on device-resident uint8 data; compiled (at most) once."""

    def __init__(self, kind: str, s: Settings, compiled: bool) -> None:
        import train_speed

        from micronet.data import ImageSet, get_normalization
        from micronet.training.kd import cross_entropy
        from micronet.training.loop import StepContext, setup_runtime

        self.s = s
        self.rt = rt = setup_runtime("cuda" if s.cuda else "cpu", compile=compiled)
        self.normalize = get_normalization("cifar100")
        g = torch.Generator().manual_seed(0)
        n = s.batch * max(s.steps, s.warmup)
        self.data = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(rt.device),
                             torch.randint(0, 100, (n,), generator=g).to(rt.device), tuple(str(i) for i in range(100)))
        model = train_speed.build(kind, s.model, rt.device, self.normalize(self.data.images[: s.batch]))
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

        self.ctx = StepContext(opt, loss_fn, params, lambda step: 0.01, progress=False, describe=kind,
                               sync_every=10**9)
        self.epoch = 0

    def img_per_s(self, augmented: bool) -> float:
        """Warm-up steps, then timed steps; images/s of the timed ones."""
        from micronet.data import ImageSet
        from micronet.training.augment import Augmentation, AugmentConfig
        from micronet.training.batches import BatchStream
        from micronet.training.loop import train_epoch

        s = self.s
        aug = Augmentation(AugmentConfig(policy="micronet2019", ops_per_image=2, pad_fill="mean", cutout=16)) \
            if augmented else None
        speed = 0.0
        for count in (s.warmup, s.steps):
            subset = ImageSet(self.data.images[: s.batch * count], self.data.labels[: s.batch * count],
                              self.data.classes)
            stream = BatchStream(subset, s.batch, shuffle=True, augment=aug, seed=self.epoch, drop_last=True)
            if s.cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            result, _ = train_epoch(stream, self.epoch, 0, self.ctx, self.normalize, self.rt)  # ends synchronised
            speed = result.images / (time.perf_counter() - start)
            self.epoch += 1
        return speed


def _ratios(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    out = {}
    for label in ("synthetic", "real_augmentation"):
        f, q = rows.get("float", {}).get(label), rows.get("fake-quant", {}).get(label)
        if f and q:
            out[f"fake_quant_over_float_step_time_{label}"] = round(f / q, 3)
    return out


def throughput(s: Settings, compiled: bool, kinds: tuple[str, ...]) -> dict[str, Any]:
    """img/s per kind: real augmentation first, then synthetic data; partial results written after each."""
    result: dict[str, Any] = {"status": "incomplete", "model": s.model, "batch": s.batch, "steps": s.steps,
                              "compiled": compiled, "img_per_s": {}}
    for kind in kinds:
        start = time.perf_counter()
        trainer = Trainer(kind, s, compiled)
        rows = result["img_per_s"].setdefault(kind, {})
        for label, augmented in (("real_augmentation", True), ("synthetic", False)):
            rows[label] = round(trainer.img_per_s(augmented), 1)
            result.update(_ratios(result["img_per_s"]))
            s.partial(result)
        rows["seconds_incl_compile"] = round(time.perf_counter() - start, 1)
        del trainer
        if s.cuda:
            torch.cuda.empty_cache()
    return {**result, "status": "measured"}


def section_throughput(s: Settings) -> dict[str, Any]:
    """Eager throughput of every form (compiled: a time-boxed child process)."""
    require("torchvision")
    return {"status": "measured", "eager": throughput(s, False, ("float", "fake-quant", "masked"))}


def part_compiled_throughput(s: Settings) -> dict[str, Any]:
    """Child process: compiled throughput of the float and fake-quant steps (the targets' forms)."""
    require("torchvision")
    return throughput(s, True, ("float", "fake-quant"))


# ----------------------------------------------------------------------------------------------- e. augmentation
def section_augmentation(s: Settings) -> dict[str, Any]:
    """Images/s of each augmentation pipeline alone on the device, eager and (CUDA) as a CUDA graph."""
    require("torchvision")
    import augment_speed

    from micronet.training.augment import Augmentation

    device = torch.device("cuda" if s.cuda else "cpu")
    iters = 50 if s.cuda else 2
    rows: dict[str, float] = {}
    graphs: dict[str, Any] = {}
    for label, cfg in augment_speed.pipelines().items():
        rows[label] = round(augment_speed.measure(cfg, device, s.batch, iters), 1)
        if s.cuda and cfg.policy:
            graphed_cfg = dataclasses.replace(cfg, cuda_graph=True)
            rows[label + " (CUDA graph)"] = round(augment_speed.measure(graphed_cfg, device, s.batch, iters), 1)
            eager, graphed = Augmentation(cfg), Augmentation(graphed_cfg)
            x = torch.randint(0, 256, (s.batch, 3, 32, 32), dtype=torch.uint8, device=device)
            for seed in (0, 1):  # the first call captures; the second replays
                a, b = eager(x, torch.Generator().manual_seed(seed)), graphed(x, torch.Generator().manual_seed(seed))
            error = graphed.policy.graph_error
            same = bool(torch.equal(a, b))
            with sync_errors(True):  # the eager and the replayed policy must not synchronise
                eager(x, torch.Generator().manual_seed(2))
                graphed(x, torch.Generator().manual_seed(2))
            graphs[label] = {"identical_to_eager": same, "capture_error": error, "passed": same and error is None}
    with sync_errors(s.cuda):
        for cfg in augment_speed.pipelines().values():
            Augmentation(cfg)(torch.zeros(8, 3, 32, 32, dtype=torch.uint8, device=device),
                              torch.Generator().manual_seed(0))
    failed = [k for k, v in graphs.items() if not v["passed"]]
    return {"status": "failed" if failed else "measured", "device": str(device), "batch": s.batch,
            "img_per_s": rows, "cuda_graph": graphs or None, "fast_aa_policy": augment_speed.fast_aa_policy()[1],
            "synchronised": False if s.cuda else None}


# ----------------------------------------------------------------------------------------------- f. DDP + resume
DDP_SCRIPT = """
import json, sys, dataclasses
from pathlib import Path
import torch
import torch.distributed as dist
from micronet.training import RunOptions, run_stage
from micronet.training.recipe import parse_recipe

root, out, recipe_json, device = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
KILL_AT = int(sys.argv[5])
recipe = parse_recipe(json.loads(Path(recipe_json).read_text()), "tiny.yaml")
# A process group even for one process (DDP over NCCL on one GPU), reproducible kernels (bit-identity is the check).
base = RunOptions(data_root=root, out=out / "straight", device=device, progress=False, eval_batch_size=100,
                  deterministic=True, process_group=True)
straight = run_stage("student", recipe, base)

class Kill(Exception):
    pass

def kill(step, model):
    if step == KILL_AT:
        raise Kill()

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
    """torchrun with 1 process (a forced process group) and N, then a killed-and-resumed stage on each rank."""
    require("safetensors", "numpy", "torchvision")
    root = write_tiny_cifar10(s.work / "data")
    recipe_path = s.work / "ddp-recipe.json"
    recipe_path.write_text(json.dumps(tiny_recipe(epochs=2)))
    script = s.work / "ddp_resume.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    gpus = torch.cuda.device_count() if s.cuda else 0
    counts = [1] + ([gpus] if gpus > 1 else []) + ([] if s.cuda else [2])
    runs: dict[str, dict[str, Any]] = {}
    for n in counts:
        out = s.work / f"ddp-{n}"
        per_rank = math.ceil(100 / n)  # 100 training images, no holdout
        kill_at = math.ceil(per_rank / 32) + 1  # the second step of epoch 2 (after the epoch-1 checkpoint)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", str(script),
               str(root), str(out), str(recipe_path), "cuda" if s.cuda else "cpu", str(kill_at)]
        timeout = max(30.0, min(150.0, s.left() - 10))
        env = _child_env(OMP_NUM_THREADS="1", CUBLAS_WORKSPACE_CONFIG=":4096:8")
        code, tail = run_boxed(cmd, timeout, s.work / f"ddp-{n}.log", env)
        ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
        ok = code == 0 and len(ranks) == n and all(r["killed"] and r["resumed_identical"] for r in ranks)
        runs[f"nproc={n}"] = {"passed": ok, "returncode": code, "ranks": ranks,
                              **({} if ok else {"log_tail": tail.splitlines()[-20:]}),
                              **({"why": f"time box of {timeout:.0f} s ran out"} if code is None else {})}
    notes = "process group forced at world size 1 (DDP + " + ("NCCL" if s.cuda else "gloo") + "), deterministic"
    if s.cuda and gpus < 2:
        notes += "; one GPU here, so no N > 1 run"
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
    ratio = compiled.get("fake_quant_over_float_step_time_synthetic")
    aug = results.get("e_augmentation", {}).get("img_per_s", {})
    policy_speeds = [v for k, v in aug.items() if "policy" in k and "CUDA graph" not in k]
    pipeline = results.get("c_pipeline", {})
    syncs = [pipeline.get("sync_check_eager", {}).get("status")]
    syncs += [v.get("status") for v in pipeline.get("compiled", {}).get("sync_check_compiled", {}).values()]
    syncs = [x for x in syncs if x]
    return {
        "float_compiled_real_aug_img_s": {"target": f">= {TARGET_IMG_S}", "measured": float_aug,
                                          "met": None if float_aug is None else float_aug >= TARGET_IMG_S},
        "fake_quant_over_float": {"target": f"<= {TARGET_FQ_RATIO} (compiled, synthetic data)", "measured": ratio,
                                  "met": None if ratio is None else ratio <= TARGET_FQ_RATIO},
        "augmentation_over_training": {
            "target": f">= {TARGET_AUG_FACTOR}x (slowest eager policy pipeline / compiled float training)",
            "measured": None if not (policy_speeds and float_aug) else round(min(policy_speeds) / float_aug, 2),
            "met": None if not (policy_speeds and float_aug) else min(policy_speeds) >= TARGET_AUG_FACTOR * float_aug},
        "zero_host_syncs": {"measured": syncs, "met": None if not syncs else all(x == "passed" for x in syncs)},
    }


def incomplete_parts(sections: dict[str, Any]) -> list[str]:
    """Sections and parts that ran out of time (their results, if any, are partial)."""
    out = [name for name, r in sections.items() if r.get("incomplete")]
    out += [f"{name}.compiled" for name, r in sections.items() if (r.get("compiled") or {}).get("incomplete")]
    return out


def _rate_lines(label: str, block: dict[str, Any]) -> list[str]:
    lines = []
    for kind, v in block.get("img_per_s", {}).items():
        cells = "   ".join(f"{k} {v[k]:>10,.0f} img/s" for k in ("real_augmentation", "synthetic") if k in v)
        lines.append(f"  {label:<8} {kind:<12} {cells}")
    for key in ("fake_quant_over_float_step_time_synthetic", "fake_quant_over_float_step_time_real_augmentation"):
        if key in block:
            lines.append(f"  {label:<8} {key:<50} {block[key]}")
    return lines


def print_table(results: dict[str, Any]) -> None:
    """A readable summary: one line per section and sub-check."""
    lines = []
    for name, r in results["sections"].items():
        detail = r.get("why") or ""
        lines.append(f"{name:<16} {r['status']:<10} {r.get('seconds', 0):>7.1f}s  {detail}"[:200])
        compiled = r.get("compiled")
        if isinstance(compiled, dict):
            lines.append(f"  compiled         {compiled.get('status', '?'):<10} {compiled.get('seconds', 0):>7.1f}s  "
                         f"{compiled.get('why') or ''}"[:200])
        subs = {**(r.get("checks") or {}), **(r.get("runs") or {}), **(r.get("cuda_graph") or {})}
        for key in ("sync_check_eager",):
            if r.get(key):
                subs[key] = r[key]
        for stage, v in ((compiled or {}).get("sync_check_compiled") or {}).items():
            subs[f"sync_check_compiled {stage}"] = v
        for sub, v in subs.items():
            state = v.get("status") or ("passed" if v.get("passed") else "failed")
            first_sync = (v.get("first") or {}).get("where") or [""]
            where = v.get("why") or v.get("rule") or first_sync[-1]
            lines.append(f"  {sub:<30} {state:<8} {where}"[:200])
        for label, block in (("eager", r.get("eager")), ("compiled", compiled)):
            if isinstance(block, dict) and "img_per_s" in block and name == "d_throughput":
                lines += _rate_lines(label, block)
        if name == "e_augmentation" and "img_per_s" in r:
            for label, v in r["img_per_s"].items():
                lines.append(f"  {label:<52} {v:>12,.0f} img/s")
    if results.get("incomplete"):
        lines.append("INCOMPLETE (ran out of time): " + ", ".join(results["incomplete"]))
    lines.append("targets: " + json.dumps(results.get("targets", {})))
    print("\n".join(lines))


PARTS = {"compiled_pipeline": part_compiled_pipeline, "compiled_throughput": part_compiled_throughput}


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when everything ran and passed, 1 when a check failed, 3 when a part ran out of time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/gpu-check-<date>-<gpu>.json)")
    parser.add_argument("--model", help=f"the throughput model (section d; densenet100_k12 on CUDA, {TINY_MODEL} "
                                         "on the CPU)")
    parser.add_argument("--cpu", action="store_true", help="CPU-valid parts only (automatic without CUDA)")
    parser.add_argument("--budget", type=float, default=345.0, help="seconds for the whole run")
    parser.add_argument("--batch-size", type=int, default=None, help="throughput batch (256 on CUDA, 8 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed throughput steps (30 on CUDA, 1 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed throughput steps (10 on CUDA, 1 on CPU)")
    parser.add_argument("--sections", default="abcdefg", help="which sections to run, e.g. 'abe' (default: all)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    work = args.work or Path(tempfile.mkdtemp(prefix="micronet-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    s = Settings(cuda=cuda, budget=args.budget, start=time.perf_counter(), work=work,
                 model=args.model or ("densenet100_k12" if cuda else TINY_MODEL),
                 batch=args.batch_size or (256 if cuda else 8), steps=args.steps or (30 if cuda else 1),
                 warmup=args.warmup or (10 if cuda else 1), part_out=args.part_out)
    if not cuda:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.part:
        result = _run_section(args.part, PARTS[args.part], s, 0)
        write_json(args.part_out, result)
        return 0

    wanted = set(args.sections.lower().replace(",", ""))
    gpu = "cpu"
    if cuda:
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-").lower()
    out = args.out or ROOT / "benchmarks" / "results" / f"gpu-check-{datetime.date.today()}-{gpu}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    sections: dict[str, dict[str, Any]] = {}
    results = {"check": "micronet gpu-check (issue 17)", "mode": "cuda" if cuda else "cpu",
               "date": datetime.datetime.now().isoformat(timespec="seconds"), "gpu": gpu, "sections": sections}

    def save() -> None:  # after every section: an interrupted run keeps what it measured
        results["seconds"] = round(time.perf_counter() - s.start, 1)
        results["incomplete"] = incomplete_parts(sections)
        results["complete"] = not results["incomplete"]
        results["targets"] = targets(sections, cuda)
        write_json(out, results)

    def run(letter: str, fn: Callable[[Settings], dict[str, Any]], need: float) -> None:
        if letter in wanted:
            sections[SECTION_KEYS[letter]] = _run_section(letter, fn, s, need)
            save()

    def boxed(letter: str, part: str, timeout: float) -> None:
        section = sections.get(SECTION_KEYS[letter])
        if section is None:
            return
        if section["status"] == "skipped":  # its packages or the time are missing: the compiled run would be too
            section["compiled"] = {"status": "skipped", "why": "the eager section was skipped"}
        elif not cuda:
            section["compiled"] = {"status": "skipped",
                                   "why": "CPU mode: torch.compile is checked on CUDA only (too slow for a CPU run)"}
        else:
            section["compiled"] = _boxed(part, s, timeout)
            if section["compiled"].get("status") == "failed":
                section["status"] = "failed"
        save()

    run("a", section_env, 0)
    run("b", section_correctness, 10)
    run("c", section_pipeline, 30)
    run("d", section_throughput, 30)
    # The targets' measurement next; e, f and g need ~100 s after it, the compiled pipeline check gets what is left.
    boxed("d", "compiled_throughput", max(0.0, min(180.0, s.left() - 100)))
    run("e", section_augmentation, 10)
    run("f", section_ddp, 40)
    run("g", section_export, 10)
    boxed("c", "compiled_pipeline", max(0.0, s.left() - 5))
    save()
    print_table(results)
    print(f"results: {out} ({results['seconds']} s)")
    if any(r["status"] == "failed" for r in sections.values()):
        return 1
    return 0 if results["complete"] else 3


if __name__ == "__main__":
    sys.exit(main())
