"""The scorer's entry point: ``score(model, ...)``."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

from micronet.collector import collector_paused
from micronet.compress import deploy_form
from micronet.compress.pixel_input import PIXEL_BITS, check_pixel_input, pixel_input_of
from micronet.compress.state import has_training_form, model_device, preserved_modes
from micronet.data import get_normalization
from micronet.errors import MicronetError
from micronet.progress import progress_bar
from micronet.scoring.accounting import Accounts, account
from micronet.scoring.policy import Policy, Track, get_track, resolve_policy
from micronet.scoring.report import DynamicCompute, ScoreReport
from micronet.scoring.trace import ProtectedWrite, Trace, storages_of, trace_model


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    with preserved_modes(model):
        model.eval()
        yield


# Input side of each track's images when the caller gives none (CIFAR 32x32, ImageNet 224x224).
TRACK_INPUT_SIZE = {"cifar100": 32, "imagenet": 224}


#: ``input_dtype`` names (the CLI's ``--input-dtype``): integer ones for token ids and other integer inputs.
INPUT_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
                "int8": torch.int8, "uint8": torch.uint8}


def resolve_input_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``input_dtype`` as a torch dtype (None stays None: the model's float dtype)."""
    if value is None or isinstance(value, torch.dtype) and value in INPUT_DTYPES.values():
        return value
    if isinstance(value, str) and value in INPUT_DTYPES:
        return INPUT_DTYPES[value]
    raise MicronetError(f"unknown input dtype {value!r}; use one of {', '.join(INPUT_DTYPES)}")


def _integer_high(model: nn.Module, dtype: torch.dtype) -> int:
    """Exclusive upper bound of synthetic integer inputs: below the smallest embedding table (token ids valid for
    every table), else the values an 8-bit code holds (non-negative, within ``dtype``)."""
    tables = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)]
    return min(tables) if tables else min(256, torch.iinfo(dtype).max + 1)


def _synthetic_inputs(samples: int, shape: tuple[int, ...], device: torch.device,
                      dtype: torch.dtype = torch.float32, channels_last: bool = False,
                      high: int = 2) -> Iterator[Tensor]:
    """Deterministic normalised-image-like inputs of ``shape`` (batch 1 first), one example each (NHWC for an
    NHWC pixel-input model); integers in [0, ``high``) for an integer ``dtype`` (token ids)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(samples):
        if dtype.is_floating_point:
            x = torch.randn(shape, generator=gen)
        else:
            x = torch.randint(0, high, shape, generator=gen)
        yield (x.permute(0, 2, 3, 1).contiguous() if channels_last else x).to(device=device, dtype=dtype)


def _model_dtype(model: nn.Module) -> torch.dtype:
    """Floating dtype of the model's first floating parameter (its inputs must match), fp32 if none."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _input_dtype(model: nn.Module, in_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of the (synthetic) inputs a float-input ``model`` is fed: ``input_dtype`` when given (token ids),
    else the model's own float dtype."""
    return in_dtype or _model_dtype(model)


def input_shape_for(
    track: Track, input_size: int | tuple[int, int] | None, input_shape: tuple[int, ...] | None, in_channels: int
) -> tuple[int, ...]:
    """The example shape scored (batch 1 first): ``input_shape`` as given, else an image of ``input_size``
    (the track's default side when None)."""
    if input_shape is not None:
        shape = tuple(int(d) for d in input_shape)
        if not shape or any(d < 1 for d in shape):
            raise MicronetError(f"input shape must be positive integers, got {input_shape!r}")
        return shape if shape[0] == 1 else (1, *shape)
    if input_size is None:
        input_size = TRACK_INPUT_SIZE.get(track.name, 32)
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if h < 1 or w < 1:
        raise MicronetError(f"input size must be positive, got {input_size!r}")
    return (1, in_channels, int(h), int(w))


def _split_examples(data: Tensor | Iterable[Any], samples: int) -> Iterator[Tensor]:
    """Examples one at a time (batch 1), from a tensor or an iterable of tensors / (x, y) batches."""
    count = 0
    batches = [data] if isinstance(data, Tensor) else data
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if x.dim() == 3:
            x = x.unsqueeze(0)
        for i in range(x.shape[0]):
            if count >= samples:
                return
            yield x[i : i + 1]
            count += 1


def _gate_rates(model: nn.Module) -> dict[str, float]:
    """Per-gate execution rates exposed by a dynamic model (``gate_rates()`` or ``execution_rates()``)."""
    for attr in ("gate_rates", "execution_rates"):
        fn = getattr(model, attr, None)
        if callable(fn):
            try:
                rates = fn()
            except Exception:
                return {}
            items = rates.items() if isinstance(rates, dict) else enumerate(rates)
            return {(f"gate{k}" if isinstance(k, int) else str(k)): float(v) for k, v in items}
    return {}


def _reset_gate_stats(model: nn.Module) -> None:
    fn = getattr(model, "reset_gate_stats", None)
    if callable(fn):
        fn()


@contextlib.contextmanager
def _gates_forced(model: nn.Module, state: bool) -> Iterator[None]:
    """Every gate open (True) or shut (False) inside the block, for models that support ``force_gates``."""
    before = model.force_gates
    model.force_gates = state
    try:
        yield
    finally:
        model.force_gates = before


def _total_ops(acc: Accounts) -> Fraction:
    return sum((r.ops for r in acc.rows), Fraction(0))


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _dynamic_compute(target: nn.Module, traces: list[Trace], param_traces: list[Trace], pol: Policy, trk: Track,
                     acc: Accounts, real_data: bool, trace_one: Callable[[], Trace]) -> DynamicCompute:
    """Worst case (every gate open), the gate network's share and the per-example ops of a dynamic model."""
    per_example = [float(_total_ops(account([t], pol))) for t in traces]
    worst_ops = _total_ops(acc)
    if hasattr(target, "force_gates"):
        with _gates_forced(target, True):
            worst_ops = _total_ops(account([trace_one()], pol))
    prefixes = getattr(target, "gate_module_names", ())
    gate_rows = [r for r in acc.rows if _under(r.name, prefixes)]
    n = len(traces)
    label = (f"mean over {n} real test images" if real_data else
             f"estimate over {n} images (synthetic inputs; pass --data-root for the test images)")
    return DynamicCompute(
        label=label, images=n, real_images=real_data, worst_ops=worst_ops,
        worst_op_score=float(worst_ops / trk.baseline_ops),
        gate_ops=sum((r.ops for r in gate_rows), Fraction(0)),
        gate_params=sum((r.params for r in gate_rows), Fraction(0)),
        ops_per_example=per_example,
    )


def is_dynamic(model: nn.Module) -> bool:
    """True for input-dependent networks (SkipNet-style gates), whose ops must be averaged over examples."""
    return bool(getattr(model, "is_dynamic", False)) or any(
        callable(getattr(model, a, None)) for a in ("gate_rates", "execution_rates")
    )


@contextlib.contextmanager
def _forward_errors(input_size: object, dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """Turn a failing traced forward (e.g. an input size the architecture cannot take) into a one-line error."""
    try:
        yield
    except MicronetError:
        raise
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        hint = ""
        if dtype.is_floating_point and "indices" in first:  # e.g. an nn.Embedding given float "token ids"
            hint = " (token ids? pass input_dtype='int64', --input-dtype int64 on the CLI)"
        raise MicronetError(f"the model's forward pass failed at input size {input_size} ({str(dtype)[6:]}): "
                            f"{first}{hint}") from None


@dataclass
class _Scored:
    """What tracing and accounting one deploy form yields."""

    policy: Policy
    accounts: Accounts
    shape: tuple[int, ...]
    pixels: Any
    rates: dict[str, float]
    dynamic: DynamicCompute | None
    input_dtype: torch.dtype
    input_bits: int


def _release_tensors(model: nn.Module) -> None:
    """Drop a scored deploy form's references to its tensors (the copy's own, or the caller's it shares).

    A deploy form is an fx GraphModule, whose graph refers back to it: a reference cycle that only the cyclic
    garbage collector frees, possibly long after ``score()`` returned, so back-to-back scores would hold two
    sets of folded weights. Nothing reads the copy after scoring.
    """
    for module in model.modules():
        module._parameters.clear()
        module._buffers.clear()


def _remember(examples: Iterator[Tensor], seen: list[Tensor]) -> Iterator[Tensor]:
    """``examples``, each also appended (as a copy, not a view of its whole batch) to ``seen``."""
    for x in examples:
        seen.append(x.clone())
        yield x


def _trace_and_account(target: nn.Module, pol: Policy, trk: Track, overrides: dict[str, Any],
                       shape: tuple[int, ...], shown_size: str, samples: int | None,
                       examples: Iterator[Tensor] | None, bar: Any, protected: frozenset[int],
                       in_dtype: torch.dtype | None) -> _Scored:
    """Trace the deploy form ``target`` on its examples (synthetic when ``examples`` is None) and account."""
    pixels = pixel_input_of(target)
    if pixels is not None and "input_bits" not in overrides:
        # What runs takes 8-bit pixels: the first layer multiplies 8-bit inputs (policy field, in the JSON).
        pol = replace(pol, input_bits=PIXEL_BITS)
    # torch.ao fake-quantizers keep observing while they run: freeze their ranges on this copy, so scoring
    # prices the quantization the model has instead of re-calibrating it on the synthetic input.
    target.apply(torch.ao.quantization.disable_observer)
    dynamic = is_dynamic(target)
    n = samples if samples is not None else (16 if dynamic else 1)
    if n < 1:
        raise MicronetError("--samples must be at least 1")
    bar.total = 1 + n + (1 if dynamic else 0) + 1  # deploy form, the examples, the all-blocks trace, accounting
    bar.update()
    bar.set_description(f"scoring: tracing {n} example{'s' if n > 1 else ''}")
    device = model_device(target)
    if pixels is not None:  # what the pixel form takes: uint8 images
        dtype, high = torch.uint8, 256
    else:
        dtype = _input_dtype(target, in_dtype)
        high = 2 if dtype.is_floating_point else _integer_high(target, dtype)
    nhwc = pixels is not None and pixels.layout == "nhwc"
    real_data = examples is not None
    if examples is None:
        examples = _synthetic_inputs(n, shape, device, dtype, nhwc, high)
    else:
        examples = itertools.islice(examples, n)

    carried: dict = {}  # what the model keeps from one traced example to the next (trace_model)

    def trace(x: Tensor) -> Trace:
        if pixels is not None and x.dtype != torch.uint8:
            raise MicronetError(f"the pixel-input form takes uint8 images; the data holds {str(x.dtype)[6:]} "
                                "(pass the raw images, not normalised ones)")
        return trace_model(target, x, input_bits=pol.model_input_bits, float_bits=pol.float_bits,
                           protected=protected, carried=carried)

    traces: list[Trace] = []
    with _eval_mode(target), _forward_errors(shown_size, dtype), torch.random.fork_rng(devices=[]):
        _reset_gate_stats(target)
        for x in examples:
            traces.append(trace(x.to(device)))
            bar.update()
        rates = _gate_rates(target) if dynamic else {}
        param_traces = []
        if dynamic and traces:
            # Training mode runs every gated block (blended), so every stored weight is seen once.
            target.train()
            param_traces.append(trace(next(_synthetic_inputs(1, shape, device, dtype, nhwc, high))))
        if not traces:
            raise MicronetError("no input examples to score (empty data)")
        if real_data:
            shape = tuple(traces[0].input_shape)
        bar.set_description("scoring: accounting")
        acc = account(traces, pol, param_traces)
        bar.update()
        dynamic_compute = None
        if dynamic:
            target.eval()

            def trace_one() -> Trace:
                # (with real data ``shape`` is the traced input's, already in the model's layout)
                return trace(next(iter(_synthetic_inputs(1, shape, device, dtype, nhwc and not real_data, high))))

            dynamic_compute = _dynamic_compute(target, traces, param_traces, pol, trk, acc,
                                               real_data, trace_one)
    return _Scored(pol, acc, shape, pixels, rates, dynamic_compute, traces[0].input_dtype, traces[0].input_bits)


def score(
    model: nn.Module,
    policy: str | Policy = "official",
    track: str | Track = "cifar100",
    input_size: int | tuple[int, int] | None = None,
    *,
    samples: int | None = None,
    data: Tensor | Iterable[Any] | None = None,
    in_channels: int = 3,
    input_shape: tuple[int, ...] | None = None,
    input_dtype: torch.dtype | str | None = None,
    strict: bool = False,
    model_name: str = "",
    progress: bool = False,
    input: str = "float",
    normalization: Any = None,
    layout: str = "nchw",
    **overrides: Any,
) -> ScoreReport:
    """Score ``model`` under a policy and track; ops per example (mean over ``samples`` for dynamic nets).

    ``input_size`` (side, or (H, W)) defaults to the track's (cifar100 32, imagenet 224); ``input_shape``
    (e.g. ``(1, 16, 64)`` for a sequence model) replaces the image shape; ``input_dtype`` (a torch dtype or a name
    in ``INPUT_DTYPES``, e.g. "int64" for token ids, drawn below the smallest embedding table) replaces the model's
    float dtype, and the input is charged at its width (at most the policy's ``input_bits``). ``strict=True`` raises
    when any op has no cost rule. The caller's model is not modified and no hooks are left behind. ``overrides`` replace
    policy fields (e.g. ``accumulator="adder_tree"``).
    ``progress`` shows a status bar (deploy form, one step per traced example, accounting): a large or dynamic
    model takes many seconds, and a library stays quiet unless asked.
    ``input="pixels"`` scores the pixel-input deploy form (uint8 images in ``layout``, "nchw" or "nhwc",
    ``normalization`` folded into the first layer), as ``micronet export --input pixels`` writes it.
    """
    pol = resolve_policy(policy, overrides)
    trk = get_track(track)
    in_dtype = resolve_input_dtype(input_dtype)
    shape = input_shape_for(trk, input_size, input_shape, in_channels)
    if input_shape is None:
        shown_size = str(shape[2]) if shape[2] == shape[3] else f"{shape[2]}x{shape[3]}"
    else:
        shown_size = "x".join(map(str, shape))
    if input == "pixels":
        if normalization is not None:
            normalization = get_normalization(normalization)  # a preset's name, as export_onnx takes it
        check_pixel_input(model)  # a gated net without input_module has no pixel form: say so before the long copy
    bar = progress_bar(None, "scoring: deploy form", progress, unit="step")
    # Should a first attempt stop (see below), the second reads ``data`` again: a tensor or a re-iterable
    # (a DataLoader) from the start; a one-shot iterator cannot be, so its examples are kept (small copies).
    seen: list[Tensor] = []
    one_shot = isinstance(data, Iterator)  # (iter() on a DataLoader would start its workers)
    rest = _split_examples(data, 1 << 62) if one_shot else None

    def attempt(share: bool) -> _Scored:
        # Every model, float or compressed, is scored as it deploys: its integer form, BN folded (a copy, so
        # resetting gate counters and the train-mode parameter trace leave the caller's model alone). The copy
        # shares the caller's weights read-only (they are often larger than every activation together);
        # the trace stops any op before it writes into them (ProtectedWrite).
        examples = None
        if rest is not None:
            examples = itertools.chain(list(seen), _remember(rest, seen) if share else rest)
        elif data is not None:
            examples = _split_examples(data, 1 << 62)
        # What the model is fed, as a meta tensor (shape and dtype only), tells the merge the tensors' ranks (a
        # BatchNorm1d after a Linear folds into it on 2-D features). The pixel form's inner model takes float NCHW.
        first = next(examples, None) if examples is not None and input != "pixels" else None
        if first is not None:
            examples = itertools.chain([first], examples)
            example = torch.empty(first.shape, dtype=first.dtype, device="meta")
        else:
            dtype = _model_dtype(model) if input == "pixels" else _input_dtype(model, in_dtype)
            example = torch.empty(shape, dtype=dtype, device="meta")
        target = deploy_form(model, input=input, normalization=normalization, layout=layout, share=share,
                             example=example)
        try:
            return _trace_and_account(target, pol, trk, overrides, shape, shown_size, samples, examples, bar,
                                      storages_of(model) if share else frozenset(), in_dtype)
        finally:
            _release_tensors(target)

    try:
        # Scoring allocates some 10^5 small containers (fx nodes, op records): paused, the collector does not re-scan
        # the whole process each time; what scoring leaves behind holds no tensors by then (_release_tensors).
        with collector_paused():
            try:
                scored = attempt(share=True)
            except ProtectedWrite:
                scored = None  # retried outside the handler, which would keep the first attempt's frames alive
            if scored is None:
                # The model's forward updates its own weights as it runs: score a copy that owns every tensor.
                bar.n = 0
                scored = attempt(share=False)
    finally:
        bar.close()
    seen.clear()
    pol, acc, shape, pixels = scored.policy, scored.accounts, scored.shape, scored.pixels
    if pol.freebie and acc.quantized:
        raise MicronetError(
            f"policy {pol.name!r} uses the 16-bit freebie, which the rules forbid for a quantized model; "
            "use --policy official"
        )
    notes = []
    if pixels is not None:
        notes.append(f"scored the pixel-input deploy form: uint8 {pixels.layout.upper()} images, normalisation "
                     f"{pixels.normalization.name} folded into the first layer (input_bits={pol.input_bits})")
    if has_training_form(model):
        notes.append("scored the integer deploy form (compress.deploy_form) of the model")
    report = ScoreReport(
        pol,
        trk,
        acc.rows,
        acc.unknown_ops,
        acc.free_ops,
        samples=acc.examples,
        gate_rates=scored.rates,
        dynamic=scored.dynamic,
        notes=notes,
        model=model_name or type(model).__name__,
        quantized=acc.quantized,
        input_shape=tuple(shape),
        dead=acc.dead,
        input_dtype=str(scored.input_dtype).removeprefix("torch."),
        input_bits=scored.input_bits,
    )
    if strict and not report.complete:
        names = ", ".join(f"{u['op']} in {u['module'] or '(root)'}" for u in report.unknown_ops[:5])
        raise MicronetError(
            f"strict scoring: {len(report.unknown_ops)} op(s) have no cost rule ({names}); the score would be "
            "a lower bound"
        )
    return report
