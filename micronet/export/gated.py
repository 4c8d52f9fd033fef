"""Gated (SkipNet) networks to ONNX: one ``If`` per gate, so a skipped block's ops are not run.

A gated forward is data-dependent, so it is not traced whole: the model cuts it into pieces
(:class:`micronet.models.gates.GatedPlan`: stem, per gate its features, block and shortcut, head), each
piece is traced and converted like any network (:func:`micronet.export.graph.emit_module`), and this
module writes what joins them: the LSTM controller step (MatMul / Sigmoid / Tanh), the decision
``p > 0.5`` and an ``If`` node per gate.

Batch semantics (the same graph serves every batch size):

* batch 1: the ``If`` runs the block when the gate opens and only the shortcut (pooling and zero
  padding, no weights) when it shuts; a skipped block's convolutions are never executed.
* batch > 1: the ``If`` takes the block branch when *any* sample's gate is open; that branch computes
  the block for the whole batch and keeps it per sample with ``Where(mask, block, shortcut)``. Results
  are per sample exactly those of batch 1; the cost is the full block whenever at least one sample needs
  it (compute is saved only when the whole batch skips). Run batch 1 to get the per-image saving.

The graph has a second output, ``gates`` [batch, gates] (1.0 = block executed), which verification
compares with PyTorch's decisions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto
from onnx import helper as oh
from torch import nn

from micronet.export.builder import INPUT_NAME, OUTPUT_NAME, GraphBuilder, UnsupportedModelError, Value
from micronet.export.graph import BuiltGraph, assemble, emit_module
from micronet.export.record import BATCHES
from micronet.models import GatedNetwork, is_gated

GATES_NAME = "gates"
BATCH_NOTE = ("gated graph: at batch 1 each If runs a block only when its gate opens; at batch > 1 a block runs "
              "for the whole batch when any sample's gate opens, and Where keeps it per sample")


class _Piece(nn.Module):
    """One piece of a gated forward as a module whose children are the network's own (same names)."""

    def __init__(self, model: nn.Module, piece) -> None:
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        self._piece = piece

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._piece(self, x)


@contextmanager
def _branch(b: GraphBuilder) -> Iterator[list[onnx.NodeProto]]:
    """Nodes added inside the block go to a separate list (an ``If`` branch); initializers stay global.

    Nodes computed from initializers alone (weight decoding: DequantizeLinear, the sparse-weight decoders) are
    hoisted to the main graph: onnxruntime folds them once at load, and the weights stay visible to
    verification, which reads them as graph outputs.
    """
    outer, b.nodes = b.nodes, []
    branch: list[onnx.NodeProto] = []
    try:
        yield branch
    finally:
        captured, b.nodes = b.nodes, outer
        constant = {t.name for t in b.initializers}
        for node in captured:
            if node.input and all(name in constant for name in node.input if name):
                b.nodes.append(node)
                constant.update(node.output)
            else:
                branch.append(node)


def _shapes(model: nn.Module, plan, input_shape: tuple[int, ...], input_dtype: torch.dtype) -> list[tuple[int, ...]]:
    """Per-sample shape of the tensor before each gate and before the head."""
    with torch.inference_mode():
        x = plan.stem(model, torch.zeros((1, *input_shape), dtype=input_dtype))
        shapes = [tuple(x.shape[1:])]
        for block in plan.blocks:
            x = block(model, x)
            shapes.append(tuple(x.shape[1:]))
    return shapes


def _controller_step(b: GraphBuilder, controller: nn.Module, features: Value, state: tuple[str, str] | None,
                     prefix: str) -> tuple[str, tuple[str, str]]:
    """One LSTM step then Linear -> Sigmoid: (execution probability [N], new (h, c))."""
    lstm, proj = getattr(controller, "lstm", None), getattr(controller, "proj", None)
    if not isinstance(lstm, nn.LSTM) or not isinstance(proj, nn.Linear) or lstm.num_layers != 1:
        raise UnsupportedModelError("the gate controller must be a one-layer nn.LSTM followed by an nn.Linear")

    def weight(t: torch.Tensor, name: str) -> str:
        return b.initializer(t.detach().cpu().float().numpy(), name)

    hidden = lstm.hidden_size
    gates = b.add("MatMul", [features.name, weight(lstm.weight_ih_l0.T, f"{prefix}.lstm.weight_ih_l0.T")])
    bias = lstm.bias_ih_l0 + lstm.bias_hh_l0 if lstm.bias else None
    if bias is not None:
        gates = b.add("Add", [gates, weight(bias, f"{prefix}.lstm.bias_l0")])
    if state is not None:
        recurrent = b.add("MatMul", [state[0], weight(lstm.weight_hh_l0.T, f"{prefix}.lstm.weight_hh_l0.T")])
        gates = b.add("Add", [gates, recurrent])
    axis = b.ints([1])
    # PyTorch's gate order: input, forget, cell (tanh), output.
    parts = [b.add("Slice", [gates, b.ints([k * hidden]), b.ints([(k + 1) * hidden]), axis]) for k in range(4)]
    i, f, o = (b.add("Sigmoid", [parts[k]]) for k in (0, 1, 3))
    g = b.add("Tanh", [parts[2]])
    c = b.add("Mul", [i, g])
    if state is not None:
        c = b.add("Add", [b.add("Mul", [f, state[1]]), c])
    h = b.add("Mul", [o, b.add("Tanh", [c])])
    logit = b.add("MatMul", [h, weight(proj.weight.T, f"{prefix}.proj.weight.T")])
    if proj.bias is not None:
        logit = b.add("Add", [logit, weight(proj.bias, f"{prefix}.proj.bias")])
    p = b.add("Reshape", [b.add("Sigmoid", [logit]), b.ints([-1])])
    return p, (h, c)


def _named(nodes: list[onnx.NodeProto], prefix: str) -> list[onnx.NodeProto]:
    for k, node in enumerate(nodes):
        node.name = f"{prefix}/{node.op_type}_{k}"
    return nodes


def build_gated_graph(model: nn.Module, *, form: str = "integer", sparse_weights: bool | Sequence[str] = False,
                      opset: int = 21, input_shape: tuple[int, ...] = (3, 32, 32),
                      input_dtype: torch.dtype = torch.float32) -> BuiltGraph:
    """Convert an eval-mode gated network (``GatedNetwork.gated_plan``) into an ONNX graph with ``If`` gates;
    ``input_dtype`` torch.uint8 for a pixel-input form (only its stem reads the image)."""
    if not isinstance(model, GatedNetwork):
        raise UnsupportedModelError(f"{type(model).__name__} has no gates")
    plan = model.gated_plan()
    shapes = _shapes(model, plan, input_shape, input_dtype)
    b = GraphBuilder(form=form, sparse_weights=sparse_weights)
    _ = b.batch_dim  # made in the main graph, so values created inside a branch never leak out of it
    ba = BATCHES[0]
    x = emit_module(b, _Piece(model, plan.stem), Value(INPUT_NAME, (ba, *input_shape), batched=True), input_shape,
                    input_dtype)
    controller = model.get_submodule(plan.controller)
    state = None
    decisions = []
    half = b.scalar(0.5)
    for index, (features, block, skip, name) in enumerate(zip(plan.features, plan.blocks, plan.skips,
                                                               plan.block_names)):
        feats = emit_module(b, _Piece(model, features), x, shapes[index])
        p, state = _controller_step(b, controller, feats, state, plan.controller)
        mask = b.add("Greater", [p, half])
        decisions.append(b.add("Unsqueeze", [b.add("Cast", [mask], to=TensorProto.FLOAT), b.ints([1])]))
        any_open = b.add("ReduceMax", [decisions[-1]], keepdims=0)
        cond = b.add("Greater", [any_open, half])
        with _branch(b) as then_nodes:
            ran = emit_module(b, _Piece(model, block), x, shapes[index])
            kept = emit_module(b, _Piece(model, skip), x, shapes[index])
            wide = b.add("Reshape", [mask, b.ints([-1, 1, 1, 1])])
            then_out = b.add("Where", [wide, ran.name, kept.name])
        with _branch(b) as else_nodes:
            else_out = emit_module(b, _Piece(model, skip), x, shapes[index]).name
        out_shape = (ba, *shapes[index + 1])
        branches = {}
        for key, nodes, out in (("then_branch", then_nodes, then_out), ("else_branch", else_nodes, else_out)):
            branches[key] = oh.make_graph(_named(nodes, f"{name}.{key[:4]}"), f"{name}_{key[:4]}", [],
                                          [oh.make_tensor_value_info(out, TensorProto.FLOAT, None)])
        merged = b.add("If", [cond], **branches)
        bound = None if ran.bound is None or kept.bound is None else max(ran.bound, kept.bound)
        x = Value(merged, out_shape, batched=True, bound=bound)
    logits = emit_module(b, _Piece(model, plan.head), x, shapes[-1])
    if not isinstance(logits, Value) or logits.rank != 2:
        raise UnsupportedModelError("the gated model's head must return [batch, classes] logits")
    b.add("Concat", decisions, axis=1, out=GATES_NAME)
    gates_info = oh.make_tensor_value_info(GATES_NAME, TensorProto.FLOAT, ["batch", len(decisions)])
    built = assemble(b, logits, form=form, opset=opset, input_shape=input_shape, extra_outputs=(gates_info,),
                     input_dtype=input_dtype)
    built.inexact_reasons.append("gate controller (LSTM) in float32")
    built.exact = False  # the controller's float sums may round differently in onnxruntime
    built.opaque_branches = True  # values inside the If branches are not recorded: no first-parting analysis
    return built


@dataclass
class GateParity:
    """Gate decisions and top-1 of the ONNX graph at batch 1, and its decisions in one batched run, against
    PyTorch's eval forward."""

    samples: int
    gates: int
    decisions_agree: int = 0  # samples whose every gate decision matches
    top1_agree: int = 0
    batched_samples: int = 0  # the images of the one batched run (the graph's other path: Where per sample)
    batched_agree: int = 0
    failures: list[str] = field(default_factory=list)

    def format(self) -> str:
        """One line."""
        return (f"gates: {self.decisions_agree}/{self.samples} samples with all {self.gates} decisions equal, "
                f"top-1 {self.top1_agree}/{self.samples} (batch 1, onnxruntime vs PyTorch); decisions "
                f"{self.batched_agree}/{self.batched_samples} in one batch of {self.batched_samples}")


def verify_gates(session, reference: nn.Module, inputs: torch.Tensor, batch: int = 64) -> GateParity:
    """Compare decisions and top-1 of ``session`` run one image at a time with ``reference`` (eval; its
    decisions are per image whatever the batch, so it runs in batches of ``batch``), and the decisions of
    ``session`` run once on the first ``batch`` images together (at batch > 1 the graph takes other paths)."""
    reference = reference.eval()
    parity = GateParity(len(inputs), reference.num_gates)
    with torch.inference_mode():
        for start in range(0, len(inputs), batch):
            x = inputs[start : start + batch]
            x = x if x.dtype == torch.uint8 else x.float()  # pixel-input graphs take uint8
            want_top1 = reference(x).argmax(1).numpy()
            want = reference.executed().T.numpy().astype(np.float32)
            for k in range(len(x)):
                logits, gates = session.run([OUTPUT_NAME, GATES_NAME], {INPUT_NAME: x[k : k + 1].numpy()})
                parity.decisions_agree += int(np.array_equal(gates[0], want[k]))
                parity.top1_agree += int(logits.argmax(1)[0] == want_top1[k])
            if start == 0 and len(x) > 1:
                (gates,) = session.run([GATES_NAME], {INPUT_NAME: x.numpy()})
                parity.batched_samples = len(x)
                parity.batched_agree = int((gates == want).all(axis=1).sum())
    if parity.decisions_agree != parity.samples:
        parity.failures.append(f"gate decisions differ on {parity.samples - parity.decisions_agree}/"
                               f"{parity.samples} samples")
    if parity.top1_agree != parity.samples:
        parity.failures.append(f"top-1 differs on {parity.samples - parity.top1_agree}/{parity.samples} samples "
                               "at batch 1")
    if parity.batched_agree != parity.batched_samples:
        parity.failures.append(f"gate decisions differ on {parity.batched_samples - parity.batched_agree}/"
                               f"{parity.batched_samples} samples in one batch of {parity.batched_samples}")
    return parity


__all__ = ["BATCH_NOTE", "GATES_NAME", "GateParity", "build_gated_graph", "is_gated", "verify_gates"]
