"""How integer weight codes are stored in an ONNX file, and how to read them back.

Two encodings, chosen per tensor:

* **dense**: the codes as one initializer of the narrowest integer type that holds them (INT4, UINT4,
  INT8, UINT8, INT16, UINT16; INT4/UINT4 are packed two per byte), dequantized in the graph by
  ``DequantizeLinear(codes, 1.0)``.
* **bitmask** (``sparse_weights=True``, used only where it is smaller): a ``UINT8`` initializer with
  the non-zero mask packed eight positions per byte (little bit order), the non-zero codes in
  order as a packed vector, and the tensor shape. One model-local ONNX function
  (``micronet.BitmaskDecode``) shared by every sparse tensor turns the three into INT8 codes, which
  then go through the same ``DequantizeLinear``. The decoder depends only on initializers, so
  onnxruntime constant-folds it when the session is created; because it outputs INT8 codes rather
  than floats, the weights stay behind ``DequantizeLinear`` after folding, which keeps onnxruntime
  from fusing the per-channel rescale into the convolution (such fusions break bit-exactness; spec
  onnx-export.md §3, §5).

Initializer names follow one convention, so a verifier can find a module's weight from its name
alone: ``{module}.weight.codes`` (dense), ``{module}.weight.mask`` / ``.nz`` / ``.shape`` (bitmask);
the dequantized float weight is the value ``{module}.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as onh

DECODER_DOMAIN = "micronet"
DECODER_NAME = "BitmaskDecode"

# (ONNX type, numpy dtype, min, max, bits per element), narrowest first.
_CODE_TYPES: tuple[tuple[int, type, int, int, int], ...] = (
    (TensorProto.INT4, ml_dtypes.int4, -8, 7, 4),
    (TensorProto.UINT4, ml_dtypes.uint4, 0, 15, 4),
    (TensorProto.INT8, np.int8, -128, 127, 8),
    (TensorProto.UINT8, np.uint8, 0, 255, 8),
    (TensorProto.INT16, np.int16, -(2**15), 2**15 - 1, 16),
    (TensorProto.UINT16, np.uint16, 0, 2**16 - 1, 16),
)


@dataclass(frozen=True)
class CodeType:
    """The storage type chosen for one tensor of integer codes."""

    onnx_type: int
    np_dtype: type
    bits: int

    @property
    def name(self) -> str:
        return TensorProto.DataType.Name(self.onnx_type)


def code_type(codes: np.ndarray) -> CodeType:
    """Narrowest ONNX integer type that holds every code (by the actual values, not the declared bits)."""
    lo, hi = (int(codes.min()), int(codes.max())) if codes.size else (0, 0)
    for onnx_type, dtype, tmin, tmax, bits in _CODE_TYPES:
        if tmin <= lo and hi <= tmax:
            return CodeType(onnx_type, dtype, bits)
    raise ValueError(f"integer codes in [{lo}, {hi}] do not fit 16 bits")


def as_codes(weight: np.ndarray) -> np.ndarray:
    """The weight as int64 codes; raises if any value is not an exact integer."""
    w = np.asarray(weight, dtype=np.float64)
    codes = np.rint(w)
    if not np.array_equal(codes, w):
        raise ValueError("weight holds non-integer values, so it is not integer codes")
    return codes.astype(np.int64)


def dense_initializer(name: str, codes: np.ndarray, ctype: CodeType) -> TensorProto:
    """Initializer holding ``codes`` as ``ctype`` (packed two per byte for 4-bit types)."""
    return onh.from_array(codes.astype(ctype.np_dtype), name)


def bitmask_initializers(prefix: str, codes: np.ndarray) -> tuple[list[TensorProto], int]:
    """Mask, non-zero-code and shape initializers for ``codes``, and their payload size in bytes."""
    flat = codes.reshape(-1)
    mask = flat != 0
    nz = flat[mask]
    if nz.size == 0:
        # Gather needs a non-empty table even when no position selects it.
        nz = np.zeros(1, dtype=np.int64)
    ctype = code_type(nz)
    tensors = [
        onh.from_array(np.packbits(mask, bitorder="little"), f"{prefix}.mask"),
        onh.from_array(nz.astype(ctype.np_dtype), f"{prefix}.nz"),
        onh.from_array(np.asarray(codes.shape, dtype=np.int64), f"{prefix}.shape"),
    ]
    return tensors, bitmask_bytes(codes.size, int(nz.size), ctype.bits, codes.ndim)


def dense_bytes(numel: int, bits: int) -> int:
    """Payload bytes of a dense code tensor."""
    return (numel * bits + 7) // 8


def bitmask_bytes(numel: int, nnz: int, bits: int, ndim: int) -> int:
    """Payload bytes of a bitmask-encoded tensor (mask + packed non-zeros + int64 shape)."""
    return (numel + 7) // 8 + (max(nnz, 1) * bits + 7) // 8 + 8 * ndim


def decoder_function() -> onnx.FunctionProto:
    """The shared ``micronet.BitmaskDecode(mask, nz, shape) -> int8 codes`` function."""

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return oh.make_node("Constant", [], [name], value=onh.from_array(value, name))

    nodes = [
        const("bit_values", np.array([1, 2, 4, 8, 16, 32, 64, 128], dtype=np.uint8)),
        const("axis1", np.array([1], dtype=np.int64)),
        const("zero_u8", np.array(0, dtype=np.uint8)),
        const("minus1", np.array([-1], dtype=np.int64)),
        const("zero_1d", np.array([0], dtype=np.int64)),
        const("zero_i64", np.array(0, dtype=np.int64)),
        const("one_i64", np.array(1, dtype=np.int64)),
        const("zero_i8", np.array(0, dtype=np.int8)),
        # mask bytes [B] -> bits [B, 8] (little order) -> flat bool [8B] -> first numel positions
        oh.make_node("Unsqueeze", ["mask", "axis1"], ["mask_col"]),
        oh.make_node("BitwiseAnd", ["mask_col", "bit_values"], ["bit_hits"]),
        oh.make_node("Greater", ["bit_hits", "zero_u8"], ["bits_2d"]),
        oh.make_node("Reshape", ["bits_2d", "minus1"], ["bits_flat"]),
        oh.make_node("ReduceProd", ["shape"], ["numel"], keepdims=1),
        oh.make_node("Slice", ["bits_flat", "zero_1d", "numel"], ["keep"]),
        # position of each kept weight in the non-zero list: running count of kept positions - 1
        oh.make_node("Cast", ["keep"], ["keep_i64"], to=TensorProto.INT64),
        oh.make_node("CumSum", ["keep_i64", "zero_i64"], ["running"]),
        oh.make_node("Sub", ["running", "one_i64"], ["index_raw"]),
        oh.make_node("Max", ["index_raw", "zero_i64"], ["index"]),
        oh.make_node("Cast", ["nz"], ["nz_i8"], to=TensorProto.INT8),
        oh.make_node("Gather", ["nz_i8", "index"], ["gathered"], axis=0),
        oh.make_node("Where", ["keep", "gathered", "zero_i8"], ["flat_codes"]),
        oh.make_node("Reshape", ["flat_codes", "shape"], ["codes"]),
    ]
    return oh.make_function(
        DECODER_DOMAIN,
        DECODER_NAME,
        ["mask", "nz", "shape"],
        ["codes"],
        nodes,
        [oh.make_opsetid("", 21)],
        doc_string="",
    )


def read_codes(model: onnx.ModelProto, prefix: str) -> np.ndarray | None:
    """Decode the codes stored under ``prefix`` (``{module}.weight``) straight from the initializers."""
    inits = {t.name: t for t in model.graph.initializer}
    if f"{prefix}.codes" in inits:
        return onh.to_array(inits[f"{prefix}.codes"]).astype(np.int64)
    if f"{prefix}.mask" in inits:
        mask_bytes = onh.to_array(inits[f"{prefix}.mask"])
        nz = onh.to_array(inits[f"{prefix}.nz"]).astype(np.int64)
        shape = tuple(int(d) for d in onh.to_array(inits[f"{prefix}.shape"]))
        numel = int(np.prod(shape))
        mask = np.unpackbits(mask_bytes, bitorder="little")[:numel].astype(bool)
        flat = np.zeros(numel, dtype=np.int64)
        flat[mask] = nz[: int(mask.sum())]
        return flat.reshape(shape)
    return None


def rice_mask_bits(mask: np.ndarray) -> tuple[int, int]:
    """(bits, k) of the best Golomb-Rice code of a mask's zero runs, k in 0..8: a size *measurement* to compare
    with the bitmask's one bit per position (no ONNX decoder for it exists yet)."""
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    ones = np.flatnonzero(flat)
    # zero-run before each set position, plus the trailing run (coded once more at the end)
    runs = np.diff(np.concatenate([[-1], ones, [flat.size]])) - 1
    best = None
    for k in range(9):
        bits = int(np.sum((runs >> k) + 1 + k))
        if best is None or bits < best[0]:
            best = (bits, k)
    return best
