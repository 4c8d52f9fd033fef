"""Trace a model with ``torch.fx`` and record what every node produces at two batch sizes.

The traced graph is run at batch 2 and batch 3: for tensors that depend on the input the shapes are
kept, for everything else the values (folded into constants by the graph builder). Python values such
as ``x.size(0)`` are merged across the two runs: a dimension that follows the batch becomes
:data:`DYNAMIC_BATCH`, every other dimension must be static.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from micronet.export.builder import UnsupportedModelError

BATCHES = (2, 3)  # the two reference batch sizes; distinct and > 1 so the batch dimension shows


class _DynamicBatch:
    """The dynamic batch size where a Python value (e.g. ``x.size(0)``) stands for it."""

    def __repr__(self) -> str:
        return "batch"


DYNAMIC_BATCH = _DynamicBatch()


class _LeafTracer(fx.Tracer):
    """Stops at modules with a converter and at every other torch.nn leaf (reported if unsupported)."""

    def __init__(self, has_converter: Callable[[nn.Module], bool]) -> None:
        super().__init__()
        self.has_converter = has_converter

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.has_converter(m):
            return True
        if isinstance(m, nn.Sequential | nn.ModuleList | nn.ModuleDict):
            return False
        return type(m).__module__.startswith("torch.nn")


def trace(model: nn.Module, has_converter: Callable[[nn.Module], bool]) -> fx.GraphModule:
    """fx-trace ``model``, keeping modules for which ``has_converter`` holds (and torch.nn leaves) whole."""
    hooked = [
        name or "<root>"
        for name, m in model.named_modules()
        if m._forward_pre_hooks or m._forward_hooks
    ]
    if hooked:
        # fx does not run hooks, so a hooked model would be exported without them.
        shown = ", ".join(hooked[:5]) + (" ..." if len(hooked) > 5 else "")
        raise UnsupportedModelError(
            f"modules with forward hooks cannot be exported (hooks would be dropped): {shown}; "
            "convert training-form models with micronet.compress.deploy_form first"
        )
    try:
        graph = _LeafTracer(has_converter).trace(model)
    except Exception as exc:  # fx raises many types; all mean "this Python code does not trace"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnsupportedModelError(
            f"model does not trace with torch.fx ({type(exc).__name__}: {msg}); "
            "data-dependent control flow cannot be exported"
        ) from None
    return fx.GraphModule(model, graph)


@dataclass
class NodeResult:
    """A node's result at one batch size: a shape for input-dependent tensors, else the value."""

    is_tensor: bool
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    value: Any = None


class _NodeResultRecorder(fx.Interpreter):
    """Runs the traced graph and keeps every node's :class:`NodeResult` (values only for ``keep_values``)."""

    def __init__(self, gm: fx.GraphModule, keep_values: set[fx.Node]) -> None:
        super().__init__(gm)
        self.keep_values = keep_values
        self.results: dict[fx.Node, NodeResult] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            keep = result if n in self.keep_values else None
            self.results[n] = NodeResult(True, tuple(result.shape), result.dtype, keep)
        else:
            self.results[n] = NodeResult(False, value=result)
        return result


def record(
    gm: fx.GraphModule, input_shape: tuple[int, ...], batch: int, keep: set[fx.Node],
    input_dtype: torch.dtype = torch.float32,
) -> dict[fx.Node, NodeResult]:
    """Run ``gm`` on seeded N(0, 1) inputs (uniform pixels for uint8) of ``batch`` samples; tensor values are
    kept for ``keep`` only."""
    recorder = _NodeResultRecorder(gm, keep)
    gen = torch.Generator().manual_seed(0)
    if input_dtype == torch.uint8:
        x = torch.randint(0, 256, (batch, *input_shape), generator=gen, dtype=torch.uint8)
    else:
        x = torch.randn((batch, *input_shape), generator=gen)
    with torch.inference_mode():
        try:
            recorder.run(x)
        except Exception as exc:
            raise UnsupportedModelError(f"model failed on a {list(x.shape)} input: {exc}") from None
    return recorder.results


def merge_python(a: Any, b: Any, ba: int, bb: int) -> Any:
    """Combine a Python value seen at two batch sizes: equal -> static, batch sizes -> DYNAMIC_BATCH."""
    if isinstance(a, tuple | list) and isinstance(b, tuple | list) and len(a) == len(b):
        merged = [merge_python(x, y, ba, bb) for x, y in zip(a, b)]
        return tuple(merged) if isinstance(a, tuple) else merged
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool):
        if a == b:
            return a
        if (a, b) == (ba, bb):
            return DYNAMIC_BATCH
        raise UnsupportedModelError(f"a size computed from the batch ({a} at batch {ba}) is not supported")
    if type(a) is type(b) and a == b:
        return a
    raise UnsupportedModelError(f"a value depends on the batch size in an unsupported way ({a!r} vs {b!r})")


__all__ = ["BATCHES", "DYNAMIC_BATCH", "NodeResult", "merge_python", "record", "trace"]
