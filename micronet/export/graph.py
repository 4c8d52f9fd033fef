"""Build an ONNX graph from an integer-form (or float) network: torch.fx trace -> one converter per op.

Why not ``torch.onnx.export(dynamo=True)``: it works on these nets (spec onnx-export.md §1), but for
the integer deploy form every piece of it had to be undone or redone afterwards: debug metadata,
value_info and doc strings stripped; weight codes re-encoded as packed INT4 behind
``DequantizeLinear`` by a post-pass (initializer names and the optimizer's folding of small tensors
decide which casts survive); the bitmask decoder spliced in. It also takes seconds even for tiny nets
(tens of seconds for DenseNet-BC-100). Here the integer-form modules are converted directly, so the
graph contains exactly the ops that the PyTorch model runs, in the same order (the condition for
bit-exact parity), every weight is written once in its final encoding under a name derived from its
module, and a tiny model converts in milliseconds.

How it works:

1. ``torch.fx`` traces the model, stopping at the modules that have a converter (integer-form layers
   and standard ``torch.nn`` layers); other ``torch.nn`` leaves are reported as unsupported.
2. The traced graph is run twice (batch 2 and batch 3) and every node's result is recorded: shapes for
   tensors, values for everything that does not depend on the input (folded into constants), and
   Python values such as ``x.size(0)`` (a dimension that follows the batch becomes the dynamic
   ``batch`` dimension; every other dimension must be static).
3. Each tensor-producing node goes through the converter registered for its module type, function or
   method name. Converters are small functions that emit ONNX nodes through :class:`GraphBuilder`.

The builder also tracks which tensors hold integer codes (with a bound on their magnitude). When every
weighted layer multiplies integer codes by integer codes with accumulator sums below 2^24, fp32
arithmetic is exact in any summation order, so onnxruntime must reproduce PyTorch bit for bit; the
verifier then demands exact equality (``BuiltGraph.exact``).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as onh
from torch import fx, nn

from micronet.compress.integer_modules import ChannelAffine, IntConv2d, IntLinear, RoundClamp
from micronet.errors import MicronetError
from micronet.export import encoding

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXACT_LIMIT = 2**24  # fp32 represents every integer up to 2^24, so integer sums below it are exact


class UnsupportedModelError(MicronetError):
    """The model contains ops the exporter cannot write (the message names them)."""


class _Batch:
    """The dynamic batch size where a Python value (e.g. ``x.size(0)``) stands for it."""

    def __repr__(self) -> str:
        return "batch"


BATCH = _Batch()


@dataclass
class Value:
    """A tensor in the ONNX graph: its name, shape at the reference batch, and integer-code bound."""

    name: str
    shape: tuple[int, ...]
    batched: bool
    bound: int | None = None  # max |value| when the tensor holds integers, else None

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass
class WeightRecord:
    """How one layer's weight was written."""

    module: str
    kind: str  # "codes" (integer codes behind DequantizeLinear) or "float"
    encoding: str  # "dense" or "bitmask" for codes, "float32" for float weights
    storage: str  # ONNX element type name of the stored values
    shape: tuple[int, ...]
    nnz: int
    payload_bytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


@dataclass
class BuiltGraph:
    """The ONNX model plus what the verifier needs to know about it."""

    model: onnx.ModelProto
    weights: list[WeightRecord]
    exact: bool  # integer-domain end to end: onnxruntime must match PyTorch bit for bit
    inexact_reasons: list[str]
    num_classes: int
    form: str


@dataclass
class Ctx:
    """What a converter sees: the fx node, its converted arguments and the recorded output shape."""

    node: fx.Node
    args: tuple
    kwargs: dict
    shape: tuple[int, ...]
    batched: bool
    module: nn.Module | None = None
    fqn: str = ""

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        """Positional-or-keyword argument ``name`` at position ``i``."""
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(name, default)


Converter = Callable[["GraphBuilder", Ctx], Value]
_MODULE_CONVERTERS: dict[type, Converter] = {}
_CALL_CONVERTERS: dict[Any, Converter] = {}


def converts_module(*types: type) -> Callable[[Converter], Converter]:
    """Register a converter for modules of the given types (subclasses included)."""

    def register(fn: Converter) -> Converter:
        for t in types:
            _MODULE_CONVERTERS[t] = fn
        return fn

    return register


def converts_call(*targets: Any) -> Callable[[Converter], Converter]:
    """Register a converter for functions (by object) or tensor methods (by name)."""

    def register(fn: Converter) -> Converter:
        for t in targets:
            _CALL_CONVERTERS[t] = fn
        return fn

    return register


def _module_converter(m: nn.Module) -> Converter | None:
    for cls in type(m).__mro__:
        if cls in _MODULE_CONVERTERS:
            return _MODULE_CONVERTERS[cls]
    return None


def _call_key(node: fx.Node) -> Any:
    """Registry key for a call_function/call_method node (custom ops by their qualified name)."""
    target = node.target
    if node.op == "call_method":
        return target
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(target).split(".default")[0]  # "micronet.round_clamp"
    qualname = getattr(target, "_qualname", None)  # torch.library.CustomOpDef
    if isinstance(qualname, str):
        return qualname.replace("::", ".")
    return target


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        return f"{type(m).__module__}.{type(m).__qualname__} (module '{node.target}')"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    t = node.target
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)
    mod = getattr(t, "__module__", None)
    return f"{mod}.{name}" if mod and not str(name).startswith(mod) else str(name)


class GraphBuilder:
    """Accumulates ONNX nodes and initializers; owns naming, constants and weight encoding."""

    def __init__(self, *, form: str, sparse_weights: bool) -> None:
        self.form, self.sparse_weights = form, sparse_weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.weights: list[WeightRecord] = []
        self.inexact: list[str] = []
        self.uses_decoder = False
        self._names: set[str] = {INPUT_NAME, OUTPUT_NAME}
        self._counter = 0
        self._scalars: dict[tuple, str] = {}
        self._weight_values: dict[str, str] = {}
        self._batch_dim: str | None = None
        # values made by a spatial zero Pad: name -> (unpadded input, pads per spatial dim (begin, end))
        self.zero_pads: dict[str, tuple[Value, list[tuple[int, int]]]] = {}

    # ---- naming, nodes, constants -------------------------------------------------------------
    def fresh(self) -> str:
        """A new short intermediate-value name (short names keep the file small)."""
        while True:
            self._counter += 1
            name = f"v{self._counter}"
            if name not in self._names:
                self._names.add(name)
                return name

    def add(self, op: str, inputs: list[str], *, domain: str = "", out: str | None = None, **attrs) -> str:
        """Append one node and return its (single) output name."""
        out = out or self.fresh()
        self._names.add(out)
        self.nodes.append(oh.make_node(op, inputs, [out], domain=domain or None, **attrs))
        return out

    def initializer(self, array: np.ndarray, name: str | None = None) -> str:
        """Store ``array`` as an initializer (name kept when given and free)."""
        if name is None or name in self._names:
            name = self.fresh()
        self._names.add(name)
        self.initializers.append(onh.from_array(array, name))
        return name

    def scalar(self, value: float | int, dtype: type = np.float32) -> str:
        """A shared scalar constant."""
        key = (np.dtype(dtype).str, value)
        if key not in self._scalars:
            self._scalars[key] = self.initializer(np.array(value, dtype=dtype))
        return self._scalars[key]

    def ints(self, values: list[int] | tuple[int, ...]) -> str:
        """A 1-D int64 constant (shapes, axes, pads)."""
        return self.initializer(np.asarray(list(values), dtype=np.int64))

    def operand(self, v: Any, like: Value | None = None) -> str:
        """ONNX name for an op input: a graph value, a constant tensor or a Python number."""
        if isinstance(v, Value):
            return v.name
        if isinstance(v, torch.Tensor):
            arr = v.detach().cpu()
            arr = arr.numpy().astype(np.float32) if arr.is_floating_point() else arr.numpy()
            return self.initializer(arr)
        if isinstance(v, bool | int | float):
            return self.scalar(float(v))
        raise UnsupportedModelError(f"cannot use {type(v).__name__} value {v!r} as a tensor operand")

    @property
    def batch_dim(self) -> str:
        """int64 [1] tensor holding the runtime batch size (created on first use)."""
        if self._batch_dim is None:
            self._batch_dim = self.add("Shape", [INPUT_NAME], start=0, end=1)
        return self._batch_dim

    # ---- weights -------------------------------------------------------------------------------
    def code_weight(self, fqn: str, weight: torch.Tensor) -> str:
        """Float weight value decoded in-graph from integer codes (dense or bitmask encoding)."""
        prefix = f"{fqn}.weight"
        if prefix in self._weight_values:
            return self._weight_values[prefix]
        try:
            codes = encoding.as_codes(weight.detach().cpu().numpy())
            dense_type = encoding.code_type(codes)
        except ValueError as exc:
            raise UnsupportedModelError(f"module '{fqn}': {exc}") from None
        nnz = int(np.count_nonzero(codes))
        dense_size = encoding.dense_bytes(codes.size, dense_type.bits)
        use_bitmask = False
        if self.sparse_weights:
            tensors, sparse_size = encoding.bitmask_initializers(prefix, codes)
            use_bitmask = sparse_size < dense_size
        if use_bitmask:
            for t in tensors:
                self._names.add(t.name)
            self.initializers.extend(tensors)
            self.uses_decoder = True
            codes_name = self.add(
                encoding.DECODER_NAME,
                [t.name for t in tensors],
                domain=encoding.DECODER_DOMAIN,
                out=f"{prefix}.int8",
            )
            record = WeightRecord(
                fqn, "codes", "bitmask", TensorProto.DataType.Name(tensors[1].data_type),
                tuple(codes.shape), nnz, sparse_size,
            )
        else:
            self._names.add(f"{prefix}.codes")
            self.initializers.append(encoding.dense_initializer(f"{prefix}.codes", codes, dense_type))
            codes_name = f"{prefix}.codes"
            record = WeightRecord(fqn, "codes", "dense", dense_type.name, tuple(codes.shape), nnz, dense_size)
        value = self.add("DequantizeLinear", [codes_name, self.scalar(1.0)], out=prefix)
        self.weights.append(record)
        self._weight_values[prefix] = value
        return value

    def float_weight(self, fqn: str, weight: torch.Tensor) -> str:
        """Float weight stored as a float32 initializer."""
        name = f"{fqn}.weight"
        if name in self._weight_values:
            return self._weight_values[name]
        arr = weight.detach().cpu().float().numpy()
        value = self.initializer(arr, name)
        self.weights.append(
            WeightRecord(fqn, "float", "float32", "FLOAT", tuple(arr.shape), int(np.count_nonzero(arr)), arr.nbytes)
        )
        self._weight_values[name] = value
        return value

    def channel_view(self, t: torch.Tensor, rank: int, name: str) -> str:
        """Per-channel vector as a constant broadcastable over dim 1 of a rank-``rank`` tensor."""
        arr = t.detach().cpu().float().reshape(-1).numpy()
        if arr.size == 1:
            return self.initializer(arr.reshape(()), name)
        return self.initializer(arr.reshape((1, -1) + (1,) * (rank - 2)), name)


# =================================================================================================
# Tracing and recording
# =================================================================================================


class _Tracer(fx.Tracer):
    """Stops at modules with a converter and at every other torch.nn leaf (reported if unsupported)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _module_converter(m) is not None:
            return True
        if isinstance(m, nn.Sequential | nn.ModuleList | nn.ModuleDict):
            return False
        return type(m).__module__.startswith("torch.nn")


def _trace(model: nn.Module) -> fx.GraphModule:
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
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types; all mean "this Python code does not trace"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UnsupportedModelError(
            f"model does not trace with torch.fx ({type(exc).__name__}: {msg}); "
            "data-dependent control flow cannot be exported"
        ) from None
    return fx.GraphModule(model, graph)


@dataclass
class _Record:
    """A node's result at one batch size: a shape for input-dependent tensors, else the value."""

    is_tensor: bool
    shape: tuple[int, ...] | None = None
    dtype: torch.dtype | None = None
    value: Any = None


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, keep_values: set[fx.Node]) -> None:
        super().__init__(gm)
        self.keep_values = keep_values
        self.records: dict[fx.Node, _Record] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            keep = result if n in self.keep_values else None
            self.records[n] = _Record(True, tuple(result.shape), result.dtype, keep)
        else:
            self.records[n] = _Record(False, value=result)
        return result


def _record(gm: fx.GraphModule, input_shape: tuple[int, ...], batch: int, keep: set[fx.Node]) -> dict:
    rec = _Recorder(gm, keep)
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        try:
            rec.run(x)
        except Exception as exc:
            raise UnsupportedModelError(f"model failed on a {list(x.shape)} input: {exc}") from None
    return rec.records


def _merge_python(a: Any, b: Any, ba: int, bb: int) -> Any:
    """Combine a Python value seen at two batch sizes: equal -> static, batch sizes -> BATCH."""
    if isinstance(a, tuple | list) and isinstance(b, tuple | list) and len(a) == len(b):
        merged = [_merge_python(x, y, ba, bb) for x, y in zip(a, b)]
        return tuple(merged) if isinstance(a, tuple) else merged
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool):
        if a == b:
            return a
        if (a, b) == (ba, bb):
            return BATCH
        raise UnsupportedModelError(f"a size computed from the batch ({a} at batch {ba}) is not supported")
    if type(a) is type(b) and a == b:
        return a
    raise UnsupportedModelError(f"a value depends on the batch size in an unsupported way ({a!r} vs {b!r})")


# =================================================================================================
# Build
# =================================================================================================


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
    sparse_weights: bool = False,
    opset: int = 21,
    input_shape: tuple[int, ...] = (3, 32, 32),
) -> BuiltGraph:
    """Convert an eval-mode integer-form (or float) model into an ONNX ModelProto."""
    if form not in ("integer", "qdq"):
        raise MicronetError(f"unknown graph form {form!r}; use 'integer' or 'qdq'")
    if not 21 <= opset <= onnx.defs.onnx_opset_version():
        raise MicronetError(
            f"opset {opset} is not supported: INT4 weights need opset >= 21 "
            f"(this onnx package writes up to {onnx.defs.onnx_opset_version()})"
        )
    gm = _trace(model)
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(f"the model's forward must take exactly one input, not {len(placeholders)}")

    unsupported = []
    for n in nodes:
        if n.op == "call_module" and _module_converter(gm.get_submodule(n.target)) is None:
            unsupported.append(_describe(n, gm))
    depends: dict[fx.Node, bool] = {}
    for n in nodes:
        depends[n] = n.op == "placeholder" or any(depends[i] for i in n.all_input_nodes)
    constants = {n for n in nodes if not depends[n]}

    ba, bb = 2, 3
    rec_a = _record(gm, input_shape, ba, constants)
    rec_b = _record(gm, input_shape, bb, set())
    for n in nodes:
        if n.op in ("call_function", "call_method") and depends[n] and rec_a[n].is_tensor:
            if _call_key(n) not in _CALL_CONVERTERS:
                unsupported.append(_describe(n, gm))
    if unsupported:
        names = ", ".join(dict.fromkeys(unsupported))
        raise UnsupportedModelError(f"cannot export these ops to ONNX: {names}")

    b = GraphBuilder(form=form, sparse_weights=sparse_weights)
    env: dict[fx.Node, Any] = {}
    output: Any = None
    for n in nodes:
        ra = rec_a.get(n)
        if n.op == "placeholder":
            env[n] = Value(INPUT_NAME, (ba, *input_shape), batched=True)
        elif n.op == "output":
            output = fx.node.map_arg(n.args[0], lambda a: env[a])
        elif not depends[n]:
            env[n] = ra.value  # folded: tensors become initializers where they are used
        elif not ra.is_tensor:
            env[n] = _merge_python(ra.value, rec_b[n].value, ba, bb)
        else:
            env[n] = _convert(b, gm, n, env, ra, rec_b[n], ba, bb)

    if not isinstance(output, Value):
        raise UnsupportedModelError("the model must return a single logits tensor")
    if output.rank != 2 or not output.batched:
        raise UnsupportedModelError(f"the model must return [batch, classes] logits, not shape {output.shape}")
    b.add("Identity", [output.name], out=OUTPUT_NAME)
    nodes, initializers = _live(b.nodes, b.initializers)

    graph = oh.make_graph(
        nodes,
        "micronet",
        [oh.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", *input_shape])],
        [oh.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", output.shape[1]])],
        initializers,
    )
    opsets = [oh.make_opsetid("", opset)]
    functions = []
    if b.uses_decoder:
        opsets.append(oh.make_opsetid(encoding.DECODER_DOMAIN, 1))
        functions.append(encoding.decoder_function())
    from micronet import __version__

    onnx_model = oh.make_model(
        graph,
        opset_imports=opsets,
        functions=functions,
        ir_version=_ir_version(opset),
        producer_name="micronet",
        producer_version=__version__,
    )
    oh.set_model_props(onnx_model, {"micronet.form": form})
    has_codes = any(w.kind == "codes" for w in b.weights)
    if not has_codes:
        b.inexact.insert(0, "no integer-code layers (float model)")
    return BuiltGraph(
        onnx_model, b.weights, exact=not b.inexact, inexact_reasons=b.inexact,
        num_classes=int(output.shape[1]), form=form,
    )


def _live(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> tuple[list, list]:
    """Drop nodes and initializers that do not reach the output (e.g. a Pad absorbed by a MaxPool)."""
    needed, kept = {OUTPUT_NAME}, []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1], [t for t in inits if t.name in needed]


def _convert(b: GraphBuilder, gm: fx.GraphModule, n: fx.Node, env: dict, ra: _Record, rb: _Record,
             ba: int, bb: int) -> Value:
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
        fn = _module_converter(ctx.module)
    else:
        fn = _CALL_CONVERTERS[_call_key(n)]
    return fn(b, ctx)


# =================================================================================================
# Converters
# =================================================================================================


def _out(ctx: Ctx, name: str, bound: int | None = None) -> Value:
    return Value(name, ctx.shape, ctx.batched, bound)


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv_attrs(ctx: Ctx, m: Any, kernel: tuple[int, int]) -> dict:
    padding = m.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same": PyTorch puts the extra pixel at the end, as SAME_UPPER would
            total = [d * (k - 1) for d, k in zip(_pair(m.dilation), kernel)]
            return {
                "pads": [t // 2 for t in total] + [t - t // 2 for t in total],
                "strides": list(_pair(m.stride)), "dilations": list(_pair(m.dilation)),
                "group": int(m.groups), "kernel_shape": list(kernel),
            }
    ph, pw = _pair(padding)
    return {
        "pads": [ph, pw, ph, pw],
        "strides": list(_pair(m.stride)),
        "dilations": list(_pair(m.dilation)),
        "group": int(m.groups),
        "kernel_shape": list(kernel),
    }


def _accumulator_bound(b: GraphBuilder, ctx: Ctx, x: Value, weight: torch.Tensor) -> int | None:
    """Bound on |sum of code products| when both operands are integers, else None (and why)."""
    if x.bound is None:
        b.inexact.append(f"{ctx.fqn}: input is not integer codes")
        return None
    per_output = weight.detach().abs().reshape(weight.shape[0], -1).sum(1)
    acc = int(per_output.max().item()) * x.bound if per_output.numel() else 0
    if acc >= EXACT_LIMIT:
        b.inexact.append(f"{ctx.fqn}: integer sums may reach {acc} >= 2^24")
        return None
    return acc


@converts_module(IntConv2d)
def _int_conv(b: GraphBuilder, ctx: Ctx) -> Value:
    m, x = ctx.module, ctx.args[0]
    w = b.code_weight(ctx.fqn, m.weight)
    bound = _accumulator_bound(b, ctx, x, m.weight)
    y = b.add("Conv", [x.name, w], **_conv_attrs(ctx, m, tuple(m.weight.shape[2:])))
    return _out(ctx, y, bound)


@converts_module(nn.Conv2d)
def _conv(b: GraphBuilder, ctx: Ctx) -> Value:
    m, x = ctx.module, ctx.args[0]
    if m.padding_mode != "zeros":
        raise UnsupportedModelError(f"module '{ctx.fqn}': padding_mode={m.padding_mode!r} is not exported")
    b.inexact.append(f"{ctx.fqn}: float weights")
    inputs = [x.name, b.float_weight(ctx.fqn, m.weight)]
    if m.bias is not None:
        inputs.append(b.initializer(m.bias.detach().float().numpy(), f"{ctx.fqn}.bias"))
    return _out(ctx, b.add("Conv", inputs, **_conv_attrs(ctx, m, tuple(m.weight.shape[2:]))))


def _linear(b: GraphBuilder, ctx: Ctx, x: Value, w: str, bias: str | None) -> str:
    if x.rank == 2:
        return b.add("Gemm", [x.name, w] + ([bias] if bias else []), transB=1)
    y = b.add("MatMul", [x.name, b.add("Transpose", [w], perm=[1, 0])])
    return b.add("Add", [y, bias]) if bias else y


@converts_module(IntLinear)
def _int_linear(b: GraphBuilder, ctx: Ctx) -> Value:
    m, x = ctx.module, ctx.args[0]
    bound = _accumulator_bound(b, ctx, x, m.weight)
    return _out(ctx, _linear(b, ctx, x, b.code_weight(ctx.fqn, m.weight), None), bound)


@converts_module(nn.Linear)
def _float_linear(b: GraphBuilder, ctx: Ctx) -> Value:
    m, x = ctx.module, ctx.args[0]
    b.inexact.append(f"{ctx.fqn}: float weights")
    bias = b.initializer(m.bias.detach().float().numpy(), f"{ctx.fqn}.bias") if m.bias is not None else None
    return _out(ctx, _linear(b, ctx, x, b.float_weight(ctx.fqn, m.weight), bias))


@converts_module(ChannelAffine)
def _channel_affine(b: GraphBuilder, ctx: Ctx) -> Value:
    m, x = ctx.module, ctx.args[0]
    # Mul then Add, two roundings, exactly as ChannelAffine.forward computes it.
    y = b.add("Mul", [x.name, b.channel_view(m.scale, x.rank, f"{ctx.fqn}.scale")])
    if m.bias is not None:
        y = b.add("Add", [y, b.channel_view(m.bias, x.rank, f"{ctx.fqn}.bias")])
    return _out(ctx, y)


# Zero-point types for the QDQ form of an activation quantizer: (ONNX type, numpy dtype, min, max).
_QDQ_TYPES = (
    (TensorProto.UINT4, "uint4", 0, 15),
    (TensorProto.INT4, "int4", -8, 7),
    (TensorProto.UINT8, "uint8", 0, 255),
    (TensorProto.INT8, "int8", -128, 127),
    (TensorProto.UINT16, "uint16", 0, 2**16 - 1),
    (TensorProto.INT16, "int16", -(2**15), 2**15 - 1),
)


def _round_clamp(b: GraphBuilder, x: Value, qmin: int, qmax: int) -> str:
    if b.form == "integer":
        r = b.add("Round", [x.name])
        return b.add("Clip", [r, b.scalar(float(qmin)), b.scalar(float(qmax))])
    import ml_dtypes

    fitting = [(name, lo, hi) for _t, name, lo, hi in _QDQ_TYPES if lo <= qmin and qmax <= hi]
    if not fitting:
        raise UnsupportedModelError(f"activation code range [{qmin}, {qmax}] does not fit 16 bits")
    dtype_name, tmin, tmax = fitting[0]
    dtype = getattr(ml_dtypes, dtype_name, None) or np.dtype(dtype_name)
    src = x.name
    if (qmin, qmax) != (tmin, tmax):
        # Clip on integer bounds before rounding equals clamp(round(x)); the type saturates otherwise.
        src = b.add("Clip", [src, b.scalar(float(qmin)), b.scalar(float(qmax))])
    zp = b.scalar(0, dtype)
    q = b.add("QuantizeLinear", [src, b.scalar(1.0), zp])
    return b.add("DequantizeLinear", [q, b.scalar(1.0), zp])


@converts_module(RoundClamp)
def _round_clamp_module(b: GraphBuilder, ctx: Ctx) -> Value:
    m = ctx.module
    return _out(ctx, _round_clamp(b, ctx.args[0], m.qmin, m.qmax), max(abs(m.qmin), abs(m.qmax)))


@converts_call("micronet.round_clamp")
def _round_clamp_op(b: GraphBuilder, ctx: Ctx) -> Value:
    x, qmin, qmax = ctx.arg(0, "x"), int(ctx.arg(1, "qmin")), int(ctx.arg(2, "qmax"))
    return _out(ctx, _round_clamp(b, x, qmin, qmax), max(abs(qmin), abs(qmax)))


@converts_call("micronet.fake_quant")
def _fake_quant_op(b: GraphBuilder, ctx: Ctx) -> Value:
    x, scale = ctx.arg(0, "x"), b.operand(ctx.arg(1, "scale"))
    qmin, qmax = int(ctx.arg(2, "qmin")), int(ctx.arg(3, "qmax"))
    # Div (not Mul by 1/scale), as micronet::fake_quant computes it, so rounding ties agree.
    r = b.add("Round", [b.add("Div", [x.name, scale])])
    c = b.add("Clip", [r, b.scalar(float(qmin)), b.scalar(float(qmax))])
    return _out(ctx, b.add("Mul", [c, scale]))


@converts_module(nn.BatchNorm1d, nn.BatchNorm2d)
def _batch_norm(b: GraphBuilder, ctx: Ctx) -> Value:
    m, x = ctx.module, ctx.args[0]
    if not m.track_running_stats or m.running_mean is None:
        raise UnsupportedModelError(f"module '{ctx.fqn}': BatchNorm without running statistics")
    c = m.num_features
    gamma = m.weight if m.affine else torch.ones(c)
    beta = m.bias if m.affine else torch.zeros(c)
    inputs = [x.name] + [
        b.initializer(t.detach().float().numpy(), f"{ctx.fqn}.{k}")
        for k, t in (("weight", gamma), ("bias", beta), ("running_mean", m.running_mean),
                     ("running_var", m.running_var))
    ]
    return _out(ctx, b.add("BatchNormalization", inputs, epsilon=float(m.eps)))


@converts_module(nn.ReLU)
@converts_call(F.relu, torch.relu, "relu", "relu_")
def _relu(b: GraphBuilder, ctx: Ctx) -> Value:
    x = ctx.args[0]
    return _out(ctx, b.add("Relu", [x.name]), x.bound)


@converts_module(nn.ReLU6, nn.Hardtanh)
def _hardtanh(b: GraphBuilder, ctx: Ctx) -> Value:
    m = ctx.module
    lo, hi = (0.0, 6.0) if isinstance(m, nn.ReLU6) else (float(m.min_val), float(m.max_val))
    return _out(ctx, b.add("Clip", [ctx.args[0].name, b.scalar(lo), b.scalar(hi)]))


@converts_module(nn.Identity, nn.Dropout, nn.Dropout2d)
@converts_call(F.dropout, "contiguous", "clone", "detach", "float", "to")
def _identity(b: GraphBuilder, ctx: Ctx) -> Value:
    x = ctx.args[0]
    return Value(x.name, ctx.shape, ctx.batched, x.bound)


def _pool_attrs(kernel: Any, stride: Any, padding: Any, ceil_mode: bool) -> dict:
    k = _pair(kernel)
    s = _pair(stride) if stride not in (None, [], ()) else k
    p = _pair(padding)
    return {"kernel_shape": list(k), "strides": list(s), "pads": [p[0], p[1], p[0], p[1]],
            "ceil_mode": int(bool(ceil_mode))}


@converts_module(nn.AvgPool2d)
def _avg_pool_module(b: GraphBuilder, ctx: Ctx) -> Value:
    m = ctx.module
    if m.divisor_override is not None:
        raise UnsupportedModelError(f"module '{ctx.fqn}': AvgPool2d divisor_override is not exported")
    attrs = _pool_attrs(m.kernel_size, m.stride, m.padding, m.ceil_mode)
    return _out(ctx, b.add("AveragePool", [ctx.args[0].name], count_include_pad=int(m.count_include_pad), **attrs))


@converts_call(F.avg_pool2d)
def _avg_pool_fn(b: GraphBuilder, ctx: Ctx) -> Value:
    if ctx.arg(6, "divisor_override") is not None:
        raise UnsupportedModelError("avg_pool2d with divisor_override is not exported")
    attrs = _pool_attrs(ctx.arg(1, "kernel_size"), ctx.arg(2, "stride"), ctx.arg(3, "padding", 0),
                        ctx.arg(4, "ceil_mode", False))
    include = int(bool(ctx.arg(5, "count_include_pad", True)))
    return _out(ctx, b.add("AveragePool", [ctx.args[0].name], count_include_pad=include, **attrs))


def _max_pool(b: GraphBuilder, ctx: Ctx, kernel, stride, padding, dilation, ceil_mode) -> Value:
    x = ctx.args[0]
    attrs = _pool_attrs(kernel, stride, padding, ceil_mode)
    if x.name in b.zero_pads:
        y = _max_pool_of_zero_pad(b, ctx, x, attrs, dilation)
        if y is not None:
            return _out(ctx, y, x.bound)
    return _out(ctx, b.add("MaxPool", [x.name], dilations=list(_pair(dilation)), **attrs), x.bound)


def _max_pool_of_zero_pad(b: GraphBuilder, ctx: Ctx, padded: Value, attrs: dict, dilation) -> str | None:
    """MaxPool(Pad0(x)) without a Pad node in front of the MaxPool.

    onnxruntime (1.31, every optimisation level above "disabled") fuses a zero Pad into the following
    MaxPool's ``pads``, but MaxPool pads with -inf, so windows whose valid values are all negative
    change. Instead: MaxPool(x) with the zero pad as its own pads, then Max with a constant that is 0
    on windows touching the zero pad and -inf elsewhere (computed here with torch's own max_pool2d).
    """
    x, spatial = b.zero_pads[padded.name]
    k, own = attrs["kernel_shape"], attrs["pads"]
    begins = [spatial[0][0] + own[0], spatial[1][0] + own[1]]
    ends = [spatial[0][1] + own[2], spatial[1][1] + own[3]]
    if any(p >= kk for p, kk in zip(begins + ends, k + k)):
        return None  # ONNX requires pads < kernel; keep the explicit Pad (verification will judge it)
    marker = torch.full((1, 1, *x.shape[2:]), float("-inf"))
    marker = F.pad(marker, (spatial[1][0], spatial[1][1], spatial[0][0], spatial[0][1]), value=0.0)
    marker = F.max_pool2d(marker, k, attrs["strides"], (own[0], own[1]), _pair(dilation), bool(attrs["ceil_mode"]))
    pooled = b.add("MaxPool", [x.name], dilations=list(_pair(dilation)),
                   **{**attrs, "pads": begins + ends})
    return b.add("Max", [pooled, b.initializer(marker.numpy())])


@converts_module(nn.MaxPool2d)
def _max_pool_module(b: GraphBuilder, ctx: Ctx) -> Value:
    m = ctx.module
    if m.return_indices:
        raise UnsupportedModelError(f"module '{ctx.fqn}': MaxPool2d(return_indices=True) is not exported")
    return _max_pool(b, ctx, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)


@converts_call(F.max_pool2d)
def _max_pool_fn(b: GraphBuilder, ctx: Ctx) -> Value:
    return _max_pool(b, ctx, ctx.arg(1, "kernel_size"), ctx.arg(2, "stride"), ctx.arg(3, "padding", 0),
                     ctx.arg(4, "dilation", 1), ctx.arg(5, "ceil_mode", False))


def _adaptive_avg(b: GraphBuilder, ctx: Ctx, x: Value) -> Value:
    (h, w), (oh_, ow) = x.shape[2:], ctx.shape[2:]
    if (oh_, ow) == (1, 1):
        return _out(ctx, b.add("GlobalAveragePool", [x.name]))
    if h % oh_ or w % ow:
        raise UnsupportedModelError(f"adaptive average pooling {h}x{w} -> {oh_}x{ow} (uneven windows)")
    k = [h // oh_, w // ow]
    return _out(ctx, b.add("AveragePool", [x.name], kernel_shape=k, strides=k))


@converts_module(nn.AdaptiveAvgPool2d)
@converts_call(F.adaptive_avg_pool2d)
def _adaptive_avg_pool(b: GraphBuilder, ctx: Ctx) -> Value:
    return _adaptive_avg(b, ctx, ctx.args[0])


@converts_call(torch.mean, "mean")
def _mean(b: GraphBuilder, ctx: Ctx) -> Value:
    x, dims = ctx.arg(0, "input"), ctx.arg(1, "dim")
    keep = bool(ctx.arg(2, "keepdim", False))
    dims = [dims] if isinstance(dims, int) else list(dims)
    axes = sorted(d % x.rank for d in dims)
    if 0 in axes and x.batched:
        raise UnsupportedModelError("a mean over the batch dimension is not exported")
    return _out(ctx, b.add("ReduceMean", [x.name, b.ints(axes)], keepdims=int(keep)))


@converts_module(nn.Flatten, nn.Unflatten)
@converts_call(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
               "flatten", "view", "reshape", "squeeze", "unsqueeze", "view_as", "reshape_as")
def _reshape(b: GraphBuilder, ctx: Ctx) -> Value:
    # Every shape change is a Reshape to the recorded output shape; 0 copies the runtime batch.
    x = ctx.args[0]
    if ctx.batched and not x.batched:
        raise UnsupportedModelError(f"{ctx.node.target}: reshape that creates a batch dimension")
    target = list(ctx.shape)
    if ctx.batched:
        target[0] = 0
    return _out(ctx, b.add("Reshape", [x.name, b.ints(target)]), x.bound)


@converts_call(torch.cat, torch.concat)
def _cat(b: GraphBuilder, ctx: Ctx) -> Value:
    parts, dim = list(ctx.arg(0, "tensors")), int(ctx.arg(1, "dim", 0))
    names = [b.operand(p) for p in parts]
    bounds = [p.bound if isinstance(p, Value) else None for p in parts]
    bound = None if any(x is None for x in bounds) else max(bounds)
    return _out(ctx, b.add("Concat", names, axis=dim % len(ctx.shape)), bound)


def _binary(op: str, combine: Callable[[int, int], int] | None) -> Converter:
    def convert(b: GraphBuilder, ctx: Ctx) -> Value:
        lhs, rhs = ctx.args[0], ctx.args[1]
        if ctx.kwargs.get("alpha", 1) != 1:
            raise UnsupportedModelError(f"{op} with alpha != 1 is not exported")
        bound = None
        if combine and isinstance(lhs, Value) and isinstance(rhs, Value) and None not in (lhs.bound, rhs.bound):
            bound = combine(lhs.bound, rhs.bound)
            bound = bound if bound < EXACT_LIMIT else None
        return _out(ctx, b.add(op, [b.operand(lhs), b.operand(rhs)]), bound)

    return convert


converts_call(operator.add, operator.iadd, torch.add, "add", "add_")(_binary("Add", operator.add))
converts_call(operator.sub, operator.isub, torch.sub, "sub", "sub_")(_binary("Sub", operator.add))
converts_call(operator.mul, operator.imul, torch.mul, "mul", "mul_")(_binary("Mul", None))
converts_call(operator.truediv, operator.itruediv, torch.div, "div", "div_")(_binary("Div", None))


@converts_call(torch.sigmoid, "sigmoid")
def _sigmoid(b: GraphBuilder, ctx: Ctx) -> Value:
    return _out(ctx, b.add("Sigmoid", [ctx.args[0].name]))


@converts_call(F.pad)
def _pad(b: GraphBuilder, ctx: Ctx) -> Value:
    x, pad = ctx.arg(0, "input"), list(ctx.arg(1, "pad"))
    mode, value = ctx.arg(2, "mode", "constant"), ctx.arg(3, "value", None) or 0.0
    if mode != "constant":
        raise UnsupportedModelError(f"F.pad mode {mode!r} is not exported")
    begins, ends = [0] * x.rank, [0] * x.rank
    for i in range(len(pad) // 2):  # torch lists (begin, end) pairs from the last dim backwards
        begins[x.rank - 1 - i], ends[x.rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    y = b.add("Pad", [x.name, b.ints(begins + ends), b.scalar(float(value))], mode="constant")
    if float(value) == 0.0 and x.rank == 4 and not any(begins[:2] + ends[:2]):
        b.zero_pads[y] = (x, [(begins[2], ends[2]), (begins[3], ends[3])])
    bound = x.bound if x.bound is not None and float(value).is_integer() else None
    return _out(ctx, y, None if bound is None else max(bound, abs(int(value))))


def _constant_of_shape(b: GraphBuilder, ctx: Ctx, value: float) -> Value:
    static = list(ctx.shape[1:]) if ctx.batched else list(ctx.shape)
    if not ctx.batched:
        return _out(ctx, b.initializer(np.full(static, value, dtype=np.float32)))
    shape = b.add("Concat", [b.batch_dim, b.ints(static)], axis=0)
    y = b.add("ConstantOfShape", [shape], value=onh.from_array(np.array([value], dtype=np.float32)))
    return _out(ctx, y, abs(int(value)) if float(value).is_integer() else None)


@converts_call(torch.zeros, torch.zeros_like, "new_zeros")
def _zeros(b: GraphBuilder, ctx: Ctx) -> Value:
    return _constant_of_shape(b, ctx, 0.0)


@converts_call(torch.ones, torch.ones_like, "new_ones")
def _ones(b: GraphBuilder, ctx: Ctx) -> Value:
    return _constant_of_shape(b, ctx, 1.0)


@converts_call(F.conv2d)
def _conv_fn(b: GraphBuilder, ctx: Ctx) -> Value:
    x, w, bias = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    if not isinstance(w, torch.Tensor) or isinstance(bias, Value):
        raise UnsupportedModelError("F.conv2d with a weight computed from the input is not exported")

    class _Attrs:  # F.conv2d's arguments in the shape _conv_attrs reads from modules
        stride, padding = ctx.arg(3, "stride", 1), ctx.arg(4, "padding", 0)
        dilation, groups = ctx.arg(5, "dilation", 1), ctx.arg(6, "groups", 1)

    name = f"{ctx.node.name}"
    b.inexact.append(f"{name}: float weights")
    inputs = [x.name, b.float_weight(name, w)]
    if bias is not None:
        inputs.append(b.operand(bias))
    return _out(ctx, b.add("Conv", inputs, **_conv_attrs(ctx, _Attrs, tuple(w.shape[2:]))))


@converts_call(F.linear)
def _linear_fn(b: GraphBuilder, ctx: Ctx) -> Value:
    x, w, bias = ctx.arg(0, "input"), ctx.arg(1, "weight"), ctx.arg(2, "bias")
    if not isinstance(w, torch.Tensor) or isinstance(bias, Value):
        raise UnsupportedModelError("F.linear with a weight computed from the input is not exported")
    name = f"{ctx.node.name}"
    b.inexact.append(f"{name}: float weights")
    bias_name = b.operand(bias) if bias is not None else None
    return _out(ctx, _linear(b, ctx, x, b.float_weight(name, w), bias_name))


__all__ = [
    "BATCH",
    "BuiltGraph",
    "GraphBuilder",
    "UnsupportedModelError",
    "Value",
    "WeightRecord",
    "build_graph",
    "converts_call",
    "converts_module",
]
