"""Build an ONNX graph from an integer-form (or float) network: torch.fx trace -> one converter per op.

Why not ``torch.onnx.export(dynamo=True)``: it works on these nets (spec onnx-export.md §1), but for
the integer deploy form every piece of it had to be undone or redone afterwards: debug metadata,
value_info and doc strings stripped; weight codes re-encoded as packed INT4 behind
``DequantizeLinear`` by a post-pass (initializer names and the optimizer's folding of small tensors
decide which casts survive); the sparse-weight decoders spliced in. It also takes seconds even for tiny nets
(tens of seconds for DenseNet-BC-100). Here the integer-form modules are converted directly, so the
graph contains exactly the ops that the PyTorch model runs, in the same order (the condition for
bit-exact parity), every weight is written once in its final encoding under a name derived from its
module, and a tiny model converts in milliseconds.

How it works (one module per step):

1. :mod:`~micronet.export.record`: ``torch.fx`` traces the model, stopping at the modules that have a
   converter (integer-form layers and standard ``torch.nn`` layers); other ``torch.nn`` leaves are
   reported as unsupported.
2. :mod:`~micronet.export.record`: the traced graph is run twice (batch 2 and batch 3) and every node's
   result is recorded: shapes for tensors, values for everything that does not depend on the input
   (folded into constants), and Python values such as ``x.size(0)`` (a dimension that follows the batch
   becomes the dynamic ``batch`` dimension; every other dimension must be static).
3. :mod:`~micronet.export.converters`: each tensor-producing node goes through the converter registered
   for its module type, function or method name. Converters are small functions that emit ONNX nodes
   through :class:`~micronet.export.builder.GraphBuilder` (:mod:`~micronet.export.builder`).
4. This module assembles the ONNX ModelProto and returns it as a :class:`BuiltGraph`.

The builder also tracks which tensors hold integer codes (with a bound on their magnitude). When every
weighted layer multiplies integer codes by integer codes with accumulator sums below 2^24, fp32
arithmetic is exact in any summation order, so onnxruntime must reproduce PyTorch bit for bit; the
verifier then demands exact equality (``BuiltGraph.exact``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch
from onnx import TensorProto
from onnx import helper as oh
from torch import fx, nn

from micronet import __version__
from micronet.errors import MicronetError
from micronet.export import encoding
from micronet.export.builder import (
    INPUT_NAME,
    OUTPUT_NAME,
    GraphBuilder,
    UnsupportedModelError,
    Value,
    WeightRecord,
)
from micronet.export.converters import Ctx, converter_for_call, converter_for_module
from micronet.export.record import BATCHES, NodeResult, merge_python, record, trace


@dataclass
class BuiltGraph:
    """The ONNX model plus what the verifier needs to know about it."""

    model: onnx.ModelProto
    weights: list[WeightRecord]
    exact: bool  # integer-domain end to end: onnxruntime must match PyTorch bit for bit
    inexact_reasons: list[str]
    num_classes: int
    form: str
    # Every converted module in execution order: (module path, ONNX name of its input, of its output). The
    # verifier reads these intermediate values to name the first layer where onnxruntime and PyTorch part.
    module_values: list[tuple[str, str, str]] = field(default_factory=list)
    # Gated graphs: module values inside ``If`` branches are not recorded, so a difference cannot be traced to
    # a tie flip; the verifier then applies the statistical rule (and says so).
    opaque_branches: bool = False


_INPUT_TYPES = {torch.float32: TensorProto.FLOAT, torch.uint8: TensorProto.UINT8}


def _ir_version(opset: int) -> int:
    """The lowest IR version that carries ``opset`` (make_model would stamp the newest, which ORT refuses)."""
    for _release, ir, ai_onnx, *_ in onnx.helper.VERSION_TABLE:
        if ai_onnx >= opset:
            return ir
    raise MicronetError(f"opset {opset} is newer than this onnx package supports")


def build_graph(
    model: nn.Module,
    *,
    form: str = "integer",
    sparse_weights: bool | Sequence[str] = False,
    opset: int = 21,
    input_shape: tuple[int, ...] = (3, 32, 32),
    input_dtype: torch.dtype = torch.float32,
) -> BuiltGraph:
    """Convert an eval-mode integer-form (or float) model into an ONNX ModelProto.

    ``input_dtype``: torch.float32 (images as floats) or torch.uint8 (pixel-input models).
    """
    if input_dtype not in _INPUT_TYPES:
        raise MicronetError(f"unsupported input dtype {input_dtype}; use torch.float32 or torch.uint8")
    if form not in ("integer", "qdq"):
        raise MicronetError(f"unknown graph form {form!r}; use 'integer' or 'qdq'")
    if not 21 <= opset <= onnx.defs.onnx_opset_version():
        raise MicronetError(
            f"opset {opset} is not supported: INT4 weights need opset >= 21 "
            f"(this onnx package writes up to {onnx.defs.onnx_opset_version()})"
        )
    b = GraphBuilder(form=form, sparse_weights=sparse_weights)
    output = emit_module(b, model, Value(INPUT_NAME, (BATCHES[0], *input_shape), batched=True), input_shape,
                         input_dtype)
    if not isinstance(output, Value):
        raise UnsupportedModelError("the model must return a single logits tensor")
    if output.rank != 2 or not output.batched:
        raise UnsupportedModelError(f"the model must return [batch, classes] logits, not shape {output.shape}")
    return assemble(b, output, form=form, opset=opset, input_shape=input_shape, input_dtype=input_dtype)


def emit_module(b: GraphBuilder, model: nn.Module, x: Value, input_shape: tuple[int, ...],
                input_dtype: torch.dtype = torch.float32) -> Any:
    """Trace ``model`` (one tensor input of ``input_shape`` per sample) and append its ops to ``b`` on ``x``.

    Returns the converted output (a :class:`Value`, or the structure of Values the forward returns).
    """
    gm = trace(model, lambda m: converter_for_module(m) is not None)
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(f"the model's forward must take exactly one input, not {len(placeholders)}")

    unsupported = []
    for n in nodes:
        if n.op == "call_module" and converter_for_module(gm.get_submodule(n.target)) is None:
            unsupported.append(_describe(n, gm))
    depends: dict[fx.Node, bool] = {}
    for n in nodes:
        depends[n] = n.op == "placeholder" or any(depends[i] for i in n.all_input_nodes)
    constants = {n for n in nodes if not depends[n]}

    ba, bb = BATCHES
    rec_a = record(gm, input_shape, ba, constants, input_dtype)
    rec_b = record(gm, input_shape, bb, set(), input_dtype)
    for n in nodes:
        if n.op in ("call_function", "call_method") and depends[n] and rec_a[n].is_tensor:
            if converter_for_call(n) is None:
                unsupported.append(_describe(n, gm))
    if unsupported:
        names = ", ".join(dict.fromkeys(unsupported))
        raise UnsupportedModelError(f"cannot export these ops to ONNX: {names}")

    env: dict[fx.Node, Any] = {}
    output: Any = None
    for n in nodes:
        ra = rec_a.get(n)
        if n.op == "placeholder":
            env[n] = x
        elif n.op == "output":
            output = fx.node.map_arg(n.args[0], lambda a: env[a])
        elif not depends[n]:
            env[n] = ra.value  # folded: tensors become initializers where they are used
        elif not ra.is_tensor:
            env[n] = merge_python(ra.value, rec_b[n].value, ba, bb)
        else:
            env[n] = _convert(b, gm, n, env, ra, rec_b[n], ba, bb)
            first = n.args[0] if n.args else None
            if n.op == "call_module" and isinstance(env.get(first), Value):
                b.module_values.append((str(n.target), env[first].name, env[n].name))
    return output


def assemble(b: GraphBuilder, output: Value, *, form: str, opset: int, input_shape: tuple[int, ...],
             extra_outputs: tuple[onnx.ValueInfoProto, ...] = (),
             input_dtype: torch.dtype = torch.float32) -> BuiltGraph:
    """The ModelProto around ``b``'s nodes: ``output`` becomes the logits (plus ``extra_outputs``)."""
    b.add("Identity", [output.name], out=OUTPUT_NAME)
    weight_nodes = b.finish_weights()
    nodes, initializers = _live(weight_nodes + b.nodes, b.initializers,
                                [OUTPUT_NAME, *(o.name for o in extra_outputs)])

    graph = oh.make_graph(
        nodes,
        "micronet",
        [oh.make_tensor_value_info(INPUT_NAME, _INPUT_TYPES[input_dtype], ["batch", *input_shape])],
        [oh.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", output.shape[1]]), *extra_outputs],
        initializers,
    )
    opsets = [oh.make_opsetid("", opset)]
    functions = encoding.functions({n.op_type for n in nodes if n.domain == encoding.DECODER_DOMAIN}, opset)
    if functions:
        opsets.append(oh.make_opsetid(encoding.DECODER_DOMAIN, 1))
    onnx_model = oh.make_model(
        graph,
        opset_imports=opsets,
        functions=functions,
        ir_version=_ir_version(opset),
        producer_name="micronet",
        producer_version=__version__,
    )
    oh.set_model_props(onnx_model, {"micronet.form": form})
    produced = {o for node in nodes for o in node.output} | {INPUT_NAME}
    module_values = [mv for mv in b.module_values if mv[1] in produced and mv[2] in produced]
    has_codes = any(w.kind == "codes" for w in b.weights)
    if not has_codes:
        b.inexact.insert(0, "no integer-code layers (float model)")
    return BuiltGraph(
        onnx_model, b.weights, exact=not b.inexact, inexact_reasons=b.inexact,
        num_classes=int(output.shape[1]), form=form, module_values=module_values,
    )


def _live(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], outputs: list[str]) -> tuple[list, list]:
    """Drop nodes and initializers that do not reach the outputs (e.g. a Pad absorbed by a MaxPool).

    A node with subgraphs (``If``) also needs every value its subgraphs' nodes read from the outer scope.
    """
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(_subgraph_inputs(node))
    return kept[::-1], [t for t in inits if t.name in needed]


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            for inner in attr.g.node:
                names.update(inner.input)
                names.update(_subgraph_inputs(inner))
    return names


def _convert(b: GraphBuilder, gm: fx.GraphModule, n: fx.Node, env: dict, ra: NodeResult, rb: NodeResult,
             ba: int, bb: int) -> Value:
    """Convert one input-dependent tensor node through its registered converter."""
    if ra.dtype != torch.float32:
        raise UnsupportedModelError(f"{_describe(n, gm)} produces a {ra.dtype} tensor; only float32 is exported")
    shape_a, shape_b = ra.shape, rb.shape
    if shape_a == shape_b:
        batched = False
    elif shape_a[1:] == shape_b[1:] and (shape_a[0], shape_b[0]) == (ba, bb):
        batched = True
    else:
        raise UnsupportedModelError(
            f"{_describe(n, gm)}: the batch size leaks into a non-leading dimension ({shape_a} vs {shape_b})"
        )
    args = fx.node.map_arg(n.args, lambda a: env[a])
    kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
    ctx = Ctx(n, tuple(args), dict(kwargs), shape_a, batched)
    if n.op == "call_module":
        ctx.module, ctx.fqn = gm.get_submodule(n.target), str(n.target)
        fn = converter_for_module(ctx.module)
    else:
        fn = converter_for_call(n)
    return fn(b, ctx)


def _describe(node: fx.Node, root: nn.Module) -> str:
    """An op as an error message names it."""
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        return f"{type(m).__module__}.{type(m).__qualname__} (module '{node.target}')"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    t = node.target
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    mod = getattr(t, "__module__", None)
    return f"{mod}.{name}" if mod and not str(name).startswith(mod) else str(name)


__all__ = ["BuiltGraph", "UnsupportedModelError", "WeightRecord", "assemble", "build_graph", "emit_module"]
