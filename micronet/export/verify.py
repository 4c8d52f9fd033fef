"""Check an exported ONNX file against the PyTorch model it came from, in onnxruntime.

Three checks, all required:

1. **Weights**: every weight decoded from the file equals the model's weight exactly, twice over: once
   decoded here with numpy straight from the initializers, once as onnxruntime itself computes it
   (the dequantized weight values are added as extra graph outputs). Every ``ChannelAffine`` scale
   and bias must equal the stored constant bit for bit.
2. **Logits** on N inputs (real images when given, else seeded synthetic ones), judged against a float64
   evaluation of the same deploy form (``copy.deepcopy(deploy).double()``), never against PyTorch fp32 alone:

   * integer-domain graphs (``BuiltGraph.exact``): onnxruntime must reproduce PyTorch bit for bit;
   * otherwise the *faithful* rule: per sample, onnxruntime is within ``SLACK`` x PyTorch fp32's distance
     from the float64 logits (PyTorch's own distance on that sample, or its median over the samples when
     larger), or else the sample is a *tie flip*: walking the graph's modules in order, the first one where
     onnxruntime and float64 part (an integer-valued output that differs, a float output off by more than
     ``PART_REL`` of its scale) is an activation quantizer whose differing codes are each +-1, at an input
     whose onnxruntime and float64 values lie on the two sides of the rounding boundary and differ by no
     more than rounding (``PART_REL``). Top-1 must agree with float64 wherever PyTorch fp32's does, tie flip
     or not.
     Anything else (a code off by 2, a difference with no tie nearby, a wrong class) fails, naming the
     first module where onnxruntime and float64 part. The rule compares each sample with its own
     reference, so it does not depend on the input distribution.
3. **Dynamic batch**: batches of 1, 3 and 17 reproduce the corresponding rows of a batch-64 run (exactly
   for exact graphs; otherwise same top-1 everywhere and at most 1% of rows, minimum one, beyond 1e-4).

Sessions use onnxruntime's default options on purpose: that is how users will run the file, and with
the weights behind ``DequantizeLinear`` the defaults keep the convolutions exact (spec §2, §5).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper as onh
from torch import nn

from micronet.compress.integer_modules import ChannelAffine, RoundClamp
from micronet.errors import MicronetError
from micronet.export import encoding
from micronet.export.builder import INPUT_NAME, OUTPUT_NAME
from micronet.export.graph import BuiltGraph
from micronet.progress import progress_bar

ATOL = 1e-4  # reported: samples with every logit within ATOL of PyTorch fp32
MIN_WITHIN = 0.99  # dynamic-batch rows of float-input graphs: at most 1% beyond ATOL
SLACK = 4.0  # onnxruntime may be this many times further from float64 than PyTorch fp32 is
PART_REL = 2.0**-12  # a float value "parts" from float64 beyond this fraction of the tensor's scale
BATCH = 64
BATCH_CHECKS = (1, 3, 17)


@dataclass
class ParityReport:
    """Outcome of verifying one ONNX file against its PyTorch model."""

    mode: str  # "exact" (bit-identical required) or "statistical" (the float64-grounded faithful rule)
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
    float64_max_pytorch: float = 0.0  # max |PyTorch fp32 - float64| over all logits
    float64_max_onnxruntime: float = 0.0
    near_float64: int = 0  # samples where onnxruntime is within SLACK x PyTorch's distance from float64
    tie_flips: int = 0  # other samples, explained as +-1 code flips at rounding ties
    tie_layers: list[str] = field(default_factory=list)  # quantizers where those flips first happened
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
            f"  float64 reference: PyTorch fp32 max |diff| {self.float64_max_pytorch:.3g}, onnxruntime "
            f"{self.float64_max_onnxruntime:.3g}"
            + ("" if self.mode == "exact" else f"; {self.near_float64}/{n} samples as close as PyTorch's, "
               f"{self.tie_flips} tie flips")
            + (f" (first at {', '.join(self.tie_layers[:3])})" if self.tie_layers else ""),
            f"  dynamic batch: batches {', '.join(map(str, BATCH_CHECKS))} vs batch-{BATCH} rows, "
            f"max |diff| {self.batch_max_abs:.3g}",
        ]
        lines += [f"  note: {s}" for s in self.notes]
        lines += [f"  FAIL: {s}" for s in self.failures]
        return "\n".join(lines)


def load_onnx(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    """The ONNX model at ``path``; a file that is not one (truncated, damaged) raises a one-line MicronetError."""
    try:
        return onnx.load(str(path), load_external_data=load_external_data)
    except OSError as exc:
        raise MicronetError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # protobuf DecodeError, RuntimeWarning-turned-errors, ...: all mean "not ONNX"
        raise MicronetError(f"{Path(path).name} is not a readable ONNX file ({type(exc).__name__}: "
                            f"{_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _session(ort: Any, src: str | bytes, providers: list[str]):
    try:
        return ort.InferenceSession(src, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... for any model it cannot load
        what = Path(src).name if isinstance(src, str) else "the model"
        raise MicronetError(f"onnxruntime cannot load {what}: {_first_line(exc)}") from None


def make_session(model: str | Path | bytes, device: str = "cpu"):
    """onnxruntime session on ``device``; for CUDA, asserts the CUDA provider is really in use. A model that
    onnxruntime refuses raises a one-line MicronetError."""
    try:  # deferred on purpose: onnxruntime is optional (the onnx extras) and only verification needs it
        import onnxruntime as ort
    except ImportError:
        raise MicronetError(
            "onnxruntime is not installed; install micronet[onnx] (CPU) or micronet[onnx-gpu] (CUDA), not both"
        ) from None
    src = str(model) if isinstance(model, Path) else model
    if device == "cpu":
        return _session(ort, src, ["CPUExecutionProvider"])
    if device != "cuda":
        raise MicronetError(f"unknown device {device!r}; use 'cpu' or 'cuda'")
    sess = _session(ort, src, ["CUDAExecutionProvider", "CPUExecutionProvider"])
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


def stored_codes_failures(onnx_model: onnx.ModelProto, reference: nn.Module, built: BuiltGraph) -> list[str]:
    """Weights whose stored streams cannot be decoded (a damaged file), checked in numpy with every allocation
    bounded, before onnxruntime (which would allocate whatever the attributes claim) sees the file."""
    modules = dict(reference.named_modules())
    bad = []
    for rec in built.weights:
        if rec.kind == "codes" and rec.module in modules:
            try:
                encoding.read_codes(onnx_model, f"{rec.module}.weight", tuple(modules[rec.module].weight.shape))
            except MicronetError as exc:
                bad.append(str(exc))
    return bad


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
            try:
                got = encoding.read_codes(onnx_model, prefix, want.shape)
            except MicronetError as exc:
                bad.append(str(exc))
                continue
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
    got_all = _ort_run(sess, names, {INPUT_NAME: np.zeros((1, *_input_shape(onnx_model)), _input_dtype(onnx_model))})
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


def _input_dtype(onnx_model: onnx.ModelProto) -> type:
    """numpy dtype of the graph input: uint8 for pixel-input models, else float32."""
    elem = onnx_model.graph.input[0].type.tensor_type.elem_type
    return np.uint8 if elem == onnx.TensorProto.UINT8 else np.float32


def _ort_run(sess, names: list[str], feed: dict) -> list[np.ndarray]:
    """``sess.run``; a model onnxruntime loads but cannot run (a damaged file) raises a one-line MicronetError."""
    try:
        return sess.run(names, feed)
    except Exception as exc:  # onnxruntime's own error types (InvalidArgument, Fail, RuntimeException, ...)
        raise MicronetError(f"onnxruntime cannot run the model: {_first_line(exc)}") from None


def _run_ort(sess, x: np.ndarray, batch: int = BATCH, bar: Any = None) -> np.ndarray:
    outs = []
    for i in range(0, len(x), batch):
        outs.append(_ort_run(sess, [OUTPUT_NAME], {INPUT_NAME: x[i : i + batch]})[0])
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
    """Fill the PyTorch-fp32 part of ``report``; exact mode requires bit-identical logits."""
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
    if report.mode == "exact" and report.identical != n:
        report.failures.append(
            f"integer-domain graph must match bit for bit, but {n - report.identical}/{n} samples differ "
            f"(max |diff| {report.max_abs:.3g})"
        )
    if report.mode != "exact" and n < 512:
        report.notes.append(f"{n} samples; the rule is specified for >= 512")


def _statistical(ort_out: np.ndarray, ref: np.ndarray, ref64: np.ndarray, report: ParityReport) -> None:
    """The rule for graphs whose intermediate values cannot be compared (``If`` branches): at least
    ``MIN_WITHIN`` of the samples within ``ATOL`` of PyTorch fp32, and onnxruntime's top-1 equal to the float64
    reference's wherever PyTorch fp32's is."""
    n = len(ref)
    e_pt = np.abs(ref.astype(np.float64) - ref64).max(axis=1)
    e_ort = np.abs(ort_out.astype(np.float64) - ref64).max(axis=1)
    report.float64_max_pytorch, report.float64_max_onnxruntime = float(e_pt.max()), float(e_ort.max())
    report.notes.append("gated graph: values inside the If branches are not recorded, so the statistical rule "
                        f"applies ({MIN_WITHIN:.0%} of samples within {ATOL:g} of PyTorch, top-1 as float64)")
    if report.within_tol < MIN_WITHIN * n:
        report.failures.append(f"only {report.within_tol}/{n} samples have all logits within {ATOL:g} of PyTorch")
    top64 = ref64.argmax(1)
    wrong = np.flatnonzero((ref.argmax(1) == top64) & (ort_out.argmax(1) != top64))
    if wrong.size:
        report.failures.append(f"sample {wrong[0]}: onnxruntime's top-1 differs from the float64 reference's "
                               f"({wrong.size} samples)")


def compare_float64(ort_out: np.ndarray, ref: np.ndarray, ref64: np.ndarray, report: ParityReport,
                    explain: Callable[[np.ndarray], dict[int, Parting]] | None = None) -> None:
    """Judge onnxruntime against the float64 evaluation ``ref64`` (PyTorch fp32 ``ref`` sets the yardstick).

    ``explain(indices)`` says for those samples where onnxruntime first parts from float64
    (:func:`first_parting`). Exact mode: differing samples are only explained (the first module where they
    part is named); otherwise the faithful rule of the module docstring decides.
    """
    e_pt = np.abs(ref.astype(np.float64) - ref64).max(axis=1)
    e_ort = np.abs(ort_out.astype(np.float64) - ref64).max(axis=1)
    report.float64_max_pytorch, report.float64_max_onnxruntime = float(e_pt.max()), float(e_ort.max())
    if report.mode == "exact":
        bad = np.flatnonzero(~np.all(ort_out == ref, axis=1))
        if bad.size and explain is not None:
            named = [p.describe() for p in explain(bad[:8]).values() if p.layer]
            if named:
                report.failures.append(f"sample {bad[0]}: onnxruntime {named[0]}")
        return
    _faithful(ort_out, ref, ref64, e_pt, e_ort, report, explain)


def _faithful(ort_out: np.ndarray, ref: np.ndarray, ref64: np.ndarray, e_pt: np.ndarray, e_ort: np.ndarray,
              report: ParityReport, explain) -> None:
    """The float64-grounded rule for graphs that are not bit-exact by construction (module docstring)."""
    scale = np.abs(ref64).max(axis=1)
    # PyTorch's own distance from float64 on this sample, or its typical one; a floor of a few fp32 ulps
    typical = max(float(np.median(e_pt)), 0.0)
    allowed = SLACK * np.maximum(np.maximum(e_pt, typical), 4 * np.finfo(np.float32).eps * (1 + scale))
    near = e_ort <= allowed
    report.near_float64 = int(near.sum())
    far = np.flatnonzero(~near)
    parts = explain(far) if (explain is not None and far.size) else {}
    flips: dict[int, Parting] = {}
    for i in far:
        p = parts.get(int(i))
        if p is None or not p.tie:
            what = p.describe() if p is not None else "no intermediate values to explain it"
            report.failures.append(f"sample {i}: onnxruntime is {e_ort[i]:.3g} from the float64 reference "
                                   f"(PyTorch fp32 {e_pt[i]:.3g}); {what}")
        else:
            flips[int(i)] = p
    report.tie_flips = len(flips)
    report.tie_layers = list(dict.fromkeys(p.layer for p in flips.values()))
    top64 = ref64.argmax(1)
    idx = np.arange(len(ref64))
    pt_right = ref[idx, top64] >= ref.max(1)
    ort_right = ort_out[idx, top64] >= ort_out.max(1)
    # No exception for tie flips: a flip that changes the class where PyTorch fp32 keeps float64's is a failure,
    # however small float64's own top-2 margin (issue 11: "a wrong class fails").
    for i in np.flatnonzero(pt_right & ~ort_right):
        why = f" (after {flips[int(i)].describe()})" if int(i) in flips else ""
        report.failures.append(f"sample {i}: onnxruntime's top-1 differs from the float64 reference's "
                               f"where PyTorch fp32's agrees{why}")
    if len(report.failures) > 5:
        report.failures[5:] = [f"... {len(report.failures) - 5} more failing samples"]


@dataclass
class Parting:
    """Where onnxruntime first parts from the float64 reference on one sample."""

    layer: str = ""  # module path ("" when no recorded module output differs)
    tie: bool = False  # explained: +-1 code flips at rounding ties
    detail: str = ""

    def describe(self) -> str:
        """One phrase for a failure message."""
        if not self.layer:
            return "no module output parts from float64 (the difference arises after the last recorded module)"
        return f"first parts from float64 at '{self.layer}': {self.detail}"


def first_parting(onnx_model: onnx.ModelProto, reference: nn.Module, built: BuiltGraph, x: torch.Tensor,
                  device: str = "cpu") -> list[Parting]:
    """For each sample of ``x``: the first module (execution order) whose onnxruntime output parts from float64.

    onnxruntime's intermediate values come from the same file with those values added as graph outputs;
    float64 ones from forward hooks on a float64 copy of ``reference``. A quantizer (RoundClamp) that parts
    only by +-1 codes whose input straddles the rounding boundary within rounding error is a tie flip.
    """
    values = built.module_values
    if not values:
        return [Parting() for _ in range(len(x))]
    names = list(dict.fromkeys(n for _, i, o in values for n in (i, o) if n != INPUT_NAME))
    probe = onnx.ModelProto()
    probe.CopyFrom(onnx_model)
    existing = {o.name for o in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = make_session(probe.SerializeToString(), device)
    xin = x.detach().cpu().contiguous()
    got = dict(zip(names, _ort_run(sess, names, {INPUT_NAME: xin.numpy()})))
    got[INPUT_NAME] = xin.numpy()

    ref64 = copy.deepcopy(reference).cpu().double().eval()
    captured: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    modules = dict(ref64.named_modules())

    def hook(fqn: str):
        def keep(_m, args, out):
            if fqn not in captured and args and isinstance(args[0], torch.Tensor):
                captured[fqn] = (args[0].detach().double().numpy(), out.detach().double().numpy())
        return keep

    handles = [modules[f].register_forward_hook(hook(f)) for f, _, _ in values if f in modules]
    try:
        with torch.inference_mode():
            ref64(xin if not xin.is_floating_point() else xin.double())
    finally:
        for h in handles:
            h.remove()
    return [_part_one(s, values, got, captured, modules) for s in range(len(x))]


def _part_one(s: int, values, got: dict, captured: dict, modules: dict) -> Parting:
    for fqn, in_name, out_name in values:
        if fqn not in captured:
            continue
        x64, y64 = captured[fqn][0][s], captured[fqn][1][s]
        y = got[out_name][s].astype(np.float64)
        if y.shape != y64.shape:
            return Parting(fqn, False, f"output shape {y.shape} vs {y64.shape}")
        tensor_scale = max(1.0, float(np.abs(y64).max(initial=0.0)))
        integer = np.array_equal(y64, np.rint(y64)) and tensor_scale < 2**24
        if integer:
            differs = y != y64
        else:
            differs = np.abs(y - y64) > PART_REL * tensor_scale
        if not differs.any():
            continue
        m = modules.get(fqn)
        if isinstance(m, RoundClamp) and integer:
            return _tie(fqn, got[in_name][s].astype(np.float64), x64, y, y64, differs)
        worst = float(np.abs(y - y64).max())
        return Parting(fqn, False, f"{int(differs.sum())} of {y.size} values differ (max |diff| {worst:.3g}, "
                                   f"tensor scale {tensor_scale:.3g})")
    return Parting()


def _tie(fqn: str, x: np.ndarray, x64: np.ndarray, codes: np.ndarray, codes64: np.ndarray,
         differs: np.ndarray) -> Parting:
    """Is every differing code of a quantizer a +-1 flip at a rounding tie?"""
    step = np.abs(codes - codes64)[differs]
    n = int(differs.sum())
    if step.max() > 1:
        return Parting(fqn, False, f"{n} activation codes differ, some by {int(step.max())} (a tie flip is +-1)")
    boundary = np.minimum(codes, codes64)[differs] + 0.5
    xo, xr = x[differs], x64[differs]
    # onnxruntime's and float64's inputs must lie on the two sides of the boundary ...
    straddle = (xo - boundary) * (xr - boundary) <= 0
    # ... and differ only by rounding: no more than the layer's own fp32 error allows
    scale = max(1.0, float(np.abs(x64).max(initial=0.0)))
    rounding = np.abs(xo - xr) <= PART_REL * scale
    if not (straddle.all() and rounding.all()):
        far = float(np.abs(xr - boundary).max())
        return Parting(fqn, False, f"{n} activation codes differ by 1 with no rounding tie nearby (input up to "
                                   f"{far:.3g} from the boundary)")
    return Parting(fqn, True, f"{n} codes flipped at rounding ties (input within "
                              f"{float(np.abs(xr - boundary).max()):.2g} of k+0.5)")


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
    onnx_model = load_onnx(path)
    mode = "exact" if built.exact else "statistical"
    damaged = stored_codes_failures(onnx_model, reference, built)
    if damaged:  # onnxruntime would decode the same streams, allocating whatever their attributes claim
        return ParityReport(mode=mode, samples=len(inputs), source=source, providers=[], failures=damaged)
    sess = make_session(Path(path), device)
    report = ParityReport(
        mode=mode,
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

    x = inputs.detach().cpu().contiguous()
    x = x.float() if x.is_floating_point() else x
    dev = _torch_device(device)
    bar.set_description("export verification: PyTorch logits")
    ref = _run_torch(reference.to(dev), x, dev, bar=bar)
    ref64 = float64_logits(reference, x)
    bar.set_description("export verification: onnxruntime logits")
    ort_out = _run_ort(sess, x.numpy(), bar=bar)

    def explain(indices: np.ndarray) -> dict[int, Parting]:
        if not len(indices):
            return {}
        parts = first_parting(onnx_model, reference, built, x[torch.as_tensor(indices, dtype=torch.long)], device)
        return {int(i): p for i, p in zip(indices, parts)}

    compare_logits(ort_out, ref, report)
    if built.opaque_branches:
        _statistical(ort_out, ref, ref64, report)
    else:
        compare_float64(ort_out, ref, ref64, report, explain)

    bar.set_description("export verification: dynamic batch")
    _check_batches(sess, x, ort_out, built.exact, report, bar)
    return report


def float64_logits(reference: nn.Module, x: torch.Tensor, batch: int = BATCH) -> np.ndarray:
    """Logits of a float64 copy of the deploy form (uint8 pixel inputs stay uint8: the model casts them)."""
    model = copy.deepcopy(reference).cpu().double().eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb = x[i : i + batch]
            outs.append(model(xb.double() if xb.is_floating_point() else xb).double())
    return torch.cat(outs).numpy()


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
        got = _ort_run(sess, [OUTPUT_NAME], {INPUT_NAME: x[:b].numpy()})[0]
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
    proto = load_onnx(path, load_external_data=False)
    shape, pixels = _input_shape(proto), _input_dtype(proto) == np.uint8
    ort_ms, pt_ms = {}, {}
    for b in batches:
        g = torch.Generator().manual_seed(1)
        x = (torch.randint(0, 256, (b, *shape), generator=g, dtype=torch.uint8) if pixels
             else torch.randn((b, *shape), generator=g))
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
