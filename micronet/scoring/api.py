"""The scorer's entry point: ``score(model, ...)``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from micronet.compress import deploy_form
from micronet.compress.pixel_input import PIXEL_BITS, pixel_input_of
from micronet.compress.state import has_training_form, model_device, preserved_modes
from micronet.errors import MicronetError
from micronet.scoring.accounting import account
from micronet.scoring.policy import Policy, Track, get_track, resolve_policy
from micronet.scoring.report import ScoreReport
from micronet.scoring.trace import Trace, trace_model


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    with preserved_modes(model):
        model.eval()
        yield


def _synthetic_inputs(samples: int, channels: int, size: int, device: torch.device,
                      channels_last: bool = False) -> Iterator[Tensor]:
    """Deterministic normalised-image-like inputs, one example each (NHWC for an NHWC pixel-input model)."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(samples):
        x = torch.randn(1, channels, size, size, generator=gen)
        yield (x.permute(0, 2, 3, 1).contiguous() if channels_last else x).to(device)


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


def is_dynamic(model: nn.Module) -> bool:
    """True for input-dependent networks (SkipNet-style gates), whose ops must be averaged over examples."""
    return bool(getattr(model, "is_dynamic", False)) or any(
        callable(getattr(model, a, None)) for a in ("gate_rates", "execution_rates")
    )


@contextlib.contextmanager
def _forward_errors(input_size: int) -> Iterator[None]:
    """Turn a failing traced forward (e.g. an input size the architecture cannot take) into a one-line error."""
    try:
        yield
    except MicronetError:
        raise
    except (RuntimeError, ValueError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise MicronetError(f"the model's forward pass failed at input size {input_size}: {first}") from None


def score(
    model: nn.Module,
    policy: str | Policy = "official",
    track: str | Track = "cifar100",
    input_size: int = 32,
    *,
    samples: int | None = None,
    data: Tensor | Iterable[Any] | None = None,
    in_channels: int = 3,
    model_name: str = "",
    input: str = "float",
    normalization: Any = None,
    **overrides: Any,
) -> ScoreReport:
    """Score ``model`` under a policy and track; ops per example (mean over ``samples`` for dynamic nets).

    The caller's model is not modified and no hooks are left behind. ``overrides`` replace policy fields
    (e.g. ``accumulator="adder_tree"``). ``input="pixels"`` scores the pixel-input deploy form (uint8 images,
    ``normalization`` folded into the first layer), as ``micronet export --input pixels`` writes it.
    """
    pol = resolve_policy(policy, overrides)
    trk = get_track(track)
    # Every model, float or compressed, is scored as it deploys: its integer form, BN folded (a deep copy,
    # so resetting gate counters and the train-mode parameter trace leave the caller's model alone).
    target = deploy_form(model, input=input, normalization=normalization)
    pixels = pixel_input_of(target)
    if pixels is not None and "input_bits" not in overrides:
        # What runs takes 8-bit pixels: the first layer multiplies 8-bit inputs (policy field, in the JSON).
        pol = replace(pol, input_bits=PIXEL_BITS)
    dynamic = is_dynamic(target)
    n = samples if samples is not None else (16 if dynamic else 1)
    if n < 1:
        raise MicronetError("--samples must be at least 1")
    device = model_device(target)
    examples = (
        _split_examples(data, n)
        if data is not None
        else _synthetic_inputs(n, in_channels, input_size, device, pixels is not None and pixels.layout == "nhwc")
    )
    traces: list[Trace] = []
    with _eval_mode(target), _forward_errors(input_size), torch.random.fork_rng(devices=[]):
        _reset_gate_stats(target)
        for x in examples:
            traces.append(
                trace_model(target, x.to(device), input_bits=pol.model_input_bits, float_bits=pol.float_bits)
            )
        rates = _gate_rates(target) if dynamic else {}
        param_traces = []
        if dynamic and traces:
            # Training mode runs every gated block (blended), so every stored weight is seen once.
            target.train()
            param_traces.append(
                trace_model(
                    target,
                    next(_synthetic_inputs(1, in_channels, input_size, device,
                                           pixels is not None and pixels.layout == "nhwc")),
                    input_bits=pol.model_input_bits,
                    float_bits=pol.float_bits,
                )
            )
    if not traces:
        raise MicronetError("no input examples to score (empty data)")
    acc = account(traces, pol, param_traces)
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
        gate_rates=rates,
        notes=notes,
        model=model_name or type(model).__name__,
        quantized=acc.quantized,
    )
    return report
