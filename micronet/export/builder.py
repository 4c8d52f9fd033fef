"""The ONNX graph under construction: its values, its weight records and the builder that owns them.

:class:`GraphBuilder` accumulates nodes and initializers, names values, shares constants and writes each
weight once in its final encoding (:mod:`micronet.export.encoding`). It also carries what the converters
learn about exactness: a :class:`Value` that holds integer codes has a bound on their magnitude, and
every reason the graph cannot be bit-exact is appended to ``GraphBuilder.inexact``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper as oh
from onnx import numpy_helper as onh

from micronet.errors import MicronetError
from micronet.export import encoding

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXACT_LIMIT = 2**24  # fp32 represents every integer up to 2^24, so integer sums below it are exact


class UnsupportedModelError(MicronetError):
    """The model contains ops the exporter cannot write (the message names them)."""


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
    encoding: str  # one of encoding.ENCODINGS for codes, "float32" for float weights
    storage: str  # how the stored values are typed: an ONNX element type name, or "6-bit" for packed fields
    shape: tuple[int, ...]
    nnz: int
    payload_bytes: int  # bytes of the initializers' data
    file_bytes: int = 0  # what the weight adds to the file: initializers and decoding nodes, serialised
    detail: str = ""  # encoding parameters, e.g. the Rice parameter "k=1"

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def weight_encodings(sparse_weights: bool | Sequence[str]) -> tuple[str, ...]:
    """The encodings a tensor may get: dense only (False), every encoding (True), or dense and those named."""
    if sparse_weights is True:
        return encoding.ENCODINGS
    if sparse_weights is False:
        return ("dense",)
    unknown = [e for e in sparse_weights if e not in encoding.ENCODINGS]
    if unknown:
        raise MicronetError(f"unknown weight encoding(s) {', '.join(map(str, unknown))}; "
                            f"use any of {', '.join(encoding.ENCODINGS)}")
    return ("dense", *(e for e in encoding.ENCODINGS if e in sparse_weights and e != "dense"))


class GraphBuilder:
    """Accumulates ONNX nodes and initializers; owns naming, constants and weight encoding."""

    def __init__(self, *, form: str, sparse_weights: bool | Sequence[str]) -> None:
        self.form, self.encodings = form, weight_encodings(sparse_weights)
        # True: the smallest file, decoder functions counted; named encodings: each tensor's own smallest
        self._count_functions = sparse_weights is True
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.weights: list[WeightRecord] = []
        self.inexact: list[str] = []
        # (module path, ONNX name of its input, of its output) of every converted module, in execution order
        self.module_values: list[tuple[str, str, str]] = []
        # code weights: the candidate encodings of each (by value name); one is chosen for all at once by
        # finish_weights, because a shared decoder function pays only if its users together save its own bytes
        self._candidates: dict[str, list[encoding.Encoded]] = {}
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
        """Float weight value decoded in-graph from integer codes (its encoding is settled by finish_weights)."""
        prefix = f"{fqn}.weight"
        if prefix in self._weight_values:
            return self._weight_values[prefix]
        try:
            codes = encoding.as_codes(weight.detach().cpu().numpy())
            encoding.code_type(codes)
            self._candidates[prefix] = encoding.candidates(prefix, codes, self.scalar(1.0), self.encodings)
        except ValueError as exc:
            raise UnsupportedModelError(f"module '{fqn}': {exc}") from None
        self._names.add(prefix)
        for e in self._candidates[prefix]:
            self._names.update(t.name for t in e.initializers)
            self._names.update(o for node in e.nodes for o in node.output)
        self.weights.append(self._record(fqn, self._candidates[prefix][0], codes))
        self._weight_values[prefix] = prefix
        return prefix

    @staticmethod
    def _record(fqn: str, e: encoding.Encoded, codes: np.ndarray) -> WeightRecord:
        return WeightRecord(fqn, "codes", e.encoding, e.storage, tuple(codes.shape), int(np.count_nonzero(codes)),
                            e.payload_bytes, e.file_bytes, e.detail)

    def finish_weights(self) -> list[onnx.NodeProto]:
        """Choose every code weight's encoding, add its initializers and return its decoding nodes (which depend
        on initializers alone, so they go first in the graph).

        With every encoding allowed, the file's size counts the decoder functions too: each subset of the (three)
        functions is tried, every tensor taking its smallest candidate that calls only functions in the subset, and
        the smallest total (tensors plus the functions they use) wins; the empty subset, all dense, bounds it. A
        greedy drop of one function at a time misses a tensor that uses two (packed values inside RiceDecode).
        With named encodings each tensor keeps its own smallest.
        """
        # the functions' size as written (the opset only changes a number in each)
        cost = {name: make(encoding.DEFAULT_OPSET).ByteSize() + 2 for name, make in encoding.FUNCTIONS.items()}
        names = list(encoding.FUNCTIONS)

        def best(cands: list[encoding.Encoded], allowed: set[str]) -> encoding.Encoded:
            return min((e for e in cands if e.functions <= allowed), key=lambda e: e.file_bytes)  # dense: none

        subsets = ([set(c) for r in range(len(names) + 1) for c in itertools.combinations(names, r)]
                   if self._count_functions else [set(names)])
        chosen: dict[str, encoding.Encoded] = {}
        smallest = None
        for allowed in subsets:
            pick = {p: best(c, allowed) for p, c in self._candidates.items()}
            used = set().union(*(e.functions for e in pick.values()))
            total = sum(e.file_bytes for e in pick.values()) + sum(cost[n] for n in used)
            if smallest is None or total < smallest:  # ties: the earlier, smaller subset
                smallest, chosen = total, pick
        nodes: list[onnx.NodeProto] = []
        for i, rec in enumerate(self.weights):
            e = chosen.get(f"{rec.module}.weight") if rec.kind == "codes" else None
            if e is None:
                continue
            self.initializers.extend(e.initializers)
            nodes.extend(e.nodes)
            self.weights[i] = WeightRecord(rec.module, "codes", e.encoding, e.storage, rec.shape, rec.nnz,
                                           e.payload_bytes, e.file_bytes, e.detail)
        self._candidates.clear()
        return nodes

    def float_weight(self, fqn: str, weight: torch.Tensor) -> str:
        """Float weight stored as a float32 initializer."""
        name = f"{fqn}.weight"
        if name in self._weight_values:
            return self._weight_values[name]
        arr = weight.detach().cpu().float().numpy()
        value = self.initializer(arr, name)
        self.weights.append(
            WeightRecord(fqn, "float", "float32", "FLOAT", tuple(arr.shape), int(np.count_nonzero(arr)), arr.nbytes,
                         arr.nbytes)
        )
        self._weight_values[name] = value
        return value

    def channel_view(self, t: torch.Tensor, rank: int, name: str, axis: int = 1) -> str:
        """Per-channel vector as a constant broadcastable over dim ``axis`` (1, or -1: the last) of a rank-``rank``
        tensor."""
        arr = t.detach().cpu().float().reshape(-1).numpy()
        if arr.size == 1:
            return self.initializer(arr.reshape(()), name)
        if axis == -1:
            return self.initializer(arr, name)
        return self.initializer(arr.reshape((1, -1) + (1,) * (rank - 2)), name)


__all__ = ["EXACT_LIMIT", "INPUT_NAME", "OUTPUT_NAME", "GraphBuilder", "UnsupportedModelError", "Value",
           "WeightRecord", "weight_encodings"]
