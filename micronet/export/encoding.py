"""How integer weight codes are stored in an ONNX file, and how to read them back.

Four encodings; with ``sparse_weights`` the builder writes each tensor in whichever is smallest in the file
(initializers and nodes counted as serialised), otherwise every tensor is dense:

* **dense**: the codes as one initializer of the narrowest integer type that holds them (INT4, UINT4, INT8,
  UINT8, INT16, UINT16; INT4/UINT4 are packed two per byte), dequantized by ``DequantizeLinear(codes, 1.0)``.
* **packed**: the codes as fixed-width unsigned fields of their real bit width (``code - lo`` in ``bits``
  bits, e.g. 6 for a 6-bit classifier that INT8 would store in 8), decoded by ``micronet.UnpackBits``.
* **bitmask**: the non-zero mask packed eight positions per byte, plus the non-zero codes in order.
* **rice**: the non-zero positions as Golomb-Rice-coded gaps (the zero run before each non-zero) plus the
  non-zero codes in order. A gap ``g`` is ``q = g >> k`` in unary (``q`` zeros then a one) and
  ``r = g mod 2^k`` in ``k`` bits; one stream holds all ``n * k`` remainder bits first, then the unary
  quotients, so the decoder finds every quotient at once: the ones of the unary part are the terminators,
  ``NonZero`` gives their indices and neighbouring differences give the quotients. Positions are the
  running sum of ``g + 1``, and ``ScatterElements`` puts the codes there. At 25% density with random
  positions this takes about 0.81 bit per weight against the bitmask's 1 (the entropy is 0.79).

The non-zero codes of the two sparse encodings are either typed (narrowest ONNX type, as dense) or packed
(an ``UnpackBits`` node, which may also drop the zero code from the alphabet: a non-zero code never is
zero, so ``[-4, 4]`` fits 3 bits). Bit streams are little bit order (``np.packbits(bitorder="little")``).

Each encoding other than dense is decoded by ONE model-local ONNX function shared by every tensor that
uses it (:data:`FUNCTIONS`); what differs per tensor (shape, ``k``, field width) is a node attribute that
the function reads by reference, so the file holds no per-tensor shape initializers. The functions use
only standard ops, depend on initializers alone, and onnxruntime constant-folds them when the session is
created (no per-inference cost). ``BitmaskDecode`` and ``RiceDecode`` end in ``DequantizeLinear(int8
codes, 1.0)`` like the dense form: onnxruntime does not fold ``DequantizeLinear``, so the weights stay
behind it after folding, which keeps onnxruntime from fusing the per-channel rescale into the convolution
(such fusions break bit-exactness; spec onnx-export.md §3, §5). Sparse and packed forms therefore hold
codes in [-128, 127]; wider codes stay dense.

Names follow one convention, so a verifier can find a module's weight from its name alone: the float
weight is the value ``{module}.weight``; its initializers are ``{module}.weight.codes`` (dense, packed),
``.mask`` (bitmask), ``.gaps`` (rice) and ``.nz`` (the non-zero codes of either sparse encoding).
:func:`read_codes` decodes all of them in numpy, independently of the ONNX functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import AttributeProto, TensorProto
from onnx import helper as oh
from onnx import numpy_helper as onh

from micronet.errors import MicronetError

DECODER_DOMAIN = "micronet"
ENCODINGS = ("dense", "packed", "bitmask", "rice")
SPARSE_ENCODINGS = ("bitmask", "rice")
MAX_RICE_K = 30  # gaps are below numel; the decoders' power-of-two table goes this far (and fits int32)
DEFAULT_OPSET = 21

# (ONNX type, numpy dtype, min, max, bits per element), narrowest first.
_CODE_TYPES: tuple[tuple[int, type, int, int, int], ...] = (
    (TensorProto.INT4, ml_dtypes.int4, -8, 7, 4),
    (TensorProto.UINT4, ml_dtypes.uint4, 0, 15, 4),
    (TensorProto.INT8, np.int8, -128, 127, 8),
    (TensorProto.UINT8, np.uint8, 0, 255, 8),
    (TensorProto.INT16, np.int16, -(2**15), 2**15 - 1, 16),
    (TensorProto.UINT16, np.uint16, 0, 2**16 - 1, 16),
)
_INT8 = (-128, 127)  # what the decoders output (the codes behind DequantizeLinear)


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


# ---- bit-level helpers (numpy side) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Fields:
    """How packed codes map to unsigned fields: ``code = lo + u``, then ``+1`` for codes >= 0 if ``skip_zero``."""

    bits: int
    lo: int
    skip_zero: bool

    @property
    def storage(self) -> str:
        return f"{self.bits}-bit" + (" (no zero)" if self.skip_zero else "")


def field_layout(codes: np.ndarray, nonzero: bool) -> Fields:
    """Narrowest fields for ``codes``; ``nonzero``: the codes are all non-zero, so zero may leave the alphabet."""
    lo, hi = (int(codes.min()), int(codes.max())) if codes.size else (0, 0)
    skip_zero = nonzero and lo < 0 < hi  # zero lies inside the range but never occurs
    count = hi - lo + 1 - skip_zero
    return Fields(int(count - 1).bit_length(), lo, skip_zero)


def to_fields(codes: np.ndarray, f: Fields) -> np.ndarray:
    """Unsigned field values of ``codes`` under ``f``."""
    u = codes.astype(np.int64) - f.lo
    return u - (codes > 0) if f.skip_zero else u


def from_fields(u: np.ndarray, f: Fields) -> np.ndarray:
    """Inverse of :func:`to_fields`."""
    v = u.astype(np.int64) + f.lo
    return v + (v >= 0) if f.skip_zero else v


def pack_fields(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``values`` as ``bits``-wide little-endian fields, concatenated, as a flat bit array (0/1 uint8)."""
    values = np.asarray(values, dtype=np.int64).reshape(-1, 1)
    return ((values >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8).reshape(-1)


def unpack_fields(bits: np.ndarray, count: int, width: int) -> np.ndarray:
    """``count`` unsigned ``width``-bit fields from the start of a flat bit array (which must hold them)."""
    if count * width > bits.size:
        raise ValueError(f"{count} fields of {width} bits need {count * width} bits, the array has {bits.size}")
    if width == 0:
        return np.zeros(count, dtype=np.int64)
    fields = bits[: count * width].astype(np.int64).reshape(count, width)
    return fields @ (np.int64(1) << np.arange(width, dtype=np.int64))


def rice_bits(gaps: np.ndarray, k: int) -> int:
    """Bits of the Rice code of ``gaps`` with parameter ``k`` (unary quotient with terminator + k bits)."""
    return int(np.sum(gaps >> k)) + gaps.size * (k + 1)


def best_rice_k(gaps: np.ndarray) -> int:
    """The Rice parameter that codes ``gaps`` in the fewest bits."""
    top = min(MAX_RICE_K, int(gaps.max()).bit_length()) if gaps.size else 0
    return min(range(top + 1), key=lambda k: (rice_bits(gaps, k), k))


def gaps_of(mask: np.ndarray) -> np.ndarray:
    """Zero run before each set position of a flat boolean mask."""
    return np.diff(np.concatenate([[-1], np.flatnonzero(mask)])) - 1


def rice_stream(gaps: np.ndarray, k: int) -> np.ndarray:
    """The Rice stream as a flat bit array: all remainders (k bits each) first, then the unary quotients."""
    q = gaps >> k
    unary = np.zeros(int(q.sum()) + gaps.size, dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 1  # q zeros, then the terminating one
    return np.concatenate([pack_fields(gaps & ((1 << k) - 1), k), unary])


def rice_decode(stream_bits: np.ndarray, n: int, k: int) -> np.ndarray:
    """Positions of the ``n`` non-zeros coded by :func:`rice_stream`; fewer if the stream holds fewer than ``n``
    codes (a damaged stream: the caller compares the count)."""
    if n * k > stream_bits.size:  # not even the remainders fit
        return np.zeros(0, dtype=np.int64)
    r = unpack_fields(stream_bits, n, k)
    terminators = np.flatnonzero(stream_bits[n * k:])[:n]
    q = np.diff(np.concatenate([[-1], terminators])) - 1
    return np.cumsum((q << k) + r[: q.size] + 1) - 1


def rice_mask_bits(mask: np.ndarray) -> tuple[int, int]:
    """(bits, k) of the best Golomb-Rice code of a mask's zero runs before each set position, as written by the
    ``rice`` encoding (the trailing run is implied by the shape)."""
    gaps = gaps_of(np.asarray(mask, dtype=bool).reshape(-1))
    k = best_rice_k(gaps)
    return rice_bits(gaps, k), k


def code_entropy_bits(codes: np.ndarray) -> float:
    """Order-0 entropy of ``codes`` in bits (all of them): the floor for any per-symbol code of these values."""
    _, counts = np.unique(np.asarray(codes).reshape(-1), return_counts=True)
    p = counts / counts.sum() if counts.size else counts
    return float(-(counts * np.log2(p)).sum()) if counts.size else 0.0


def _bytes(bits: np.ndarray) -> np.ndarray:
    return np.packbits(bits, bitorder="little")


# ---- encoders ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One tensor's codes in one encoding: the initializers and nodes that rebuild the float weight."""

    encoding: str  # one of ENCODINGS
    storage: str  # how the codes themselves are stored ("INT4", "6-bit", ...)
    initializers: tuple[TensorProto, ...]
    nodes: tuple[onnx.NodeProto, ...]  # the last one outputs the float weight
    detail: str = ""  # e.g. "k=2"

    @property
    def payload_bytes(self) -> int:
        """Bytes of the initializers' data."""
        return sum(len(t.raw_data) or onh.to_array(t).nbytes for t in self.initializers)

    @property
    def file_bytes(self) -> int:
        """What this tensor adds to the file: its serialised initializers and nodes (field tags included)."""
        return sum(t.ByteSize() + 2 for t in self.initializers) + sum(n.ByteSize() + 2 for n in self.nodes)

    @property
    def functions(self) -> set[str]:
        return {n.op_type for n in self.nodes if n.domain == DECODER_DOMAIN}


def _call(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    return oh.make_node(op, inputs, [output], domain=DECODER_DOMAIN, **attrs)


def _dequantize(codes: str, output: str, one: str) -> onnx.NodeProto:
    return oh.make_node("DequantizeLinear", [codes, one], [output])


def _fits_int8(codes: np.ndarray) -> bool:
    """Codes a decoder can rebuild: int8 values, and a shape with at least one dimension and one element (the
    decoders reshape to the ``shape`` attribute, and a 0-d or empty weight gains nothing from them)."""
    return codes.ndim > 0 and codes.size > 0 and _INT8[0] <= int(codes.min()) and int(codes.max()) <= _INT8[1]


def encode_dense(prefix: str, codes: np.ndarray, one: str) -> Encoded:
    """Narrowest-type initializer behind ``DequantizeLinear``; ``one`` names a float 1.0 scalar in the graph."""
    ctype = code_type(codes)
    init = dense_initializer(f"{prefix}.codes", codes, ctype)
    return Encoded("dense", ctype.name, (init,), (_dequantize(init.name, prefix, one),))


def encode_packed(prefix: str, codes: np.ndarray, one: str) -> Encoded | None:
    """Fixed-width fields of the codes' real bit width (None if the codes do not fit int8, or are 0-d or empty)."""
    if not _fits_int8(codes):
        return None
    f = field_layout(codes, nonzero=False)
    init = onh.from_array(_bytes(pack_fields(to_fields(codes.reshape(-1), f), f.bits)), f"{prefix}.codes")
    unpack = _unpack_call(init.name, f"{prefix}.int8", codes.shape, f)
    return Encoded("packed", f.storage, (init,), (unpack, _dequantize(unpack.output[0], prefix, one)))


def _unpack_call(stream: str, output: str, shape: Sequence[int], f: Fields) -> onnx.NodeProto:
    return _call("UnpackBits", [stream], output, shape=list(shape), bits=f.bits, lo=f.lo, skip_zero=int(f.skip_zero))


def _nonzero_values(prefix: str, nz: np.ndarray, packed: bool) -> tuple[list[TensorProto], list[onnx.NodeProto],
                                                                          str, str]:
    """The non-zero codes as a typed initializer or as packed fields: (initializers, nodes, value name, storage)."""
    if not packed:
        ctype = code_type(nz)
        return [onh.from_array(nz.astype(ctype.np_dtype), f"{prefix}.nz")], [], f"{prefix}.nz", ctype.name
    f = field_layout(nz, nonzero=True)
    init = onh.from_array(_bytes(pack_fields(to_fields(nz, f), f.bits)), f"{prefix}.nz")
    unpack = _unpack_call(init.name, f"{prefix}.nzv", [nz.size], f)
    return [init], [unpack], unpack.output[0], f.storage


def encode_bitmask(prefix: str, codes: np.ndarray, packed_values: bool = False) -> Encoded | None:
    """Mask bits + non-zero codes, decoded by ``BitmaskDecode`` (None if the codes do not fit int8, or are 0-d or
    empty)."""
    if not _fits_int8(codes):
        return None
    flat = codes.reshape(-1)
    mask = flat != 0
    inits, nodes, values, storage = _nonzero_values(prefix, flat[mask], packed_values)
    inits.insert(0, onh.from_array(_bytes(mask), f"{prefix}.mask"))
    nodes.append(_call("BitmaskDecode", [inits[0].name, values], prefix, shape=list(codes.shape)))
    return Encoded("bitmask", storage, tuple(inits), tuple(nodes))


def encode_rice(prefix: str, codes: np.ndarray, packed_values: bool = False, k: int | None = None) -> Encoded | None:
    """Rice-coded gaps + non-zero codes, decoded by ``RiceDecode`` (best ``k`` unless given; None if the codes
    do not fit int8)."""
    if not _fits_int8(codes):
        return None
    flat = codes.reshape(-1)
    gaps = gaps_of(flat != 0)
    k = best_rice_k(gaps) if k is None else k
    inits, nodes, values, storage = _nonzero_values(prefix, flat[flat != 0], packed_values)
    inits.insert(0, onh.from_array(_bytes(rice_stream(gaps, k)), f"{prefix}.gaps"))
    nodes.append(_call("RiceDecode", [inits[0].name, values], prefix, shape=list(codes.shape), k=k))
    return Encoded("rice", storage, tuple(inits), tuple(nodes), detail=f"k={k}")


def candidates(prefix: str, codes: np.ndarray, one: str, allowed: Sequence[str]) -> list[Encoded]:
    """Every encoding of ``codes`` among ``allowed`` (dense always), each sparse one with typed and packed values.
    A 0-d or empty tensor is dense only: the decoders reshape to a non-empty shape attribute."""
    found = [encode_dense(prefix, codes, one)]
    if codes.ndim == 0 or codes.size == 0:
        return found
    if "packed" in allowed:
        found.append(encode_packed(prefix, codes, one))
    for name, encode in (("bitmask", encode_bitmask), ("rice", encode_rice)):
        if name in allowed:
            found += [encode(prefix, codes, False), encode(prefix, codes, True)]
    return [e for e in found if e is not None]


def smallest(prefix: str, codes: np.ndarray, one: str, allowed: Sequence[str]) -> Encoded:
    """The encoding among ``allowed`` that adds the fewest bytes to the file (ties: the earlier, simpler one)."""
    return min(candidates(prefix, codes, one, allowed), key=lambda e: e.file_bytes)


# ---- the shared ONNX decoder functions ------------------------------------------------------------------------


class _Fn:
    """Small helper to write a FunctionProto body: named constants, nodes, attribute-backed constants."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def op(self, op: str, inputs: list[str], **attrs) -> str:
        self._n += 1
        out = f"t{self._n}"
        self.nodes.append(oh.make_node(op, inputs, [out], **attrs))
        return out

    def const(self, value: np.ndarray) -> str:
        """A constant, written once per function (every node costs session-creation time once inlined)."""
        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self._consts:
            self._consts[key] = self.op("Constant", [], value=onh.from_array(value))
        return self._consts[key]

    def attr(self, name: str, kind: str) -> str:
        """A constant holding the calling node's attribute ``name`` (``kind``: "ints" -> 1-D int64, "int" -> scalar)."""
        self._n += 1
        out = f"t{self._n}"
        node = oh.make_node("Constant", [], [out])
        attr_type = AttributeProto.INTS if kind == "ints" else AttributeProto.INT
        node.attribute.append(oh.make_attribute_ref(f"value_{kind}", attr_type, ref_attr_name=name))
        self.nodes.append(node)
        return out

    def bits(self, stream: str) -> str:
        """uint8 bytes [B] -> bool bits [8B], little bit order (bool, not int64: 1 byte per bit, not 8, while
        onnxruntime folds a large tensor at session creation)."""
        col = self.op("Unsqueeze", [stream, self.const(np.array([1], np.int64))])
        hits = self.op("BitwiseAnd", [col, self.const(np.array([1 << i for i in range(8)], np.uint8))])
        flags = self.op("Greater", [hits, self.const(np.array(0, np.uint8))])
        return self.op("Reshape", [flags, self.const(np.array([-1], np.int64))])

    def fields(self, bits: str, count: str, width: str) -> tuple[str, str]:
        """``count`` unsigned ``width``-bit fields at the start of bool ``bits`` (``count``, ``width``: [1] int64)
        -> (int32 [count], [1] int64 bit offset where they end). int32 is exact: width <= MAX_RICE_K = 30."""
        end = self.op("Mul", [count, width])
        take = self.op("Cast", [self.op("Slice", [bits, self.const(np.array([0], np.int64)), end])],
                       to=TensorProto.INT32)
        # allowzero: a zero width (k = 0, or one code value) is a real zero, not "copy this dimension"
        table = self.op("Reshape", [take, self.op("Concat", [count, width], axis=0)], allowzero=1)
        powers = self.op("Slice", [self.const(np.int32(1) << np.arange(MAX_RICE_K + 1, dtype=np.int32)),
                                   self.const(np.array([0], np.int64)), width])
        # ReduceSum over a zero-width axis (k = 0) is 0, the right remainder
        values = self.op("ReduceSum", [self.op("Mul", [table, powers]), self.const(np.array([1], np.int64))],
                         keepdims=0)
        return values, end

    def dequantize(self, codes: str, out: str) -> None:
        """int8 ``codes`` -> float ``out`` by ``DequantizeLinear(codes, 1.0)``."""
        self.nodes.append(oh.make_node("DequantizeLinear", [codes, self.const(np.array(1.0, np.float32))], [out]))

    def function(self, name: str, inputs: list[str], outputs: list[str], attributes: list[str],
                 opset: int) -> onnx.FunctionProto:
        # the model's own opset: a function importing another version of the default domain fails the checker
        return oh.make_function(DECODER_DOMAIN, name, inputs, outputs, self.nodes, [oh.make_opsetid("", opset)],
                                attributes=attributes)


def _unpack_bits_function(opset: int = DEFAULT_OPSET) -> onnx.FunctionProto:
    """``UnpackBits(stream){shape, bits, lo, skip_zero} -> int8 codes``."""
    f = _Fn()
    shape = f.attr("shape", "ints")
    numel = f.op("ReduceProd", [shape], keepdims=1)
    width = f.op("Reshape", [f.attr("bits", "int"), f.const(np.array([1], np.int64))])
    u, _ = f.fields(f.bits("stream"), numel, width)
    v = f.op("Add", [u, f.op("Cast", [f.attr("lo", "int")], to=TensorProto.INT32)])
    # codes >= 0 move up by one when zero is not in the alphabet
    step = f.op("Mul", [f.op("Cast", [f.op("GreaterOrEqual", [v, f.const(np.int32(0))])], to=TensorProto.INT32),
                        f.op("Cast", [f.attr("skip_zero", "int")], to=TensorProto.INT32)])
    codes = f.op("Cast", [f.op("Add", [v, step])], to=TensorProto.INT8)
    f.nodes.append(oh.make_node("Reshape", [codes, shape], ["codes"]))
    return f.function("UnpackBits", ["stream"], ["codes"], ["shape", "bits", "lo", "skip_zero"], opset)


def _bitmask_function(opset: int = DEFAULT_OPSET) -> onnx.FunctionProto:
    """``BitmaskDecode(mask, nz){shape} -> float weight``."""
    f = _Fn()
    shape = f.attr("shape", "ints")
    numel = f.op("ReduceProd", [shape], keepdims=1)
    keep = f.op("Cast", [f.op("Slice", [f.bits("mask"), f.const(np.array([0], np.int64)), numel])],
                to=TensorProto.INT32)
    # a kept position's code is entry (running count of kept positions) of [0, nz...]; the others read entry 0
    index = f.op("Mul", [f.op("CumSum", [keep, f.const(np.int64(0))]), keep])
    table = f.op("Concat", [f.const(np.array([0], np.int8)), f.op("Cast", ["nz"], to=TensorProto.INT8)], axis=0)
    codes = f.op("Reshape", [f.op("Gather", [table, index], axis=0), shape])
    f.dequantize(codes, "weight")
    return f.function("BitmaskDecode", ["mask", "nz"], ["weight"], ["shape"], opset)


def _rice_function(opset: int = DEFAULT_OPSET) -> onnx.FunctionProto:
    """``RiceDecode(gaps, nz){shape, k} -> float weight``."""
    f = _Fn()
    shape = f.attr("shape", "ints")
    k = f.op("Reshape", [f.attr("k", "int"), f.const(np.array([1], np.int64))])
    values = f.op("Cast", ["nz"], to=TensorProto.INT8)
    n = f.op("Shape", [values])  # of the int8 copy: onnxruntime has no Shape kernel for INT4 (when not folding)
    bits = f.bits("gaps")
    remainders, end = f.fields(bits, n, k)
    unary = f.op("Cast", [f.op("Slice", [bits, end, f.const(np.array([np.iinfo(np.int64).max], np.int64))])],
                 to=TensorProto.INT32)
    # Quotient i counts the zeros after the i-th one of the unary part: a histogram of (ones before each zero).
    # Slot n collects the byte padding after the last one. (NonZero would find the ones more directly, but
    # onnxruntime does not constant-fold it, while it folds ScatterElements.)
    ones_before = f.op("CumSum", [unary, f.const(np.int64(0))], exclusive=1)
    is_zero = f.op("Sub", [f.const(np.int32(1)), unary])
    slots = f.op("ConstantOfShape", [f.op("Add", [n, f.const(np.array([1], np.int64))])],
                 value=onh.from_array(np.array([0], np.int32)))
    counts = f.op("ScatterElements", [slots, ones_before, is_zero], axis=0, reduction="add")
    # int64 from here on (n entries only): positions reach numel
    quotients = f.op("Cast", [f.op("Slice", [counts, f.const(np.array([0], np.int64)), n])], to=TensorProto.INT64)
    remainders = f.op("Cast", [remainders], to=TensorProto.INT64)
    scale = f.op("Gather", [f.const(np.int64(1) << np.arange(MAX_RICE_K + 1, dtype=np.int64)), k])
    steps = f.op("Add", [f.op("Add", [f.op("Mul", [quotients, scale]), remainders]), f.const(np.int64(1))])
    positions = f.op("Sub", [f.op("CumSum", [steps, f.const(np.int64(0))]), f.const(np.int64(1))])
    numel = f.op("ReduceProd", [shape], keepdims=1)
    zeros = f.op("ConstantOfShape", [numel], value=onh.from_array(np.array([0], np.int8)))
    flat = f.op("ScatterElements", [zeros, positions, values], axis=0)
    f.dequantize(f.op("Reshape", [flat, shape]), "weight")
    return f.function("RiceDecode", ["gaps", "nz"], ["weight"], ["shape", "k"], opset)


FUNCTIONS: dict[str, Callable[[int], onnx.FunctionProto]] = {
    "UnpackBits": _unpack_bits_function,
    "BitmaskDecode": _bitmask_function,
    "RiceDecode": _rice_function,
}


def functions(names: set[str], opset: int = DEFAULT_OPSET) -> list[onnx.FunctionProto]:
    """The decoder functions called ``names``, in a fixed order, for a model of default-domain ``opset``."""
    return [make(opset) for name, make in FUNCTIONS.items() if name in names]


# ---- reading back (numpy, independent of the ONNX functions) ------------------------------------------------------


MAX_READ_NUMEL = 1 << 28  # 256 Mi weights: far above any challenge model, and int8 at that size is 256 MiB


def read_codes(model: onnx.ModelProto, prefix: str, shape: Sequence[int] | None = None) -> np.ndarray | None:
    """Decode the codes of the float weight ``prefix`` (``{module}.weight``) from the file's initializers and the
    attributes of the nodes that decode them; None if the file holds no such weight.

    ``shape``: the shape the weight must have; a decoder node that claims another is refused before anything is
    allocated. A damaged file (a stream too short for its attributes, a missing or out-of-range attribute) raises
    a one-line MicronetError naming ``prefix``; every allocation is bounded by what the stream can hold (or by
    ``shape``, or :data:`MAX_READ_NUMEL`)."""
    try:
        return _read_codes(model, prefix, None if shape is None else tuple(int(d) for d in shape))
    except _Damaged as exc:  # one line even when a damaged name or op type holds a newline
        raise MicronetError(f"{prefix}: cannot decode the stored codes: {' '.join(str(exc).split())[:300]}") from None
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError) as exc:  # odd protobuf content
        first = " ".join(str(exc).split())[:200]
        raise MicronetError(f"{prefix}: cannot decode the stored codes ({type(exc).__name__}: {first})") from None


class _Damaged(Exception):
    """A decoder node or stream that cannot be what the encoders write."""


def _attr_int(attrs: dict, name: str, lo: int, hi: int) -> int:
    if name not in attrs or not isinstance(attrs[name], int):
        raise _Damaged(f"attribute '{name}' is missing or not an integer")
    if not lo <= attrs[name] <= hi:
        raise _Damaged(f"attribute '{name}' = {attrs[name]} is outside [{lo}, {hi}]")
    return attrs[name]


def _attr_shape(attrs: dict, limit: int) -> tuple[tuple[int, ...], int]:
    shape = attrs.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
        raise _Damaged("attribute 'shape' is missing or not a list of integers")
    if any(d < 0 for d in shape):
        raise _Damaged(f"attribute 'shape' {shape} has a negative dimension")
    numel = 1
    for d in shape:  # Python ints: no overflow while checking the bound
        numel *= d
    if numel > limit:
        raise _Damaged(f"attribute 'shape' {shape} claims {numel} elements, more than the {limit} allowed")
    return tuple(shape), numel


def _read_codes(model: onnx.ModelProto, prefix: str, want: tuple[int, ...] | None) -> np.ndarray | None:
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: node for node in model.graph.node for o in node.output}
    limit = MAX_READ_NUMEL if want is None else min(MAX_READ_NUMEL, int(np.prod(want, dtype=object)))

    def stream_bits(name: str) -> np.ndarray:
        if name not in inits:
            raise _Damaged(f"stream '{name}' is not an initializer")
        raw = onh.to_array(inits[name])
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise _Damaged(f"stream '{name}' is {raw.dtype} {list(raw.shape)}, not 1-D uint8")
        return np.unpackbits(raw, bitorder="little")

    def codes_of(name: str, limit: int, top: bool) -> np.ndarray | None:
        if name in inits:
            return onh.to_array(inits[name]).astype(np.int64)
        node = producers.get(name)
        if node is None:
            return None
        attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "DequantizeLinear":
            return codes_of(node.input[0], limit, top)
        if node.domain != DECODER_DOMAIN:
            return None
        if node.op_type not in FUNCTIONS:
            raise _Damaged(f"unknown decoder '{node.op_type}'")
        if len(node.input) != (1 if node.op_type == "UnpackBits" else 2):
            raise _Damaged(f"{node.op_type} has {len(node.input)} inputs")
        shape, numel = _attr_shape(attrs, limit)
        if top and want is not None and shape != want:
            raise _Damaged(f"attribute 'shape' {list(shape)} is not the weight's {list(want)}")
        bits = stream_bits(node.input[0])
        if node.op_type == "UnpackBits":
            width = _attr_int(attrs, "bits", 0, 8)
            f = Fields(width, _attr_int(attrs, "lo", -128, 127), bool(_attr_int(attrs, "skip_zero", 0, 1)))
            if numel * width > bits.size:
                raise _Damaged(f"{numel} fields of {width} bits need {numel * width} bits, the stream has {bits.size}")
            return from_fields(unpack_fields(bits, numel, width), f).reshape(shape)
        nz = codes_of(node.input[1], numel, False)  # never more non-zeros than positions
        if nz is None:
            raise _Damaged(f"the non-zero codes '{node.input[1]}' are missing")
        nz = nz.reshape(-1)
        if nz.size > numel:
            raise _Damaged(f"{nz.size} non-zero codes for {numel} positions")
        if node.op_type == "BitmaskDecode":
            if bits.size < numel:
                raise _Damaged(f"the mask has {bits.size} bits for {numel} positions")
            positions = np.flatnonzero(bits[:numel])
        else:
            k = _attr_int(attrs, "k", 0, MAX_RICE_K)
            positions = rice_decode(bits, nz.size, k)
            # the encoder pads with zeros: a one past the n-th terminator is damage (onnxruntime's decoder fails)
            if nz.size * k <= bits.size and np.count_nonzero(bits[nz.size * k:]) != nz.size:
                raise _Damaged(f"the unary part holds {np.count_nonzero(bits[nz.size * k:])} terminators for "
                               f"{nz.size} non-zero codes")
        if positions.size != nz.size or (nz.size and (positions[-1] >= numel or np.any(np.diff(positions) <= 0))):
            last = int(positions[-1]) if positions.size else -1
            raise _Damaged(f"the stream codes {positions.size} positions (last {last}) for {nz.size} non-zero codes "
                           f"in {numel} positions")
        if np.any(nz == 0):
            raise _Damaged("a non-zero code is zero")
        flat = np.zeros(numel, dtype=np.int64)
        flat[positions] = nz
        return flat.reshape(shape)

    if prefix not in producers and f"{prefix}.codes" not in inits:
        return None
    return codes_of(prefix, limit, True)
