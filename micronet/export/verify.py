"""Check an exported ONNX file against the PyTorch model it came from, in onnxruntime.

Three checks, all required:

1. **Weights**: every weight decoded from the file equals the model's weight exactly, twice over: once
   decoded here with numpy straight from the initializers, once as onnxruntime itself computes it
   (the dequantized weight values are added as extra graph outputs). Every ``ChannelAffine`` scale
   and bias must equal the stored constant bit for bit.
2. **Logits** on N inputs (real images when given, else seeded synthetic ones): when the graph is
   integer-domain end to end (``BuiltGraph.exact``) onnxruntime must reproduce PyTorch bit for bit;
   otherwise at least 99% of samples must have every logit within 1e-4 and top-1 must agree on every
   sample (spec onnx-export.md §5).
3. **Dynamic batch**: batches of 1, 3 and 17 reproduce the corresponding rows of a batch-64 run (exactly
   for exact graphs; otherwise same top-1 everywhere and at most 1% of rows, minimum one, beyond 1e-4).

Sessions use onnxruntime's default options on purpose: that is how users will run the file, and with
the weights behind ``DequantizeLinear`` the defaults keep the convolutions exact (spec §2, §5).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper as onh
from torch import nn

from micronet.compress.integer_modules import ChannelAffine
from micronet.errors import MicronetError
from micronet.export import encoding
from micronet.export.builder import INPUT_NAME, OUTPUT_NAME
from micronet.export.graph import BuiltGraph
from micronet.progress import progress_bar

ATOL = 1e-4  # per-logit tolerance of the statistical check
MIN_WITHIN = 0.99  # fraction of samples that must be within ATOL
BATCH = 64
BATCH_CHECKS = (1, 3, 17)


@dataclass
class ParityReport:
    """Outcome of verifying one ONNX file against its PyTorch model."""

    mode: str  # "exact" (bit-identical required) or "statistical"
    samples: int
    source: str  # "synthetic" or "data"
    providers: list[str]
    weights_checked: int = 0
    scales_checked: int = 0
    identical: int = 0  # samples whose logits are bit-identical
    within_tol: int = 0  # samples whose logits are all within ATOL
    top1_agree: int = 0
    max_abs: float = 0.0
    mean_abs: float = 0.0
    batch_max_abs: float = 0.0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {**asdict(self), "passed": self.passed}

    def format(self) -> str:
        """Human-readable summary (a few lines)."""
        n = self.samples
        lines = [
            f"parity ({', '.join(self.providers)} vs PyTorch, {n} {self.source} samples, {self.mode} mode): "
            + ("PASSED" if self.passed else "FAILED"),
            f"  weights: {self.weights_checked} tensors and {self.scales_checked} scale/bias vectors equal",
            f"  logits: {self.identical}/{n} bit-identical, {self.within_tol}/{n} within {ATOL:g}, "
            f"top-1 agrees on {self.top1_agree}/{n}; max |diff| {self.max_abs:.3g}, mean {self.mean_abs:.3g}",
            f"  dynamic batch: batches {', '.join(map(str, BATCH_CHECKS))} vs batch-{BATCH} rows, "
            f"max |diff| {self.batch_max_abs:.3g}",
        ]
        lines += [f"  note: {s}" for s in self.notes]
        lines += [f"  FAIL: {s}" for s in self.failures]
        return "\n".join(lines)


def make_session(model: str | Path | bytes, device: str = "cpu"):
    """onnxruntime session on ``device``; for CUDA, asserts the CUDA provider is really in use."""
    try:  # deferred on purpose: onnxruntime is optional (the onnx extras) and only verification needs it
        import onnxruntime as ort
    except ImportError:
        raise MicronetError(
            "onnxruntime is not installed; install micronet[onnx] (CPU) or micronet[onnx-gpu] (CUDA), not both"
        ) from None
    src = str(model) if isinstance(model, Path) else model
    if device == "cpu":
        return ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    if device != "cuda":
        raise MicronetError(f"unknown device {device!r}; use 'cpu' or 'cuda'")
    sess = ort.InferenceSession(src, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    # onnxruntime-gpu lists CUDA as available even without a GPU and silently falls back to CPU.
    if "CUDAExecutionProvider" not in sess.get_providers():
        raise MicronetError(
            "onnxruntime could not use CUDA (session providers: "
            f"{sess.get_providers()}); it needs micronet[onnx-gpu] (onnxruntime-gpu; the PyPI 1.31 build wants "
            "CUDA 13 + cuDNN 9) installed instead of onnxruntime, and an NVIDIA GPU"
        )
    return sess


def _torch_device(device: str) -> torch.device:
    return torch.device("cuda") if device == "cuda" and torch.cuda.is_available() else torch.device("cpu")


def check_weights(onnx_model: onnx.ModelProto, reference: nn.Module, built: BuiltGraph, device: str) -> tuple:
    """Compare every stored weight and scale with the model's; returns (mismatches, n_weights, n_scales)."""
    modules = dict(reference.named_modules())
    inits = {t.name: t for t in onnx_model.graph.initializer}
    bad: list[str] = []
    expected: dict[str, np.ndarray] = {}
    for rec in built.weights:
        prefix = f"{rec.module}.weight"
        want = modules[rec.module].weight.detach().cpu().float().numpy() if rec.module in modules else None
        if want is None:  # functional conv/linear: compare against what the builder stored
            continue
        expected[prefix] = want
        if rec.kind == "codes":
            got = encoding.read_codes(onnx_model, prefix)
            if got is None:
                bad.append(f"{prefix}: missing from the file")
            elif got.shape != want.shape or not np.array_equal(got, want.astype(np.int64)):
                bad.append(f"{prefix}: stored codes differ from the model's ({_count_diff(got, want)})")
        elif prefix not in inits or not np.array_equal(onh.to_array(inits[prefix]), want):
            bad.append(f"{prefix}: stored float weight differs from the model's")

    # The same weights as onnxruntime decodes them: expose the dequantized values as extra outputs.
    probe = onnx.ModelProto()
    probe.CopyFrom(onnx_model)
    for name, want in expected.items():
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, want.shape))
    sess = make_session(probe.SerializeToString(), device)
    names = [o.name for o in sess.get_outputs() if o.name in expected]  # not the model's own outputs
    got_all = sess.run(names, {INPUT_NAME: np.zeros((1, *_input_shape(onnx_model)), np.float32)})
    for name, got in zip(names, got_all):
        if not np.array_equal(got, expected[name]):
            bad.append(f"{name}: weight decoded by onnxruntime differs from the model's "
                       f"({_count_diff(got, expected[name])})")

    scales = 0
    for fqn, m in modules.items():
        if not isinstance(m, ChannelAffine):
            continue
        for attr in ("scale", "bias"):
            t = getattr(m, attr)
            if t is None:
                continue
            key = f"{fqn}.{attr}"
            if key not in inits:
                continue  # module not reached by the traced forward
            scales += 1
            if not np.array_equal(onh.to_array(inits[key]).reshape(-1), t.detach().cpu().numpy().reshape(-1)):
                bad.append(f"{key}: stored per-channel {attr} differs from the model's")
    return bad, len(expected), scales


def _count_diff(got: np.ndarray, want: np.ndarray) -> str:
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} vs {tuple(want.shape)}"
    return f"{int(np.count_nonzero(got != want))} of {want.size} values"


def _input_shape(onnx_model: onnx.ModelProto) -> tuple[int, ...]:
    dims = onnx_model.graph.input[0].type.tensor_type.shape.dim[1:]
    return tuple(int(d.dim_value) for d in dims)


def _run_ort(sess, x: np.ndarray, batch: int = BATCH, bar: Any = None) -> np.ndarray:
    outs = []
    for i in range(0, len(x), batch):
        outs.append(sess.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch]})[0])
        if bar is not None:
            bar.update()
    return np.concatenate(outs)


def _run_torch(model: nn.Module, x: torch.Tensor, dev: torch.device, batch: int = BATCH, bar: Any = None,
               ) -> np.ndarray:
    outs = []
    # The reference must be true fp32: TF32 convs/matmuls (PyTorch's cuDNN default) round float inputs.
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            for i in range(0, len(x), batch):
                outs.append(model(x[i : i + batch].to(dev)).float().cpu())
                if bar is not None:
                    bar.update()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return torch.cat(outs).numpy()


def compare_logits(ort_out: np.ndarray, ref: np.ndarray, report: ParityReport) -> None:
    """Fill the logits part of ``report`` and record failures under its mode's rule."""
    diff = np.abs(ort_out.astype(np.float64) - ref.astype(np.float64))
    per_sample = diff.max(axis=1)
    n = len(ref)
    report.identical = int(np.sum(np.all(ort_out == ref, axis=1)))
    report.within_tol = int(np.sum(per_sample <= ATOL))
    # A sample agrees when PyTorch's top class is also onnxruntime's, up to an exact tie.
    ref_top = ref.argmax(1)
    report.top1_agree = int(np.sum(ort_out[np.arange(n), ref_top] >= ort_out.max(1)))
    report.max_abs, report.mean_abs = float(diff.max()), float(diff.mean())
    if not np.all(np.isfinite(ort_out)):
        report.failures.append("onnxruntime produced non-finite logits")
    if report.mode == "exact":
        if report.identical != n:
            report.failures.append(
                f"integer-domain graph must match bit for bit, but {n - report.identical}/{n} samples differ "
                f"(max |diff| {report.max_abs:.3g})"
            )
        return
    if report.within_tol < MIN_WITHIN * n:
        report.failures.append(
            f"only {report.within_tol}/{n} samples have all logits within {ATOL:g} (need {MIN_WITHIN:.0%})"
        )
    if report.top1_agree != n:
        report.failures.append(f"top-1 differs on {n - report.top1_agree}/{n} samples")
    if n < 512:
        report.notes.append(f"{n} samples; the statistical rule is specified for >= 512")


def verify(
    path: str | Path,
    reference: nn.Module,
    built: BuiltGraph,
    inputs: torch.Tensor,
    *,
    source: str = "synthetic",
    device: str = "cpu",
    progress: bool = False,
) -> ParityReport:
    """Run all checks on the file at ``path`` against the integer-form ``reference`` model (``progress``: a bar
    over the weight check, the PyTorch and onnxruntime batches and the dynamic-batch checks)."""
    batches = -(-len(inputs) // BATCH)
    bar = progress_bar(1 + 2 * batches + len(BATCH_CHECKS), "export verification: weights", progress, unit="step")
    try:
        return _verify(path, reference, built, inputs, source, device, bar)
    finally:
        bar.close()


def _verify(path: str | Path, reference: nn.Module, built: BuiltGraph, inputs: torch.Tensor, source: str,
            device: str, bar: Any) -> ParityReport:
    onnx_model = onnx.load(str(path))
    sess = make_session(Path(path), device)
    report = ParityReport(
        mode="exact" if built.exact else "statistical",
        samples=len(inputs),
        source=source,
        providers=list(sess.get_providers()[:1]),
    )
    if not built.exact:
        report.notes.append("not bit-exact by construction: " + "; ".join(built.inexact_reasons[:3])
                            + (" ..." if len(built.inexact_reasons) > 3 else ""))
    bad, report.weights_checked, report.scales_checked = check_weights(onnx_model, reference, built, device)
    report.failures.extend(bad)
    bar.update()

    x = inputs.detach().float().cpu().contiguous()
    dev = _torch_device(device)
    bar.set_description("export verification: PyTorch logits")
    ref = _run_torch(reference.to(dev), x, dev, bar=bar)
    bar.set_description("export verification: onnxruntime logits")
    ort_out = _run_ort(sess, x.numpy(), bar=bar)
    compare_logits(ort_out, ref, report)

    bar.set_description("export verification: dynamic batch")
    _check_batches(sess, x, ort_out, built.exact, report, bar)
    return report


def _check_batches(sess, x: torch.Tensor, ort_out: np.ndarray, exact: bool, report: ParityReport,
                   bar: Any = None) -> None:
    """Small batches must reproduce the batch-64 rows: exactly in exact mode, else by the statistical rule.

    Convolution algorithms may change with the batch size, so a float-input layer can flip a rounding
    decision between batch sizes just as between PyTorch and onnxruntime; top-1 must still agree.
    """
    rows = ort_out[: min(len(x), BATCH)]
    worst, checked, beyond, top1_bad = 0.0, 0, 0, 0
    for b in BATCH_CHECKS:
        if bar is not None:
            bar.update()
        if b > len(rows):
            continue
        got = sess.run([OUTPUT_NAME], {INPUT_NAME: x[:b].numpy()})[0]
        if got.shape != (b, rows.shape[1]):
            report.failures.append(f"batch {b}: output shape {got.shape}")
            continue
        diff = np.abs(got - rows[:b]).max(axis=1)
        worst = max(worst, float(diff.max()))
        checked += b
        beyond += int(np.sum(diff > (0.0 if exact else ATOL)))
        top1_bad += int(np.sum(got.argmax(1) != rows[:b].argmax(1)))
    report.batch_max_abs = worst
    allowed = 0 if exact else max(1, int((1 - MIN_WITHIN) * checked))
    if beyond > allowed or top1_bad:
        report.failures.append(
            f"dynamic batch: {beyond}/{checked} rows of batches {BATCH_CHECKS} differ from the batch-{BATCH} "
            f"rows (max {worst:.3g}), {top1_bad} with a different top-1"
        )


@dataclass
class Latency:
    """Median wall time per forward pass, in milliseconds, by batch size."""

    onnxruntime: dict[int, float]
    pytorch: dict[int, float]
    device: str

    def format(self) -> str:
        """A small table."""
        batches = sorted(self.onnxruntime)
        head = "latency (ms, median)" + "".join(f"  batch {b:>4}" for b in batches)
        ort_row = "  onnxruntime       " + "".join(f"  {self.onnxruntime[b]:>10.2f}" for b in batches)
        pt_row = "  pytorch (int form)" + "".join(f"  {self.pytorch[b]:>10.2f}" for b in batches)
        return "\n".join([head, ort_row, pt_row])


def measure_latency(
    path: str | Path, reference: nn.Module, *, device: str = "cpu", batches: tuple[int, ...] = (1, 64),
    runs: int = 5,
) -> Latency:
    """onnxruntime vs PyTorch (integer form, eager) forward time at each batch size."""
    sess = make_session(Path(path), device)
    dev = _torch_device(device)
    model = reference.to(dev)
    shape = _input_shape(onnx.load(str(path), load_external_data=False))
    ort_ms, pt_ms = {}, {}
    for b in batches:
        x = torch.randn((b, *shape), generator=torch.Generator().manual_seed(1))
        xn = x.numpy()
        ort_ms[b] = _median_ms(lambda xn=xn: sess.run([OUTPUT_NAME], {INPUT_NAME: xn}), runs)
        xd = x.to(dev)

        def torch_forward(xd: torch.Tensor = xd) -> None:
            with torch.inference_mode():
                model(xd)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        pt_ms[b] = _median_ms(torch_forward, runs)
    return Latency(ort_ms, pt_ms, device)


def _median_ms(fn, runs: int) -> float:
    fn()  # warm-up: first runs allocate and pick kernels
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
