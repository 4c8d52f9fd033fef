"""The ONNX graph under construction: its values, its weight records and the builder that owns them.

:class:`GraphBuilder` accumulates nodes and initializers, names values, shares constants and writes each
weight once in its final encoding (:mod:`micronet.export.encoding`). It also carries what the converters
learn about exactness: a :class:`Value` that holds integer codes has a bound on their magnitude, and
every reason the graph cannot be bit-exact is appended to ``GraphBuilder.inexact``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto
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
    encoding: str  # "dense" or "bitmask" for codes, "float32" for float weights
    storage: str  # ONNX element type name of the stored values
    shape: tuple[int, ...]
    nnz: int
    payload_bytes: int

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


class GraphBuilder:
    """Accumulates ONNX nodes and initializers; owns naming, constants and weight encoding."""

    def __init__(self, *, form: str, sparse_weights: bool) -> None:
        self.form, self.sparse_weights = form, sparse_weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.weights: list[WeightRecord] = []
        self.inexact: list[str] = []
        # (module path, ONNX name of its input, of its output) of every converted module, in execution order
        self.module_values: list[tuple[str, str, str]] = []
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
           "WeightRecord"]
