"""``deploy_form``: the integer deploy form that the scorer counts and the exporter writes.

Two passes over a copy of the model (the caller's model is never touched; with ``share=True``, the scorer's
choice, the copy shares its weights' memory read-only, see :func:`detached_copy`):

1. **Local rewrites** (module tree): a quantized conv/linear becomes
   ``ChannelAffine(1/s_a) -> RoundClamp -> IntConv2d(codes) -> ChannelAffine(s_a·s_w, bias)``;
   a float conv keeps its (masked) weights, with the input step folded into them when only its input is
   quantized; BatchNorm (eval statistics) becomes a ``ChannelAffine``; modules that know their own deploy
   form (``module.deploy_module()``, e.g. eval-mode ShakeDrop) are replaced by it; Dropout disappears.
2. **Peephole merging** on a ``torch.fx`` graph of the largest sub-modules that trace (models with
   data-dependent control flow, such as SkipNet, are converted block by block):
   affine∘affine → affine; float conv∘affine → conv with folded weights/bias (BN folding: only when the
   conv's output has no other consumer); affine∘relu∘(positive, bias-free affine) → affine'∘relu;
   relu∘RoundClamp(qmin ≥ 0) → RoundClamp (the clamp at 0 is the ReLU); identity affines vanish.

Folding is eager by default (a folded layer owns a new weight ``w * s``). With ``share=True`` it is lazy: the
folded weight is a :class:`~micronet.compress.integer_modules.ScaledWeight` over the caller's ``w`` and the scales,
whose values (the eager ones, bit for bit) are computed only while an op reads them (the scorer's trace
materialises it per op and per cost-rule read), so a scored model's folded weights are never all in memory at once.

On a DenseNet-BC this yields exactly the 2019 winner's merged network (spec training.md §2.3).
Logits equal the training form's up to fp32 rounding; a value that lands within an ulp of a rounding
tie can flip one activation code (spec onnx-export.md §5), which is inherent to re-associating the
scales.
"""

from __future__ import annotations

import copy
import copyreg
import itertools
import operator
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from micronet.compress import state
from micronet.compress.integer_modules import (
    ChannelAffine,
    FoldedAffine,
    IntConv2d,
    IntLinear,
    RoundClamp,
    ScaledWeight,
    materialized,
)
from micronet.compress.parametrizations import WeightMask
from micronet.compress.pixel_input import Float64Reduce, Normalization, PixelInputConv, pixel_input_form
from micronet.errors import MicronetError

_LEAVES = (ChannelAffine, RoundClamp, IntConv2d, IntLinear, PixelInputConv, Float64Reduce)
INPUTS = ("float", "pixels")


def deploy_form(model: nn.Module, *, input: str = "float", normalization: Normalization | None = None,
                layout: str = "nchw", share: bool = False, example: Tensor | None = None) -> nn.Module:
    """The integer deploy form of any model, float or compressed: a converted eval-mode copy.

    This is the one training form -> deploy form conversion: the scorer counts its result and the exporter
    writes it. A model already in deploy form (integer modules, no training-form state) is copied as it is.
    ``input="pixels"`` gives the pixel-input form (uint8 images in ``layout``, ``normalization`` folded into an
    exact first layer; :mod:`micronet.compress.pixel_input`).
    The result owns every tensor. ``share=True`` (the scorer's choice: weights are often larger than every
    activation together) lets tensors the conversion leaves as they are share the caller's memory, and folds BN
    lazily (``ScaledWeight``, see the module docstring): the result is for running as it is (scoring). Its
    tensors are read-only, a forward that writes its own weights would write the caller's, and a dtype or device
    change must be made on the model before the conversion (a folded weight's factors keep theirs). Pixel input
    always copies: building it runs a forward.
    ``example``: a tensor shaped like ``model``'s input (only its shape and dtype are read: a meta tensor will do).
    With it the merge knows each tensor's rank, so a BatchNorm1d on a Linear's 2-D output (axis 1 is then the
    feature axis) folds into the Linear; without it such an affine is kept (on a 3-D input it is not the
    Linear's axis). The result then expects inputs of ``example``'s rank. Models converted block by block
    (untraceable ones, e.g. SkipNet) merge without ranks.
    """
    if input not in INPUTS:
        raise MicronetError(f"unknown model input {input!r}; use one of {', '.join(INPUTS)}")
    if input == "pixels":
        if normalization is None:
            raise MicronetError("pixel input needs the model's normalisation, and it is not known; "
                                "pass --normalization NAME (e.g. cifar100)")
        # (its shape probe runs a forward)
        return pixel_input_form(deploy_form(model, example=example), normalization, layout)
    if _is_deploy_form(model):
        return detached_copy(model, share=share).eval()
    spec = getattr(model, "micronet_spec", None)
    state.check_quantizable(model)  # before any work: a layer with no integer form is named, not a forward error
    try:
        work = detached_copy(model, share=share).eval()
        with torch.no_grad():
            work = _rewrite_modules(work)
            work = _merge(work, lazy=share, example=example)
    except MicronetError:
        raise
    except Exception as exc:  # a user's module we cannot rewrite: say so instead of failing later
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise MicronetError(f"cannot convert the model to its integer deploy form: {first}") from None
    if spec is not None:
        work.micronet_spec = spec
    return work.eval()


def _is_deploy_form(model: nn.Module) -> bool:
    """True for a model that already holds integer modules and no training-form compression state."""
    return any(isinstance(m, _LEAVES) for m in model.modules()) and not state.has_training_form(model)


# Modules whose buffers nothing ever writes (the deploy form's own layers, pruning masks): a copy may share them.
_READ_ONLY_BUFFERS = (IntConv2d, IntLinear, ChannelAffine, PixelInputConv, WeightMask)
# torch.ao quantizers update their own state as they run, parameters included (a learnable fake-quantizer
# rewrites its scale in forward): their tensors are always copied.
_SELF_UPDATING = (torch.ao.quantization.FakeQuantizeBase, torch.ao.quantization.ObserverBase)


def detached_copy(model: nn.Module, *, share: bool = True) -> nn.Module:
    """A copy of ``model`` (``copy.deepcopy``, also of modules holding autograd-tracked tensors, e.g. last
    gate outputs) whose parameters share the caller's storage.

    Weights are the bulk of a model and neither the conversion nor an eval forward writes them, so the copy
    holds new ``Parameter`` objects over the same memory (read-only by contract: the deploy form replaces
    tensors, never writes them), as it does for the buffers of :data:`_READ_ONLY_BUFFERS`; other buffers
    (running statistics, gate counters, quantizer flags), and everything of a torch.ao quantizer, are
    copied. ``share=False`` copies every tensor.
    """
    memo: dict[int, object] = {}
    # Buffers that share memory with another tensor must stay views of one copy: deepcopy keeps that.
    single = Counter(_storage(t) for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values())
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
            elif isinstance(value, list | tuple) and any(isinstance(t, Tensor) and t.grad_fn is not None
                                                         for t in value):
                memo[id(value)] = type(value)(t.detach().clone() if isinstance(t, Tensor) else t for t in value)
        for p in module._parameters.values():
            if type(p) is ScaledWeight:
                # A scoring deploy form's lazily folded weight: shared lazily, or owned as the eager fold's weight.
                memo[id(p)] = (ScaledWeight(p.base, p.scales) if share
                               else nn.Parameter(p.materialize(), requires_grad=p.requires_grad))
        if share and not isinstance(module, _SELF_UPDATING):
            for p in module._parameters.values():
                if type(p) is nn.Parameter and id(p) not in memo:  # a Parameter subclass may carry more: deep copy
                    memo[id(p)] = shared = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
                    shared.__dict__.update(copy.deepcopy(p.__dict__, memo))  # attributes set on it, as deepcopy
            if isinstance(module, _READ_ONLY_BUFFERS):
                for b in module._buffers.values():
                    if b is not None and id(b) not in memo:
                        memo[id(b)] = b.detach()
        for b in module._buffers.values():
            # A plain buffer alone in its memory: clone it directly (Tensor.__deepcopy__ costs ~0.2 ms apiece).
            if (type(b) is Tensor and not b.requires_grad and not b.__dict__ and id(b) not in memo
                    and single[_storage(b)] == 1):
                memo[id(b)] = b.clone()
    return _copy_module(model, memo)


def _storage(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a storage-less tensor (sparse, functional)
        return id(t)


_ATOMIC = (type(None), bool, int, float, str)


def _plain_module_class(cls: type) -> bool:
    """Whether ``copy.deepcopy`` copies instances of ``cls`` the generic way: ``__dict__`` copied, then handed to
    ``__setstate__`` (no custom copy or pickle hooks)."""
    return (getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and cls.__getstate__ is nn.Module.__getstate__
            and cls not in copyreg.dispatch_table and not getattr(cls, "__slots__", ()))


def _copy_module(module: nn.Module, memo: dict[int, object]) -> nn.Module:
    """``copy.deepcopy(module, memo)``, done module by module as deepcopy does it for a plain module.

    Same result, several times faster: deepcopy's generic path rebuilds each of a module's dozen (mostly empty)
    hook tables through ``__reduce_ex__``; on a 1,000-module network that was most of the copy's time.
    Modules with their own copy or pickle hooks (parametrized layers, GraphModules) go through deepcopy.
    """
    found = memo.get(id(module))
    if found is not None:
        return found
    cls = type(module)
    if not _plain_module_class(cls):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state: dict[str, object] = {}
    for key, value in module.__dict__.items():
        kind = type(value)
        if kind in _ATOMIC:
            state[key] = value
        elif key == "_modules":
            state[key] = kind((name, None if child is None else _copy_module(child, memo))
                              for name, child in value.items())
        elif key in ("_parameters", "_buffers"):
            state[key] = kind((name, None if t is None else memo[id(t)] if id(t) in memo else copy.deepcopy(t, memo))
                              for name, t in value.items())
        elif kind in (dict, OrderedDict, set) and not value:
            state[key] = kind()
        else:
            state[key] = copy.deepcopy(value, memo)
    new.__setstate__(state)
    return new


# ----------------------------------------------------------------------------------------------- pass 1


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm, name: str) -> ChannelAffine:
    inv = torch.rsqrt(bn.running_var + bn.eps)
    scale = inv if bn.weight is None else bn.weight.detach() * inv
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    # Charged unfolded, a BatchNorm is the affine it computes: a scale and a shift per channel.
    origin = FoldedAffine(name, "bn", scales=True, shifts=True, params=2 * bn.num_features)
    return ChannelAffine(scale, shift, origin=(origin,))


def _deploy_layer(layer: nn.Conv2d | nn.Linear) -> nn.Module:
    """Integer (or float, folded) replacement of one compressed conv/linear."""
    wq, aq, mask = state.weight_quantizer(layer), state.input_quantizer(layer), state.weight_mask(layer)
    w = layer.weight.detach()
    block = mask.block if mask is not None else None
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    in_step = torch.ones((), dtype=w.dtype, device=w.device)
    if aq is not None:
        in_step = aq.scale.detach().to(w.dtype).reshape(())
        parts["in_scale"] = ChannelAffine(1.0 / in_step.reshape(1), quant_step=True)
        parts["quant"] = RoundClamp(*aq.qrange)
    bias = layer.bias.detach() if layer.bias is not None else None
    if wq is not None:
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise MicronetError(f"quantized conv with padding_mode={layer.padding_mode!r} has no integer form "
                                "(only zero padding keeps integer codes exact)")
        qmin, qmax = wq.qrange
        w_step = wq.scale.detach().to(w.dtype)
        codes = torch.clamp(torch.round(w / w_step), qmin, qmax)
        kwargs = {"weight_bits": wq.bits, "weight_signed": True, "block": block}
        if isinstance(layer, nn.Conv2d):
            core: nn.Module = IntConv2d(codes, stride=layer.stride, padding=layer.padding,
                                        dilation=layer.dilation, groups=layer.groups, **kwargs)
        else:
            core = IntLinear(codes, **kwargs)
        parts["conv" if isinstance(layer, nn.Conv2d) else "linear"] = core
        out_scale = (in_step * w_step.reshape(-1)).expand(codes.shape[0]).clone()
        parts["out_scale"] = ChannelAffine(out_scale, bias, quant_step=True, axis=_channel_axis(layer))
    else:
        core = _plain_copy(layer, w * in_step, bias)
        core.block = block
        parts["conv" if isinstance(layer, nn.Conv2d) else "linear"] = core
    if len(parts) == 1:
        return next(iter(parts.values()))
    return nn.Sequential(parts)


def _channel_axis(layer: nn.Module) -> int:
    """Axis of a layer's output channels: 1 for a conv (NCHW), -1 for a Linear (features last at any rank)."""
    return -1 if isinstance(layer, nn.Linear | IntLinear) else 1


# The hyper-parameters a plain Conv2d / Linear keeps as attributes (whatever this torch version's constructor sets).
_CONV_FIELDS = tuple(k for k in vars(nn.Conv2d(1, 1, 1, device="meta")) if k not in vars(nn.Module()))
_LINEAR_FIELDS = tuple(k for k in vars(nn.Linear(1, 1, device="meta")) if k not in vars(nn.Module()))


def _plain_copy(layer: nn.Conv2d | nn.Linear, weight: Tensor, bias: Tensor | None) -> nn.Module:
    # A plain module with the layer's hyper-parameters, built without its constructor: that spends ~0.3 ms on
    # a random init we overwrite, a tenth of a second over a 300-layer network.
    cls, fields = (nn.Conv2d, _CONV_FIELDS) if isinstance(layer, nn.Conv2d) else (nn.Linear, _LINEAR_FIELDS)
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for key in fields:
        value = getattr(layer, key)
        new.__dict__[key] = list(value) if isinstance(value, list) else value
    # Callers pass freshly computed tensors or the caller's own (a bias): the deploy form only reads them.
    # A ScaledWeight is a parameter already (detaching it would dispatch on it).
    if not isinstance(weight, ScaledWeight):
        weight = nn.Parameter(weight.detach(), requires_grad=False)
    new.register_parameter("weight", weight)
    new.register_parameter("bias", nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None)
    return new


def _rewrite_modules(module: nn.Module, path: str = "") -> nn.Module:
    """Pass 1 on ``module`` (at ``path`` in the model) and its descendants; returns the (possibly replaced) module."""
    replaced = _rewrite_one(module, path)
    if replaced is not module:
        return replaced
    for name, child in list(module.named_children()):
        new = _rewrite_modules(child, f"{path}.{name}" if path else name)
        if new is not child:
            setattr(module, name, new)
    return module


def _rewrite_one(module: nn.Module, path: str) -> nn.Module:
    if callable(getattr(module, "deploy_module", None)):
        return module.deploy_module()
    if isinstance(module, nn.Conv2d | nn.Linear) and (
        state.weight_quantizer(module) or state.input_quantizer(module) or state.weight_mask(module)
    ):
        return _deploy_layer(module)
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d) and module.track_running_stats:
        return _bn_affine(module, path)
    if isinstance(module, nn.Dropout):
        return nn.Identity()
    return module


# ----------------------------------------------------------------------------------------------- pass 2


class _DeployTracer(fx.Tracer):
    """fx tracer that keeps the deploy-form modules as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _merge(module: nn.Module, top: bool = True, *, lazy: bool = False, example: Tensor | None = None) -> nn.Module:
    """Trace the largest sub-modules that trace and merge affines on their graphs.

    The top-level module is replaced by its merged ``GraphModule``. Below a module that does not trace,
    children keep their identity (the parent may call their methods or iterate them): their merged graph
    becomes their ``forward`` and every merge is written back into their own module tree (a folded conv
    replaces the conv, an affine merged away becomes ``Identity``), so methods the parent calls directly
    (SkipNet's ``block.residual``) run the same merged layers and no layer is held twice.
    ``lazy``: folded weights are :class:`ScaledWeight` (see :meth:`_Peephole.fold`). ``example`` (an input of the
    top-level module) gives the top graph's tensor ranks (:func:`_output_ranks`); graphs below have none.
    """
    if isinstance(module, _LEAVES) or not any(True for _ in module.children()):
        return module
    # A container below the top is iterated by its parent, never called: only its children matter.
    graph = None
    if top or not isinstance(module, _CONTAINERS):
        try:
            graph = _DeployTracer().trace(module)
        except Exception:  # data-dependent control flow: convert the children instead
            graph = None
    if graph is None:
        for name, child in list(module.named_children()):
            new = _merge(child, top=False, lazy=lazy)
            if new is not child:
                setattr(module, name, new)
        for segment in getattr(module, "deploy_segments", ()):
            _merge_segment(module, segment, lazy=lazy)
        return module
    gm = fx.GraphModule(module, graph, module.__class__.__name__)
    ranks = _output_ranks(gm, example) if top and example is not None and _axes_can_meet(gm) else {}
    changed = _Peephole(gm, lazy=lazy, ranks=ranks).run()
    if top:
        return gm
    for path in changed:
        try:
            module.get_submodule(path)
        except AttributeError:
            continue  # a module the merge added (a shared layer's merged copy): reachable via the graph
        new = gm.get_submodule(path) if _has_submodule(gm, path) else nn.Identity()
        module.set_submodule(path, new)
    module.deploy_graph = gm
    module.forward = gm.forward
    return module


def _merge_segment(module: nn.Module, names: tuple[str, ...], *, lazy: bool = False) -> None:
    """Merge children that an untraceable model declares as a segment (``deploy_segments``): they run in this
    order, each output consumed only by the next, so e.g. a stem conv still absorbs the BN after it."""
    seq = nn.Sequential(OrderedDict((str(i), module.get_submodule(name)) for i, name in enumerate(names)))
    gm = fx.GraphModule(seq, _DeployTracer().trace(seq), "DeploySegment")
    for path in _Peephole(gm, lazy=lazy).run():
        index, _, rest = path.partition(".")
        if not index.isdigit():
            continue  # a module the merge added: none in a plain chain
        new = gm.get_submodule(path) if _has_submodule(gm, path) else nn.Identity()
        module.set_submodule(".".join(filter(None, (names[int(index)], rest))), new)


def _has_submodule(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


_RELU_FUNCS = (F.relu, torch.relu, torch.relu_)


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _module(gm: fx.GraphModule, node, kind) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, kind):
            return m
    return None


def _called(pp: _Peephole, node, kind) -> nn.Module | None:
    """The module of kind ``kind`` that ``node`` calls, if it calls one (looked up in the graph's cache)."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        m = pp.modules.get(str(node.target))
        if isinstance(m, kind):
            return m
    return None


def _foldable_layer(pp: _Peephole, node) -> nn.Module | None:
    """The plain float ``nn.Conv2d``/``nn.Linear`` that ``node`` calls, if any. Subclasses run forwards of their
    own (a torch.ao QAT conv fake-quantizes its weight, timm's Conv2dSame pads first) that a folded plain copy
    would drop; a parametrized plain layer (``torch.nn.utils.parametrize``) computes its weight and folds."""
    m = _called(pp, node, (nn.Conv2d, nn.Linear))
    if m is None:
        return None
    cls = type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)
    return m if cls in (nn.Conv2d, nn.Linear) else None


def _from_front(axis: int, rank: int | None) -> int:
    """``axis`` counted from the front of a tensor of ``rank`` dims; as it is when the rank is unknown."""
    return axis + rank if rank is not None and axis < 0 else axis


def _same_axis(first: ChannelAffine, second: ChannelAffine, rank: int | None = None) -> bool:
    """Whether two affines scale the same channels of a tensor of ``rank`` dims (a scalar one fits any axis), so
    they can be combined. Unknown rank: only the same axis (1 and -1 coincide on 2-D tensors alone)."""
    return not (first.per_channel and second.per_channel) or (
        _from_front(first.axis, rank) == _from_front(second.axis, rank))


def _fits_layer(affine: ChannelAffine, layer: nn.Module, rank: int | None = None) -> bool:
    """Whether ``affine``'s channels are ``layer``'s output channels, on an output of ``rank`` dims. A BN after a
    Linear is on axis 1, the Linear's feature axis only for a 2-D input: with the rank unknown it is not folded."""
    return not affine.per_channel or _from_front(affine.axis, rank) == _from_front(_channel_axis(layer), rank)


def _combine(first: ChannelAffine, second: ChannelAffine) -> ChannelAffine:
    """The affine equal to applying ``first`` then ``second`` (``_same_axis`` holds)."""
    scale = second.scale * first.scale
    bias = None
    if first.bias is not None:
        bias = second.scale * first.bias
    if second.bias is not None:
        bias = second.bias.expand_as(scale) if bias is None else bias + second.bias
    if bias is not None and bias.numel() < scale.numel():
        bias = bias.expand_as(scale)
    axis = first.axis if first.per_channel else second.axis
    return ChannelAffine(scale, bias, origin=first.origin + second.origin,
                         quant_step=first.quant_step or second.quant_step, axis=axis)


def _scaled_layer(layer: nn.Module, affine: ChannelAffine, lazy: bool = False) -> nn.Module:
    """A copy of float ``layer`` with ``affine`` (applied after it) folded into its weight and bias (``lazy``: a
    :class:`ScaledWeight` over ``layer``'s weight)."""
    bias = layer.bias.detach().clone() if layer.bias is not None else None
    weight = layer.weight
    if lazy:
        weight = weight if isinstance(weight, ScaledWeight) else ScaledWeight(weight.detach())
    else:
        weight = materialized(weight).detach().clone()
    new = _plain_copy(layer, weight, bias)
    new.block = getattr(layer, "block", None)
    new.folded, new.bias_folded = getattr(layer, "folded", ()), getattr(layer, "bias_folded", False)
    _rescale_(new, affine)
    return new


def _rescale_(layer: nn.Module, affine: ChannelAffine) -> None:
    """Fold ``affine`` (applied after ``layer``) into the weight and bias of a layer whose tensors nobody else
    holds, in place."""
    s = affine.scale.to(layer.weight.dtype)
    out = layer.weight.shape[0]
    s_full = s.expand(out) if s.numel() == 1 else s
    bias_folded = getattr(layer, "bias_folded", False) or (
        layer.bias is None and affine.bias is not None and bool(affine.origin)
    )
    scale = s_full.reshape((-1,) + (1,) * (layer.weight.dim() - 1))
    if isinstance(layer.weight, ScaledWeight):
        layer.weight = layer.weight.rescaled(scale)
    else:
        layer.weight.mul_(scale)
    if layer.bias is not None:
        layer.bias.mul_(s_full)
    if affine.bias is not None:
        b = affine.bias.to(layer.weight.dtype).expand(out)
        if layer.bias is None:
            layer.bias = nn.Parameter(b.clone(), requires_grad=False)
        else:
            layer.bias.add_(b)
    # What the fold absorbed, so an accounting convention can still charge it unfolded (FoldedAffine).
    layer.folded = getattr(layer, "folded", ()) + affine.origin
    layer.bias_folded = bias_folded


class _RankRecorder(fx.Interpreter):
    """Runs a graph and records the rank of each node's tensor output, by node name."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.ranks: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> object:
        result = super().run_node(n)
        if isinstance(result, Tensor):
            self.ranks[n.name] = result.dim()
        return result


def _axes_can_meet(gm: fx.GraphModule) -> bool:
    """Whether a per-channel axis-1 affine (a BN) runs downstream of a Linear (whose channels are on axis -1): only
    then can a rank change what the merge does. Saves the rank pass (its first meta op imports torch._dynamo,
    a second) on the usual conv net, whose one Linear is the classifier at the end."""
    modules = dict(gm.named_modules())
    after_linear: set[fx.Node] = set()
    for node in gm.graph.nodes:
        m = modules.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(m, ChannelAffine) and m.per_channel and m.axis == 1 and any(
                a in after_linear for a in node.all_input_nodes):
            return True
        if isinstance(m, nn.Linear | IntLinear) or (isinstance(m, ChannelAffine) and m.axis == -1) or any(
                a in after_linear for a in node.all_input_nodes):
            after_linear.add(node)
    return False


def _output_ranks(gm: fx.GraphModule, example: Tensor) -> dict[fx.Node, int]:
    """The rank of each node's output for an input shaped like ``example``, or {} when the graph does not run
    on it (the merge then assumes nothing, as without an example).

    Runs a copy of the graph whose tensors are meta tensors (shapes and dtypes only: no memory, no kernels), so
    no activation is allocated and an op that writes a tensor in place writes the copy's, never the caller's
    (the copy may share its weights). Meta rather than fake tensors: creating a FakeTensorMode imports
    torch._dynamo, over a second on every first call.
    """
    memo: dict[int, object] = {}
    for module in gm.modules():
        tensors = itertools.chain(module._parameters.values(), module._buffers.values(), vars(module).values())
        for t in tensors:
            if isinstance(t, Tensor) and id(t) not in memo:
                meta = t.detach().to("meta")
                memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    dtype = example.dtype
    if dtype.is_floating_point:  # ranks do not depend on the float width: run in the model's own (fp64, bf16)
        dtype = next((p.dtype for p in gm.parameters() if p.is_floating_point()), dtype)
    try:
        recorder = _RankRecorder(copy.deepcopy(gm, memo))
        recorder.run(torch.empty(tuple(example.shape), dtype=dtype, device="meta"))
    except Exception:  # an op with no meta kernel or a data-dependent result, a wrong example
        return {}
    return {n: recorder.ranks[n.name] for n in gm.graph.nodes if n.name in recorder.ranks}


def _unused_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose results never reach the graph's output (and have no side effect)."""
    needed: set[fx.Node] = set()
    for node in reversed(graph.nodes):
        if node.op == "output" or node.is_impure() or any(user in needed for user in node.users):
            needed.add(node)
    return {n for n in graph.nodes if n not in needed}


class _Peephole:
    """One graph's merge state: the call sites of each module path and the paths whose module changed."""

    def __init__(self, gm: fx.GraphModule, lazy: bool = False, ranks: dict[fx.Node, int] | None = None) -> None:
        self.gm, self.lazy = gm, lazy
        self.ranks = dict(ranks or {})  # node -> rank of its output, where an example input told it
        self.calls: Counter[str] = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
        # A forward that also reads a module's tensors directly (``F.conv2d(y, self.conv.weight[:, :3])``) uses
        # that module once more: a fold then goes under a fresh name and the original stays for those reads.
        for n in gm.graph.nodes:
            if n.op == "get_attr" and "." in str(n.target):
                owner = str(n.target).rsplit(".", 1)[0]
                if owner in self.calls:
                    self.calls[owner] += 1
        self.changed: set[str] = set()
        self.folds: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # layers this merge folded (owns their weights)
        self.modules: dict[str, nn.Module] = dict(gm.named_modules())
        # Module path -> number of ops traced through it (a module whose forward is one op can be replaced).
        self.ops_in: Counter[str] = Counter(
            next(reversed(n.meta["nn_module_stack"])) for n in gm.graph.nodes if n.meta.get("nn_module_stack")
        )
        self.dtype = next((t.dtype for t in gm.parameters() if t.is_floating_point()), None) or next(
            (t.dtype for t in gm.buffers() if t.is_floating_point()), torch.float32
        )

    def run(self) -> set[str]:
        """Apply the rules until none applies; returns the module paths whose module changed or went away."""
        gm = self.gm
        # Work the model itself computes and throws away stays in the deploy form, so that the scorer can show
        # it (its `dead` section) instead of this pass hiding it; only what the rewrites orphan is removed.
        originally_dead = _unused_nodes(gm.graph)
        # Whole passes in graph order until one changes nothing: each rewrite only touches a node and its
        # producer, so later nodes of the same pass can still be visited (restarting after every rewrite was
        # quadratic: seconds on DenseNet-BC-100).
        changed = True
        while changed:
            changed = False
            for node in list(gm.graph.nodes):
                if getattr(node, "_erased", False):
                    continue
                while any(rule(self, node) for rule in PEEPHOLE_RULES):
                    changed = True
                    if getattr(node, "_erased", False):
                        break
        gm.graph.eliminate_dead_code(is_impure_node=lambda n: n in originally_dead or n.is_impure())
        gm.delete_all_unused_submodules()
        gm.recompile()
        return self.changed

    def rank(self, *nodes: fx.Node) -> int | None:
        """The rank the outputs of ``nodes`` share, None when one is unknown (or they differ)."""
        ranks = {self.ranks.get(n) for n in nodes}
        return ranks.pop() if len(ranks) == 1 else None

    def install(self, node: fx.Node, module: nn.Module) -> None:
        """Point ``node`` at ``module``: in place of its old module (keeping the readable path) when this node
        is that module's only call site, else under a fresh name (the old module is shared)."""
        target = str(node.target)
        if self.calls[target] == 1:
            self.gm.set_submodule(target, module)
            self.modules[target] = module
            self.changed.add(target)
            return
        base = target.replace(".", "_") + "_merged"
        name, i = base, 0
        while hasattr(self.gm, name):
            i += 1
            name = f"{base}{i}"
        self.gm.add_submodule(name, module)
        self.modules[name] = module
        self.calls[target] -= 1
        self.calls[name] += 1
        node.target = name

    def fold(self, node: fx.Node, layer: nn.Module, affine: ChannelAffine) -> None:
        """Make ``node`` call ``layer`` with ``affine`` (applied after it) folded in. A layer this merge already
        folded, called only here, is rescaled in place: a conv absorbing a BN and then a scale would otherwise
        hold its weights twice (same arithmetic, same values). ``lazy`` (the scorer's shared deploy form) folds
        into a :class:`ScaledWeight`: the scorer's trace would otherwise hold every folded weight at once."""
        if layer in self.folds and self.calls[str(node.target)] == 1:
            _rescale_(layer, affine)
            return
        new = _scaled_layer(layer, affine, self.lazy)
        self.folds.add(new)
        self.install(node, new)

    def bypass(self, node: fx.Node, replacement: fx.Node) -> None:
        """Route ``node``'s users to ``replacement`` and erase it."""
        node.replace_all_uses_with(replacement)
        self.erase(node)

    def erase(self, node: fx.Node) -> None:
        """Erase ``node``; a module left with no call site has been merged away."""
        if node.op == "call_module":
            target = str(node.target)
            self.calls[target] -= 1
            if self.calls[target] == 0:
                self.changed.add(target)
        self.gm.graph.erase_node(node)


# Peephole rules: ``rule(peephole, node) -> bool`` rewrites the graph around ``node`` and says whether it did;
# tried in registration order at every node until none applies.
PeepholeRule = Callable[[_Peephole, fx.Node], bool]
PEEPHOLE_RULES: list[PeepholeRule] = []


def peephole_rule(fn: PeepholeRule) -> PeepholeRule:
    """Decorator: register a peephole rule (tried after the ones registered before it)."""
    PEEPHOLE_RULES.append(fn)
    return fn


def _constant_factor(node: fx.Node) -> tuple[fx.Node, float] | None:
    """(tensor input, factor) if ``node`` multiplies or divides a tensor by a Python number."""
    if node.op != "call_function" or len(node.args) != 2 or node.kwargs:
        return None
    a, b = node.args
    if not isinstance(node.args[0], fx.Node) and not isinstance(node.args[1], fx.Node):
        return None
    src = node.args[0] if isinstance(node.args[0], fx.Node) else node.args[1]
    if src.op != "call_module":  # a module's output is a tensor; other values may be sizes or Python numbers
        return None
    if node.target in (operator.mul, torch.mul):
        if isinstance(a, fx.Node) and isinstance(b, int | float):
            return a, float(b)
        if isinstance(b, fx.Node) and isinstance(a, int | float):
            return b, float(a)
    if node.target in (operator.truediv, torch.div) and isinstance(a, fx.Node) and isinstance(b, int | float) and b:
        return a, 1.0 / float(b)
    return None


@peephole_rule
def constant_scale_to_affine(pp: _Peephole, node: fx.Node) -> bool:
    """x * c, x / c: a scalar affine that can merge with its neighbours (e.g. eval-mode ShakeDrop)."""
    factor = _constant_factor(node)
    if factor is None:
        return False
    src, value = factor
    stack = node.meta.get("nn_module_stack") or {}
    owner = next(reversed(stack)) if stack else ""
    affine = ChannelAffine(torch.tensor([value], dtype=pp.dtype),
                           origin=(FoldedAffine(owner or node.name, "affine", True, False, 0),))
    parent = owner.rpartition(".")[0]
    if owner and pp.ops_in[owner] == 1 and owner not in pp.calls and (not parent or _has_submodule(pp.gm, parent)):
        # The module's whole forward is this scaling: the affine takes its place (and its path).
        pp.gm.set_submodule(owner, affine)
        pp.modules[owner] = affine
        pp.changed.add(owner)
        name = owner
    else:
        name = f"scale_{node.name}"
        pp.gm.add_submodule(name, affine)
    pp.modules[name] = affine
    pp.calls[name] += 1
    with pp.gm.graph.inserting_before(node):
        new = pp.gm.graph.call_module(name, (src,))
    if node in pp.ranks:
        pp.ranks[new] = pp.ranks[node]
    pp.bypass(node, new)
    return True


@peephole_rule
def drop_identity_affine(pp: _Peephole, node: fx.Node) -> bool:
    """An affine with scale 1 and no bias does nothing."""
    affine = _called(pp, node, ChannelAffine)
    if affine is None or affine.bias is not None or not bool((affine.scale == 1).all()):
        return False
    pp.bypass(node, node.args[0])
    return True


@peephole_rule
def merge_affines(pp: _Peephole, node: fx.Node) -> bool:
    """affine ∘ affine -> affine, when the first feeds nothing else."""
    affine = _called(pp, node, ChannelAffine)
    src = node.args[0] if node.args else None
    first = _called(pp, src, ChannelAffine)
    if affine is None or first is None or len(src.users) != 1 or not _same_axis(first, affine, pp.rank(src, node)):
        return False
    pp.install(src, _combine(first, affine))
    pp.bypass(node, src)
    return True


@peephole_rule
def fold_affine_into_layer(pp: _Peephole, node: fx.Node) -> bool:
    """float conv/linear ∘ affine -> conv/linear with folded weights and bias (BN folding), when the layer
    feeds nothing else."""
    affine = _called(pp, node, ChannelAffine)
    src = node.args[0] if node.args else None
    layer = _foldable_layer(pp, src)
    if affine is None or layer is None or len(src.users) != 1 or not _fits_layer(affine, layer, pp.rank(src, node)):
        return False
    pp.fold(src, layer, affine)
    pp.bypass(node, src)
    return True


@peephole_rule
def move_scale_before_relu(pp: _Peephole, node: fx.Node) -> bool:
    """producer ∘ relu ∘ positive bias-free affine -> (producer ∘ affine) ∘ relu: relu(s·x) = s·relu(x)."""
    affine = _called(pp, node, ChannelAffine)
    if affine is None or affine.bias is not None or not bool((affine.scale > 0).all()):
        return False
    src = node.args[0]
    if not (isinstance(src, fx.Node) and _is_relu(pp.gm, src) and len(src.users) == 1):
        return False
    producer = src.args[0]
    first = _called(pp, producer, ChannelAffine)
    layer = _foldable_layer(pp, producer)
    rank = pp.rank(producer, node)
    if first is not None and len(producer.users) == 1 and _same_axis(first, affine, rank):
        pp.install(producer, _combine(first, affine))
    elif layer is not None and len(producer.users) == 1 and _fits_layer(affine, layer, rank):
        pp.fold(producer, layer, affine)
    else:
        return False
    pp.bypass(node, src)
    return True


def _inplace_on_shared_input(gm: fx.GraphModule, relu: fx.Node) -> bool:
    """An in-place ReLU whose input other nodes also read: bypassing it would change what they see."""
    inplace = getattr(_module(gm, relu, nn.ReLU), "inplace", False) or relu.target in (torch.relu_, "relu_") \
        or relu.kwargs.get("inplace", False)
    src = relu.args[0]
    return bool(inplace) and isinstance(src, fx.Node) and len(src.users) > 1


@peephole_rule
def clamp_absorbs_relu(pp: _Peephole, node: fx.Node) -> bool:
    """relu ∘ RoundClamp(qmin >= 0) -> RoundClamp: the clamp at 0 is the ReLU."""
    quant = _called(pp, node, RoundClamp)
    src = node.args[0] if node.args else None
    if quant is None or quant.qmin < 0 or not isinstance(src, fx.Node) or not _is_relu(pp.gm, src):
        return False
    if _inplace_on_shared_input(pp.gm, src):
        return False
    node.args = (src.args[0], *node.args[1:])
    if not src.users:
        pp.erase(src)
    return True
