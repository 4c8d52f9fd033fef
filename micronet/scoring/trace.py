"""Trace one forward pass at the aten level: every op with its module path and its tensors' metadata.

Nothing is costed here. A ``TorchDispatchMode`` sees every operator, including functional ones
(``torch.cat``, ``x + y``, ``F.relu``, pooling) and custom ops; a ``ModuleStack`` names the module that
ran it. Each tensor carries, in a map keyed by identity:

* ``bits``: width of the values it holds (model input: policy; parameters: float width, or the owning
  Int layer's ``weight_bits``; quantizer outputs: their code range; other results: the float width),
* ``static``: derived only from parameters, buffers and constants, hence folded at deploy time (free),
* ``stored``: derived from the model's parameters/buffers (a runtime constant such as ``torch.zeros``
  is static but not stored, so it is never charged as a parameter),
* ``origin``: the stored tensor a view was taken from, so shared or re-viewed tensors count once.

A stored tensor is charged once under its key, the same in every trace: a parameter's or buffer's path, a
plain attribute's, or for one derived at run time (``weight * mask``) its derivation (``CostContext.key_of``).

The model is neither modified nor left with hooks: ModuleStack removes its global hooks on exit and
the caller restores train/eval mode. Tensors carry their metadata as an attribute (removed from every tensor
afterwards), so activations are freed as the forward drops them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import sys
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, fx, nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

from micronet.compress.integer_modules import ScaledWeight, materialized
from micronet.compress.ops import range_bits
from micronet.errors import MicronetError

# Single-input views and copies: the result is the same stored tensor (parameters are counted once per origin).
SAME_ORIGIN = frozenset(
    {
        "aten::view",
        "aten::_unsafe_view",
        "aten::reshape",
        "aten::t",
        "aten::transpose",
        "aten::permute",
        "aten::expand",
        "aten::squeeze",
        "aten::unsqueeze",
        "aten::slice",
        "aten::select",
        "aten::clone",
        "aten::contiguous",
        "aten::_to_copy",
        "aten::alias",
        "aten::detach",
        "aten::lift_fresh",
        "aten::flatten",
        "aten::as_strided",
        "aten::as_strided_",
    }
)
# Ops that only move or re-view data: the result holds the same values (same width, same codes).
DATA_MOVEMENT = SAME_ORIGIN | {
    "aten::cat",
    "aten::stack",
    "aten::constant_pad_nd",
    "aten::repeat",
    "aten::split",
    "aten::split_with_sizes",
    "aten::chunk",
    "aten::unbind",
    "aten::narrow",
    "aten::index_select",
    "aten::copy_",
    "aten::pixel_shuffle",
    "aten::pixel_unshuffle",
    "aten::channel_shuffle",
    "aten::dropout",
    "aten::feature_dropout",
    "aten::index",
    "aten::gather",
    "aten::_unsafe_index",
    "aten::unfold",
    "aten::flip",
    "aten::roll",
    "aten::index_copy",
    "aten::index_put",
    "aten::scatter",
    "aten::nonzero",
    # Nearest-neighbour upsampling copies each input value to its output positions: no arithmetic.
    "aten::upsample_nearest1d",
    "aten::upsample_nearest2d",
    "aten::upsample_nearest3d",
    "aten::_upsample_nearest_exact1d",
    "aten::_upsample_nearest_exact2d",
    "aten::_upsample_nearest_exact3d",
}
# Ops whose result stays within the input's value set (so it keeps the input's width and code-ness).
VALUE_PRESERVING = frozenset(
    {
        "aten::relu",
        "aten::relu_",
        "aten::hardtanh",
        "aten::hardtanh_",
        "aten::max_pool2d_with_indices",
        "aten::max_pool2d",
        "aten::max_pool1d",
        "aten::adaptive_max_pool2d",
        "aten::amax",
        "aten::max",
        "aten::clamp",
        "aten::clamp_",
        "aten::clamp_min",
        "aten::clamp_max",
        "aten::neg",
    }
)
QUANTIZERS = frozenset({"micronet::fake_quant", "micronet::round_clamp"})
# torch.ao fake-quantize ops (QAT and PTQ simulation): positions of their quant_min / quant_max arguments,
# and of the scale / zero-point they store.
AO_FAKE_QUANT: dict[str, tuple[int, int, int, int]] = {
    "aten::fake_quantize_per_tensor_affine": (3, 4, 1, 2),
    "aten::fake_quantize_per_tensor_affine_cachemask": (3, 4, 1, 2),
    "aten::_fake_quantize_per_tensor_affine_cachemask_tensor_qparams": (4, 5, 1, 2),
    "aten::fake_quantize_per_channel_affine": (4, 5, 1, 2),
    "aten::fake_quantize_per_channel_affine_cachemask": (4, 5, 1, 2),
    "aten::_fake_quantize_learnable_per_tensor_affine": (3, 4, 1, 2),
    "aten::_fake_quantize_learnable_per_channel_affine": (4, 5, 1, 2),
    "aten::fused_moving_avg_obs_fake_quant": (8, 9, 5, 6),
    "aten::_fused_moving_avg_obs_fq_helper": (8, 9, 5, 6),
}
# Fused QAT fake-quantizers take a ``fake_quant_on`` flag tensor (position 2): off, they pass values through.
AO_FUSED_FAKE_QUANT = frozenset({"aten::fused_moving_avg_obs_fake_quant", "aten::_fused_moving_avg_obs_fq_helper"})


def ao_fake_quant_off(op: str, args: tuple) -> bool:
    """Whether a torch.ao fake-quantize op runs with fake-quantization disabled (``disable_fake_quant``)."""
    if op not in AO_FUSED_FAKE_QUANT or len(args) <= 2:
        return False
    flag = args[2]
    value = flag.held if isinstance(flag, TensorRef) else flag  # recorded args hold TensorRefs
    return isinstance(value, Tensor) and value.numel() > 0 and not bool(value.reshape(-1)[0])


# Ops whose result leaves tensor land (Python control flow reads it): always needed, never dead.
ESCAPES = frozenset({"aten::_local_scalar_dense", "aten::is_nonzero", "aten::item", "aten::equal", "aten::nonzero"})


def dtype_bits(dtype: torch.dtype, float_bits: int) -> int:
    """Width a value of ``dtype`` is charged at: its storage width; floats at most the policy's float width."""
    if dtype == torch.bool:
        return 1
    if dtype in (torch.quint8, torch.qint8, torch.uint8, torch.int8):
        return 8
    if dtype == torch.quint4x2:
        return 4
    if dtype == torch.quint2x4:
        return 2
    if dtype == torch.qint32:
        return 32
    if dtype.is_floating_point:
        return min(torch.finfo(dtype).bits, float_bits)
    return torch.iinfo(dtype).bits


def _quantized_dtype(dtype: torch.dtype) -> bool:
    return dtype in (torch.quint8, torch.qint8, torch.qint32, torch.quint4x2, torch.quint2x4)


@dataclass
class TensorInfo:
    """What the scorer knows about one tensor (see module docstring)."""

    uid: int
    bits: int
    static: bool
    stored: bool = False
    codes: bool = False  # holds integer codes of a quantizer or an Int layer
    signed: bool = True
    origin: int = -1  # uid of the stored tensor this is a view of
    zero_channels: frozenset[int] = frozenset()  # dim-1 channels known to be identically zero
    stored_as: StoredTensor | None = field(default=None, compare=False, repr=False)  # the origin's record
    # A static tensor's derivation: a stored tensor's name, or a hash of the op and its operands' derivations.
    derivation: str = field(default="", compare=False, repr=False)


@dataclass
class TensorRef:
    """A tensor as seen by a cost rule: shape plus metadata; ``held`` (the tensor) only for static tensors."""

    uid: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    info: TensorInfo
    held: Tensor | None = None  # the tensor itself (a folded ScaledWeight holds only its factors)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def static(self) -> bool:
        return self.info.static

    @property
    def bits(self) -> int:
        return self.info.bits


@dataclass
class StoredTensor:
    """A stored tensor (parameter, buffer or derived constant) that may be charged as parameters."""

    uid: int
    name: str
    held: Tensor  # the tensor itself (a folded ScaledWeight holds only its factors)
    bits: int
    codes: bool
    owner: nn.Module | None = None
    by_value: bool = False  # no name identifies it (derived at run time, or held by no attribute): key_of
    site: str = ""  # for one without a name: the module that made or read it
    derivation: str = ""  # for one without a name: TensorInfo.derivation

    @property
    def memory(self) -> tuple:
        """Where its values are (storage, offset, shape, strides): records of one tensor updated in place, or kept
        from one traced example to the next, hold the same memory (``CostContext.key_of`` takes them as one)."""
        t = self.held
        try:
            return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        except (RuntimeError, NotImplementedError):  # no plain storage (a sparse or nested tensor)
            return ("record", self.uid)


def _hash(text: str) -> str:
    """A short fixed-size hash of a derivation's text."""
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _digest(t: Tensor) -> str | None:
    """A hash of a tensor's values (the bytes of its dense, dequantised form), or None when they cannot be read."""
    try:
        t = t.detach()
        if t.is_quantized:
            t = t.dequantize()
        if t.layout != torch.strided:
            t = t.to_dense()
        data = t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class OpRecord:
    """One traced aten op: its name, the module that ran it, args with tensors replaced by TensorRefs."""

    index: int
    op: str  # schema name, e.g. "aten::convolution"
    module: str  # module path ("" = the root module)
    args: tuple
    kwargs: dict
    inputs: list[TensorRef]
    outputs: list[TensorRef]

    @property
    def dynamic(self) -> bool:
        return any(not t.static for t in self.inputs)

    # Storages this op writes in place, and the storages of the tensors it reads (dead-op analysis).
    writes: frozenset[int] = frozenset()
    reads: tuple[int, ...] = ()


@dataclass
class Trace:
    """The result of tracing one forward: op records plus the stored tensors they read."""

    records: list[OpRecord] = field(default_factory=list)
    stored: dict[int, StoredTensor] = field(default_factory=dict)
    batch: int = 1
    modules: dict[str, nn.Module] = field(default_factory=dict)
    output: Any = None
    output_uids: frozenset[int] = frozenset()  # the tensors the forward returned
    output_storages: frozenset[int] = frozenset()  # the memory they live in (in-place writes into it count)
    input_shape: tuple[int, ...] = ()
    input_dtype: torch.dtype = torch.float32
    input_bits: int = 32  # the width the input is charged at


def _tensors_in(args: tuple) -> list[Tensor]:
    """Tensors among aten arguments (top level and inside tensor lists)."""
    found = []
    for a in args:
        if isinstance(a, Tensor):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found.extend(b for b in a if isinstance(b, Tensor))
    return found


def _swap(a: Any, ref_of: dict[int, TensorRef]) -> Any:
    """An argument with its tensors replaced by their TensorRefs."""
    if isinstance(a, Tensor):
        return ref_of.get(id(a), a)
    if isinstance(a, (list, tuple)) and any(isinstance(b, Tensor) for b in a):
        return type(a)(ref_of.get(id(b), b) if isinstance(b, Tensor) else b for b in a)
    return a


class TensorMap:
    """Tensor -> TensorInfo for the duration of one trace, kept on the tensor itself.

    The info rides on the tensor as an attribute, so an activation is freed as soon as the model drops it
    (scoring peaks near a plain forward, not at the sum of every activation) and a dead tensor's id can
    never be confused with a new one. Every tag is removed on ``close()``, so the model is left as it was. A
    tensor the model made and still holds then (a cache, a state for the next call) is remembered in
    ``carried``, which the traces of one scoring share: the next trace takes it for the same tensor.
    """

    ATTR = "_micronet_scoring_info"

    def __init__(self, carried: dict[int, tuple[weakref.ref, TensorInfo]] | None = None) -> None:
        self._foreign: list[Tensor] = []
        self._made: list[weakref.ref] = []
        self.carried = carried if carried is not None else {}

    def get(self, t: Tensor) -> TensorInfo | None:
        return getattr(t, self.ATTR, None)

    def __setitem__(self, t: Tensor, info: TensorInfo) -> None:
        """Tag a tensor the trace made."""
        setattr(t, self.ATTR, info)
        self._made.append(weakref.ref(t))

    def __contains__(self, t: Tensor) -> bool:
        return hasattr(t, self.ATTR)

    def tag_foreign(self, t: Tensor, info: TensorInfo) -> None:
        """Tag a tensor the trace did not make."""
        self._foreign.append(t)
        setattr(t, self.ATTR, info)

    def carried_info(self, t: Tensor) -> TensorInfo | None:
        """The info an earlier trace of this scoring gave ``t``, when the model made ``t`` then and kept it."""
        entry = self.carried.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def close(self) -> None:
        """Remove every tag, remembering each tagged tensor that is still alive with its latest info (see
        ``carried``: a kept tensor an in-place op re-tagged in this trace is carried as it is now)."""
        alive = [r for r in self._made if r() is not None] + [weakref.ref(t) for t in self._foreign]
        for ref in alive:
            t = ref()
            if t is not None and hasattr(t, self.ATTR):
                self.carried[id(t)] = (ref, getattr(t, self.ATTR))
                delattr(t, self.ATTR)
        self._foreign, self._made = [], []


class ProtectedWrite(Exception):  # noqa: N818 (a signal to retry, not an error: no "Error" suffix)
    """An op of the traced forward was about to write into protected memory (see ``trace_model``).

    Deliberately not a RuntimeError: it must pass through the model's forward and the scorer's
    forward-error translation unchanged.
    """


class ModuleStack:
    """Which module is running: a stack of module paths kept by global forward hooks while active.

    The same attribution ``torch.utils.module_tracker.ModuleTracker`` gives, without its per-call pytree
    flattening and backward-hook arming (which cost more than the ops themselves at batch 1). The hooks
    are global and removed on exit, so the model itself is never modified.
    """

    def __init__(self, model: nn.Module) -> None:
        self._names = {id(m): name for name, m in model.named_modules()}
        self._stack: list[str] = []
        self._handles: list = []

    @property
    def current(self) -> str:
        """Path of the innermost running module of the model ("" for the root or outside it)."""
        return self._stack[-1] if self._stack else ""

    def _pre(self, module: nn.Module, args: Any) -> None:
        self._stack.append(self._names.get(id(module), self.current))

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._stack:
            self._stack.pop()

    def __enter__(self) -> ModuleStack:
        self._handles = [register_module_forward_pre_hook(self._pre), register_module_forward_hook(self._post)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._stack = [], []


class _OpRecorder(TorchDispatchMode):
    """Dispatch mode that records ops and propagates TensorInfo (the tracing core)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # By default torch wraps every dispatch mode's __torch_dispatch__ in torch._dynamo.disable, which imports
        # torch._dynamo (and sympy, triton, torch.distributed: ~150 MB and ~1 s) on the first op and adds a
        # wrapper call to every op. Nothing here runs under torch.compile, so there is nothing to disable.
        return False

    def __init__(
        self,
        modules: ModuleStack,
        trace: Trace,
        infos: TensorMap,
        float_bits: int,
        uids: itertools.count,
        protected: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__()
        self.modules, self.trace, self.infos = modules, trace, infos
        self.float_bits, self.uids, self.protected = float_bits, uids, protected
        self.attributes: dict[int, tuple[str, Tensor]] | None = None  # attribute_tensors(), built when needed
        self.literals: dict[tuple, int] = {}  # _literal: how many such tensors each line made so far

    def _refuse_protected_write(self, func: Any, written: frozenset, args: tuple, kwargs: dict) -> None:
        """Stop before an in-place op writes into protected memory (the caller's weights, shared by the copy) or
        into a folded ScaledWeight (values computed per read: the write would be lost)."""
        # A written argument is a tensor or a tensor list (the ``_foreach_*_`` ops).
        targets = _tensors_in(tuple(a for i, a in enumerate(args) if i in written))
        targets += _tensors_in(tuple(v for k, v in kwargs.items() if k in written))
        if any(_storage_of(t) in self.protected or type(t) is ScaledWeight for t in targets):
            raise ProtectedWrite(f"{func._schema.name} in {self._module_path() or '(root)'}")

    def _module_path(self) -> str:
        return self.modules.current

    def _info(self, t: Tensor) -> TensorInfo:
        info = self.infos.get(t)
        if info is not None:
            return info
        info = self.infos.carried_info(t)
        if info is not None:
            # Made by the model in an earlier traced forward and kept (a cache): the same tensor as then (uids are
            # unique across traces), charged under the same record. What is derived from it now is derived from
            # where the model keeps it, the same in every later example.
            attribute = self._attribute_name(t)
            if info.static and attribute is not None:
                info = dataclasses.replace(info, derivation=f"<kept {attribute}>")
            self.infos.tag_foreign(t, info)
            if info.stored_as is not None:
                self.trace.stored.setdefault(info.origin, info.stored_as)
            return info
        # A tensor the model holds outside its parameters/buffers (a plain attribute): a stored constant, named by
        # the attribute that holds it, else identified by its values (CostContext.key_of).
        attribute = self._attribute_name(t)
        if attribute is not None:
            return self._foreign_constant(t, attribute, attribute, by_value=False)
        name = f"{self._module_path() or '(root)'}.<constant {tuple(t.shape)}>"
        return self._foreign_constant(t, f"<constant {_digest(t)}>", name, by_value=True)

    def _attribute_name(self, t: Tensor) -> str | None:
        """``path.attribute`` of the module attribute that holds ``t`` (:func:`attribute_tensors`), if one does."""
        if self.attributes is None:
            self.attributes = attribute_tensors(self.trace.modules)
        named = self.attributes.get(id(t))
        return named[0] if named is not None and named[1] is t else None

    def _foreign_constant(self, t: Tensor, derivation: str, name: str, by_value: bool) -> TensorInfo:
        """Tag a static tensor the trace did not make and record it as stored under ``name``."""
        uid = next(self.uids)
        info = TensorInfo(uid, dtype_bits(t.dtype, self.float_bits), static=True, stored=True,
                          codes=_quantized_dtype(t.dtype), origin=uid, derivation=derivation)
        self.infos.tag_foreign(t, info)
        self._record(info, name, t, by_value)
        return info

    def _record(self, info: TensorInfo, name: str, held: Tensor, by_value: bool = True) -> None:
        """Record the stored tensor ``info`` describes (its own origin), made or read in the running module."""
        info.stored_as = self.trace.stored[info.uid] = StoredTensor(
            info.uid, name, held.detach(), info.bits, info.codes, by_value=by_value, site=self._module_path(),
            derivation=info.derivation)

    def _written_through_view(self, op: str, base: Tensor, written: TensorInfo) -> None:
        """An in-place op wrote ``written`` into a view of ``base`` (``a[:, :4] = w``): ``base`` now holds those
        values too, so it is input-dependent if they are, and a stored tensor if they are stored."""
        before = self.infos.get(base)
        if before is None or not before.static:
            return
        static, stored = written.static, before.stored or written.stored
        if static and not (stored and not before.stored):
            return  # a static tensor stays what it was (a stored one is read where it lives, at accounting)
        uid = next(self.uids)
        info = TensorInfo(uid, max(before.bits, written.bits), static, stored, before.codes and written.codes,
                          origin=uid)
        if static:  # a runtime constant that now holds stored values: a tensor derived at run time
            info.derivation = _hash(f"{op}|{before.derivation}|{written.derivation}")
            self._record(info, f"{self._module_path() or '(root)'}.<{op.split('::')[-1]} {tuple(base.shape)}>", base)
        self.infos[base] = info

    def _literal(self, t: Tensor) -> None:
        """A tensor the forward builds from Python values (``torch.tensor(...)``): stored with the code, known by
        where it is made (the line of the model's code, its shape and dtype, its rank among those made there), not
        by its values, which may come from the input (a scale, chosen indices) and differ in every example."""
        site = (_caller_line(), tuple(t.shape), t.dtype)
        self.literals[site] = self.literals.get(site, 0) + 1  # the n-th made there (in a loop)
        name = f"{self._module_path() or '(root)'}.<tensor {tuple(t.shape)}>"
        self._foreign_constant(t, f"<literal {site} #{self.literals[site]}>", name, by_value=True)

    def _ref(self, t: Tensor) -> TensorRef:
        info = self._info(t)
        return TensorRef(info.uid, tuple(t.shape), t.dtype, info, t if info.static else None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written = _written_args(func)
        if written:
            self._refuse_protected_write(func, written, args, kwargs)
        # Aten arguments nest at most one level (tensor lists): flatten by hand, pytree is too slow here.
        in_tensors = _tensors_in(args) + (_tensors_in(tuple(kwargs.values())) if kwargs else [])
        if any(type(t) is ScaledWeight for t in in_tensors):
            # A folded weight of the scoring deploy form: its values exist for this op only (and the op never
            # reaches the subclass's own dispatch, whose first use imports torch.distributed.tensor).
            out = func(*(_materialized_arg(a) for a in args), **{k: _materialized_arg(v) for k, v in kwargs.items()})
        else:
            out = func(*args, **kwargs)
        op = func._schema.name
        if op in _LITERALS and in_tensors and self.infos.get(in_tensors[0]) is None:
            self._literal(in_tensors[0])
        in_refs = [self._ref(t) for t in in_tensors]
        if isinstance(out, Tensor):
            out_tensors = [out]
        elif isinstance(out, (tuple, list)):
            out_tensors = [o for o in out if isinstance(o, Tensor)]
        else:
            out_tensors = []
        out_infos = self._derive(op, args, kwargs, in_refs, out_tensors)
        out_refs = []
        for t, info in zip(out_tensors, out_infos):
            self.infos[t] = info
            out_refs.append(TensorRef(info.uid, tuple(t.shape), t.dtype, info, t if info.static else None))
            if written and t._base is not None and any(t is a for a in args):
                self._written_through_view(op, t._base, info)
        ref_of = {id(t): r for t, r in zip(in_tensors, in_refs)}
        rec_args = tuple(_swap(a, ref_of) for a in args)
        rec_kwargs = {k: _swap(v, ref_of) for k, v in kwargs.items()}
        index = len(self.trace.records)
        record = OpRecord(index, op, self._module_path(), rec_args, rec_kwargs, in_refs, out_refs)
        record.reads = tuple(_storage_of(t) for t in in_tensors)
        if written:
            record.writes = frozenset(
                _storage_of(a) for i, a in enumerate(args) if i in written and isinstance(a, Tensor)
            ) | frozenset(_storage_of(v) for k, v in kwargs.items() if k in written and isinstance(v, Tensor))
        self.trace.records.append(record)
        return out

    def _derive(self, op: str, args: tuple, kwargs: dict, ins: list[TensorRef],
                outs: list[Tensor]) -> list[TensorInfo]:
        """Metadata of an op's outputs from its inputs (the bit-width propagation rules)."""
        static = all(r.static for r in ins)
        stored = static and any(r.info.stored for r in ins)
        operands = "|".join([op, *map(self._operand, args), *(f"{k}={self._operand(v)}" for k, v in kwargs.items())]
                            ) if static else ""
        infos = []
        for k, t in enumerate(outs):
            uid = next(self.uids)
            if op in AO_FAKE_QUANT and k == 0 and ao_fake_quant_off(op, args):
                # Fake-quantization switched off: the input passes through unchanged (same width and codes).
                src = ins[0].info
                info = TensorInfo(uid, src.bits, static, stored, src.codes, src.signed, uid)
            elif op in AO_FAKE_QUANT and k == 0:
                qmin, qmax = args[AO_FAKE_QUANT[op][0]], args[AO_FAKE_QUANT[op][1]]
                info = TensorInfo(
                    uid, range_bits(int(qmin), int(qmax)), static, stored, codes=True, signed=int(qmin) < 0,
                    origin=uid,
                )
            elif op in QUANTIZERS:
                qmin, qmax = (args[2], args[3]) if op == "micronet::fake_quant" else (args[1], args[2])
                info = TensorInfo(
                    uid,
                    range_bits(int(qmin), int(qmax)),
                    static,
                    stored,
                    codes=True,
                    signed=int(qmin) < 0,
                    origin=uid,
                )
            elif not ins:
                # Factory op (zeros, empty, full, arange): a runtime constant, never a stored parameter.
                bits = dtype_bits(t.dtype, self.float_bits)
                zero = t.numel() > 0 and t.dim() >= 2 and not bool(t.any())
                info = TensorInfo(
                    uid,
                    bits,
                    True,
                    False,
                    origin=uid,
                    zero_channels=frozenset(range(t.shape[1])) if zero else frozenset(),
                )
            elif op in DATA_MOVEMENT or op in VALUE_PRESERVING:
                # The values moved set the width, not the integer indices or bool masks that pick them.
                data = [r for r in ins if r.dtype not in _INDEX_DTYPES] or ins
                bits = max(r.bits for r in data)
                codes = all(r.info.codes for r in data)
                signed = any(r.info.signed for r in data) if codes else True
                origin = ins[0].info.origin if (op in SAME_ORIGIN and len(ins) == 1 and k == 0) else uid
                zeros = frozenset()
                if op == "aten::cat":
                    zeros = self._cat_zero_channels(args)
                elif op == "aten::constant_pad_nd" and k == 0:
                    zeros = self._pad_zero_channels(args, ins[0])
                info = TensorInfo(uid, bits, static, stored, codes, signed, origin if static else uid, zeros)
                if static and origin != uid:
                    info.stored_as = ins[0].info.stored_as
            elif static:
                # Folded at deploy time (e.g. weight * mask): keeps the widest input's width; a tensor
                # dequantised by broadcasting a much smaller one over it (int8 codes x per-channel scale)
                # keeps the width it is stored at.
                biggest = max(ins, key=lambda r: r.numel)
                small = all(r is biggest or r.numel * 8 <= biggest.numel for r in ins)
                bits = biggest.bits if small and len(ins) > 1 else max(r.bits for r in ins)
                codes = all(r.info.codes for r in ins)
                info = TensorInfo(uid, bits, True, stored, codes, True, uid)
            elif t.is_quantized:
                # A torch.ao quantized tensor holds integer codes of its dtype's width.
                signed = t.dtype in (torch.qint8, torch.qint32)
                info = TensorInfo(uid, dtype_bits(t.dtype, self.float_bits), False, False, True, signed, uid)
            else:
                bits = dtype_bits(t.dtype, self.float_bits)
                info = TensorInfo(uid, bits, False, False, origin=uid)
            if static:
                info.derivation = _hash(f"{operands}|{k}")
            if static and stored and info.origin == uid:
                # Derived at run time (weight * mask): known by its derivation (CostContext.key_of).
                self._record(info, f"{self._module_path() or '(root)'}.<{op.split('::')[-1]} {tuple(t.shape)}>", t)
            infos.append(info)
        return infos

    def _operand(self, a: Any) -> str:
        """An op argument in a derivation: a tensor's derivation, a value; a float is left out (it may be a number
        the forward read from its input, different in every example)."""
        if isinstance(a, Tensor):
            info = self.infos.get(a)
            return info.derivation if info is not None else "?"
        if isinstance(a, (list, tuple)):
            return "[" + ",".join(map(self._operand, a)) + "]"
        if isinstance(a, (float, complex)):
            return "<number>"
        if a is None or isinstance(a, (int, str, torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return repr(a)
        return f"<{type(a).__name__}>"  # an object (a generator): its repr may hold an address

    def _pad_zero_channels(self, args: tuple, src: TensorRef) -> frozenset[int]:
        """Channels added by a zero ``F.pad`` along dim 1 (PyramidNet's shortcut), plus the source's own."""
        pad = list(args[1])
        value = args[2] if len(args) > 2 else 0
        ndim = len(src.shape)
        j = ndim - 2  # pad pairs run from the last dimension backwards; pair j pads dimension ndim-1-j
        if value != 0 or ndim < 2 or len(pad) < 2 * (j + 1):
            return frozenset(src.info.zero_channels)
        before, after = pad[2 * j], pad[2 * j + 1]
        channels = src.shape[1]
        zeros = set(range(max(before, 0))) | {before + c for c in src.info.zero_channels}
        zeros |= set(range(before + channels, before + channels + max(after, 0)))
        return frozenset(zeros)

    def _cat_zero_channels(self, args: tuple) -> frozenset[int]:
        """Channels of a dim-1 concatenation known to be zero (PyramidNet's zero-padded shortcut)."""
        tensors = args[0]
        dim = args[1] if len(args) > 1 else 0
        if not tensors or tensors[0].dim() < 2 or dim not in (1, 1 - tensors[0].dim()):
            return frozenset()
        zeros: set[int] = set()
        offset = 0
        for t in tensors:
            info = self.infos.get(t)
            if info is not None and info.zero_channels:
                zeros.update(offset + c for c in info.zero_channels)
            offset += t.shape[1]
        return frozenset(zeros)


def _storage_of(t: Tensor) -> int:
    """Identity of the memory a tensor lives in (views and in-place results share it)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # e.g. a sparse or otherwise storage-less tensor
        return id(t)


def _materialized_arg(a: Any) -> Any:
    """An aten argument with any ScaledWeight in it (top level or in a tensor list) replaced by its values."""
    if isinstance(a, (list, tuple)):
        return type(a)(materialized(b) for b in a)
    return materialized(a)


_WRITTEN: dict[Any, frozenset] = {}


def _caller_line() -> str:
    """``file:line`` of the innermost caller outside torch and the scorer (the model's code)."""
    frame = sys._getframe(1)
    here = os.path.dirname(__file__)
    torch_dir = os.path.dirname(torch.__file__)
    while frame is not None and frame.f_code.co_filename.startswith((here, torch_dir)):
        frame = frame.f_back
    return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"


def _written_args(func: Any) -> frozenset:
    """Positions and names of the arguments an aten op mutates (from its schema's alias annotations)."""
    found = _WRITTEN.get(func)
    if found is None:
        written: set = set()
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                written.update((i, arg.name))
        found = _WRITTEN[func] = frozenset(written)
    return found


def _register_model_tensors(
    model: nn.Module, infos: TensorMap, trace: Trace, float_bits: int, uids: itertools.count
) -> None:
    """Seed the weak map with every parameter and buffer: its width and owner, counted once if shared."""
    for path, module in model.named_modules():
        trace.modules[path] = module
        # The raw dicts, not named_parameters(): those build per-call dedup sets, slow on 1,000 modules.
        tensors = [*module._parameters.items(), *module._buffers.items()]
        for name, tensor in tensors:
            if tensor is None or tensor in infos:
                continue
            uid = next(uids)
            codes = name == "weight" and hasattr(module, "weight_bits")
            if codes:
                bits = int(module.weight_bits)
                signed = bool(getattr(module, "weight_signed", True))
            else:
                # Stored at its dtype's width: an fp16/bf16 or int8 tensor is charged 16 / 8 bits.
                bits = dtype_bits(tensor.dtype, float_bits)
                codes = _quantized_dtype(tensor.dtype)
                signed = True
            full = f"{path}.{name}" if path else name
            held = tensor if type(tensor) is ScaledWeight else tensor.detach()  # (its detach would dispatch)
            record = trace.stored[uid] = StoredTensor(uid, full, held, bits, codes, module)
            infos.tag_foreign(tensor, TensorInfo(uid, bits, True, True, codes, signed, uid, stored_as=record,
                                                 derivation=full))


def output_tensors(output: Any, depth: int = 8) -> list[Tensor]:
    """Every tensor in a model's output: pytree containers, dataclass fields and plain objects' attributes."""
    found: list[Tensor] = []
    seen: set[int] = set()

    def walk(obj: Any, left: int) -> None:
        if id(obj) in seen or left < 0:
            return
        seen.add(id(obj))
        for leaf in pytree.tree_leaves(obj):
            if isinstance(leaf, Tensor):
                found.append(leaf)
            elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
                walk([getattr(leaf, f.name) for f in dataclasses.fields(leaf)], left - 1)
            elif isinstance(leaf, (list, tuple, dict)):  # a container subclass pytree does not flatten
                walk(list(leaf.values()) if isinstance(leaf, dict) else list(leaf), left - 1)
            elif hasattr(leaf, "__dict__") and not isinstance(leaf, (type, nn.Module)):
                walk(list(vars(leaf).values()), left - 1)

    walk(output, depth)
    return found


# nn.Module's own bookkeeping attributes (parameter, buffer, submodule and hook dicts): not a model's tensors.
_MODULE_ATTRIBUTES = frozenset(vars(nn.Module()))


def attribute_tensors(modules: dict[str, nn.Module]) -> dict[int, tuple[str, Tensor]]:
    """Tensors the modules hold as plain attributes, directly or in a list, tuple or dict attribute (not their
    parameters or buffers): id -> (``path.attribute[index]``, the tensor); the first module that holds one names it."""
    found: dict[int, tuple[str, Tensor]] = {}
    for path, module in modules.items():
        for name, value in vars(module).items():
            if name in _MODULE_ATTRIBUTES:
                continue
            if isinstance(value, Tensor):
                items = [("", value)]
            elif isinstance(value, (list, tuple)):
                items = [(f"[{i}]", v) for i, v in enumerate(value)]
            elif isinstance(value, dict):
                items = [(f"[{k!r}]", v) for k, v in value.items()]
            else:
                continue
            for index, t in items:
                if isinstance(t, Tensor):
                    found.setdefault(id(t), (f"{path or '(root)'}.{name}{index}", t))
    return found


def refuse_fx_proxies(model: nn.Module) -> None:
    """Refuse a model whose attributes hold fx Proxies (a forward that assigned a tensor to ``self``, traced)."""
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            if isinstance(value, fx.Proxy):
                where = f"{path}.{name}" if path else name
                raise MicronetError(
                    f"the model's forward assigns a tensor to the attribute {where!r}; its deploy form "
                    "(an fx trace) cannot keep such state, so it cannot be scored; return the tensor "
                    "instead, or register it as a buffer and update it in place"
                )


def storages_of(model: nn.Module) -> frozenset[int]:
    """The memory every parameter and buffer of ``model`` lives in (what ``trace_model(protected=...)`` takes)."""
    # Address 0 is no memory (empty and meta tensors): protecting it would stop harmless writes to empty tensors.
    return frozenset(p for t in itertools.chain(model.parameters(), model.buffers()) if (p := _storage_of(t)))


# Dtypes of the indices and masks data-movement ops take (index_select, gather, masked ops): not values moved.
_INDEX_DTYPES = frozenset({torch.int64, torch.int32, torch.bool})

# Ops that take in a tensor the forward built from Python values (torch.tensor, torch.as_tensor).
_LITERALS = frozenset({"aten::lift_fresh", "aten::lift_fresh_copy"})

# Tensor uids, unique across every trace of the process: a tensor kept from one traced forward to the next (a
# cache) keeps its uid, which no other tensor can have.
_UIDS = itertools.count()


def trace_model(model: nn.Module, inputs: Tensor, *, input_bits: int, float_bits: int,
                protected: frozenset[int] = frozenset(),
                carried: dict[int, tuple[weakref.ref, TensorInfo]] | None = None) -> Trace:
    """Run ``model(inputs)`` once under the recorder; the model must already be in eval mode.

    ``carried`` (one dict for the traces of one scoring) remembers the tensors a trace made that the model kept
    (:class:`TensorMap`).

    An op about to write in place into ``protected`` memory (see :func:`storages_of`), or into a folded
    ``ScaledWeight``, raises :class:`ProtectedWrite` before it runs, so that memory is never changed.
    A ``ScaledWeight`` (``deploy_form(share=True)``'s folded weights) is recorded as the parameter it is, and its
    values are computed for each op that reads it, never kept (cost rules read only its nonzero mask).
    """
    refuse_fx_proxies(model)
    trace = Trace(batch=int(inputs.shape[0]), input_shape=tuple(inputs.shape), input_dtype=inputs.dtype)
    infos = TensorMap(carried)
    uids = _UIDS
    try:
        _register_model_tensors(model, infos, trace, float_bits, uids)
        uid = next(uids)
        bits = trace.input_bits = min(input_bits, dtype_bits(inputs.dtype, 64))
        infos.tag_foreign(inputs, TensorInfo(uid, bits, static=False, codes=bits < 16, signed=False, origin=uid))
        modules = ModuleStack(model)
        with torch.no_grad(), modules, _OpRecorder(modules, trace, infos, float_bits, uids, protected):
            trace.output = model(inputs)
        flat = output_tensors(trace.output)
        trace.output_uids = frozenset(info.uid for t in flat if (info := infos.get(t)) is not None)
        if not trace.output_uids:
            # Dead-work analysis starts from the outputs: with none to follow, every op would be called dead
            # and the model would score 0. Refuse rather than return that number.
            raise MicronetError(
                f"the model's output ({type(trace.output).__name__}) holds no tensor its forward computed, so "
                "the scorer cannot tell which work reaches it; return tensors (a tensor, or a tuple, list, "
                "dict, namedtuple or dataclass of tensors), not Python numbers or numpy arrays"
            )
        trace.output_storages = frozenset(_storage_of(t) for t in flat)
    finally:
        infos.close()
    return trace
