"""``deploy_form``: the integer deploy form that the scorer counts and the exporter writes.

Two passes over a deep copy of the model (the caller's model is never touched):

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

On a DenseNet-BC this yields exactly the 2019 winner's merged network (spec training.md §2.3).
Logits equal the training form's up to fp32 rounding; a value that lands within an ulp of a rounding
tie can flip one activation code (spec onnx-export.md §5), which is inherent to re-associating the
scales.
"""

from __future__ import annotations

import copy
import operator
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from micronet.compress import state
from micronet.compress.integer_modules import ChannelAffine, IntConv2d, IntLinear, RoundClamp
from micronet.errors import MicronetError

_LEAVES = (ChannelAffine, RoundClamp, IntConv2d, IntLinear)


def deploy_form(model: nn.Module) -> nn.Module:
    """The integer deploy form of any model, float or compressed: a converted eval-mode deep copy.

    This is the one training form -> deploy form conversion: the scorer counts its result and the exporter
    writes it. A model already in deploy form (integer modules, no training-form state) is copied as it is.
    """
    if _is_deploy_form(model):
        return detached_copy(model).eval()
    spec = getattr(model, "micronet_spec", None)
    try:
        work = detached_copy(model).eval()
        with torch.no_grad():
            work = _rewrite_modules(work)
            work = _merge(work)
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


def detached_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies modules holding autograd-tracked tensors (e.g. last gate outputs)."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
            elif isinstance(value, list | tuple) and any(isinstance(t, Tensor) and t.grad_fn is not None
                                                         for t in value):
                memo[id(value)] = type(value)(t.detach().clone() if isinstance(t, Tensor) else t for t in value)
    return copy.deepcopy(model, memo)


# ----------------------------------------------------------------------------------------------- pass 1


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> ChannelAffine:
    inv = torch.rsqrt(bn.running_var + bn.eps)
    scale = inv if bn.weight is None else bn.weight.detach() * inv
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach()
    return ChannelAffine(scale, shift)


def _deploy_layer(layer: nn.Conv2d | nn.Linear) -> nn.Module:
    """Integer (or float, folded) replacement of one compressed conv/linear."""
    wq, aq, mask = state.weight_quantizer(layer), state.input_quantizer(layer), state.weight_mask(layer)
    w = layer.weight.detach()
    block = mask.block if mask is not None else None
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    in_step = torch.ones((), dtype=w.dtype, device=w.device)
    if aq is not None:
        in_step = aq.scale.detach().to(w.dtype).reshape(())
        parts["in_scale"] = ChannelAffine(1.0 / in_step.reshape(1))
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
        parts["out_scale"] = ChannelAffine(out_scale, bias)
    else:
        core = _plain_copy(layer, w * in_step, bias)
        core.block = block
        parts["conv" if isinstance(layer, nn.Conv2d) else "linear"] = core
    if len(parts) == 1:
        return next(iter(parts.values()))
    return nn.Sequential(parts)


def _plain_copy(layer: nn.Conv2d | nn.Linear, weight: Tensor, bias: Tensor | None) -> nn.Module:
    like = {"dtype": weight.dtype, "device": weight.device}
    if isinstance(layer, nn.Conv2d):
        new: nn.Module = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                   layer.padding, layer.dilation, layer.groups, bias=bias is not None,
                                   padding_mode=layer.padding_mode, **like)
    else:
        new = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, **like)
    new.weight.data.copy_(weight)
    if bias is not None:
        new.bias.data.copy_(bias)
    return new.requires_grad_(False)


def _rewrite_modules(module: nn.Module) -> nn.Module:
    """Pass 1 on ``module`` and its descendants; returns the (possibly replaced) module."""
    replaced = _rewrite_one(module)
    if replaced is not module:
        return replaced
    for name, child in list(module.named_children()):
        new = _rewrite_modules(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _rewrite_one(module: nn.Module) -> nn.Module:
    if callable(getattr(module, "deploy_module", None)):
        return module.deploy_module()
    if isinstance(module, nn.Conv2d | nn.Linear) and (
        state.weight_quantizer(module) or state.input_quantizer(module) or state.weight_mask(module)
    ):
        return _deploy_layer(module)
    if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d) and module.track_running_stats:
        return _bn_affine(module)
    if isinstance(module, nn.Dropout):
        return nn.Identity()
    return module


# ----------------------------------------------------------------------------------------------- pass 2


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def _merge(module: nn.Module, top: bool = True) -> nn.Module:
    """Trace the largest sub-modules that trace and merge affines on their graphs.

    The top-level module is replaced by its merged ``GraphModule``. Below a module that does not trace,
    children keep their identity (the parent may call their methods or iterate them): their merged graph
    becomes their ``forward``, and their own children are merged too, for parents that call those directly.
    """
    if isinstance(module, _LEAVES) or not any(True for _ in module.children()):
        return module
    try:
        graph = _Tracer().trace(module)
    except Exception:  # data-dependent control flow: convert the children instead
        graph = None
    if graph is not None:
        gm = fx.GraphModule(module, graph, module.__class__.__name__)
        _peephole(gm)
        if top:
            return gm
    for name, child in list(module.named_children()):
        new = _merge(child, top=False)
        if new is not child:
            setattr(module, name, new)
    # Containers are iterated by such parents (their forward is not what runs), and registering the
    # graph as a child would add an element to them.
    if graph is not None and not isinstance(module, nn.Sequential | nn.ModuleList | nn.ModuleDict):
        module.deploy_graph = gm
        module.forward = gm.forward
    return module


_RELU_FUNCS = (F.relu, torch.relu, torch.relu_)


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _inplace_on_shared_input(gm: fx.GraphModule, relu: fx.Node) -> bool:
    """An in-place ReLU whose input other nodes also read: bypassing it would change what they see."""
    inplace = getattr(_module(gm, relu, nn.ReLU), "inplace", False) or relu.target in (torch.relu_, "relu_") \
        or relu.kwargs.get("inplace", False)
    src = relu.args[0]
    return bool(inplace) and isinstance(src, fx.Node) and len(src.users) > 1


def _module(gm: fx.GraphModule, node, kind) -> nn.Module | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, kind):
            return m
    return None


def _combine(first: ChannelAffine, second: ChannelAffine) -> ChannelAffine:
    """The affine equal to applying ``first`` then ``second``."""
    scale = second.scale * first.scale
    bias = None
    if first.bias is not None:
        bias = second.scale * first.bias
    if second.bias is not None:
        bias = second.bias.expand_as(scale) if bias is None else bias + second.bias
    if bias is not None and bias.numel() < scale.numel():
        bias = bias.expand_as(scale)
    return ChannelAffine(scale, bias)


def _install(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> None:
    """Point ``node`` at ``module``: in place of its old module (keeping the readable path) when this node is
    that module's only call site, else under a fresh name (the old module is shared)."""
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == node.target)
    if calls == 1:
        gm.set_submodule(str(node.target), module)
        return
    base = str(node.target).replace(".", "_") + "_merged"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}{i}"
    gm.add_submodule(name, module)
    node.target = name


def _scaled_layer(layer: nn.Module, affine: ChannelAffine) -> nn.Module:
    """A copy of float ``layer`` with ``affine`` (applied after it) folded into its weight and bias."""
    s = affine.scale.to(layer.weight.dtype)
    out = layer.weight.shape[0]
    s_full = s.expand(out) if s.numel() == 1 else s
    weight = layer.weight.detach() * s_full.reshape((-1,) + (1,) * (layer.weight.dim() - 1))
    bias = layer.bias.detach() * s_full if layer.bias is not None else None
    if affine.bias is not None:
        b = affine.bias.to(layer.weight.dtype).expand(out)
        bias = b.clone() if bias is None else bias + b
    new = _plain_copy(layer, weight, bias)
    new.block = getattr(layer, "block", None)
    return new


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


def _try_rules(gm: fx.GraphModule, node: fx.Node) -> bool:
    factor = _constant_factor(node)
    if factor is not None:  # e.g. eval-mode ShakeDrop: a scalar affine that can merge with its neighbours
        src, value = factor
        name = f"scale_{node.name}"
        dtype = next((t.dtype for t in gm.state_dict().values() if t.is_floating_point()), torch.float32)
        gm.add_submodule(name, ChannelAffine(torch.tensor([value], dtype=dtype)))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (src,))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return True
    affine = _module(gm, node, ChannelAffine)
    if affine is not None:
        if bool((affine.scale == 1).all()) and affine.bias is None:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            return True
        src = node.args[0]
        # affine ∘ affine
        first = _module(gm, src, ChannelAffine)
        if first is not None and len(src.users) == 1:
            _install(gm, src, _combine(first, affine))
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            return True
        # float conv/linear ∘ affine (BN folding): only when the conv feeds nothing else
        layer = _module(gm, src, (nn.Conv2d, nn.Linear))
        if layer is not None and len(src.users) == 1:
            _install(gm, src, _scaled_layer(layer, affine))
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            return True
        # producer ∘ relu ∘ positive bias-free affine: move the scale before the ReLU
        if (isinstance(src, fx.Node) and _is_relu(gm, src) and len(src.users) == 1 and affine.bias is None
                and bool((affine.scale > 0).all())):
            producer = src.args[0]
            first = _module(gm, producer, ChannelAffine)
            layer = _module(gm, producer, (nn.Conv2d, nn.Linear))
            if first is not None and len(producer.users) == 1:
                _install(gm, producer, _combine(first, affine))
            elif layer is not None and len(producer.users) == 1:
                _install(gm, producer, _scaled_layer(layer, affine))
            else:
                return False
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            return True
        return False
    quant = _module(gm, node, RoundClamp)
    if quant is not None and quant.qmin >= 0:
        src = node.args[0]
        if isinstance(src, fx.Node) and _is_relu(gm, src) and not _inplace_on_shared_input(gm, src):
            node.args = (src.args[0], *node.args[1:])
            if not src.users:
                gm.graph.erase_node(src)
            return True
    return False


def _peephole(gm: fx.GraphModule) -> None:
    # Whole passes in graph order until one changes nothing: each rewrite only touches a node and its
    # producer, so later nodes of the same pass can still be visited (restarting after every rewrite was
    # quadratic: seconds on DenseNet-BC-100).
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if getattr(node, "_erased", False):
                continue
            while _try_rules(gm, node):
                changed = True
                if getattr(node, "_erased", False):
                    break
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
