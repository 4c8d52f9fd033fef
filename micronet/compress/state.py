"""Reading the compression state of a model: the one place other packages look.

The state lives on the modules themselves (see docs/architecture.md): a ``WeightMask`` and/or a
``WeightQuantizer`` parametrization on ``module.weight``, and an ``ActQuantizer`` submodule
``module.input_quantizer`` applied to the module's input. These helpers return them (or ``None``).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from micronet.compress.integer_modules import IntConv2d, IntLinear, RoundClamp
from micronet.compress.parametrizations import WeightMask, WeightQuantizer
from micronet.errors import MicronetError

#: The short layer-kind names configs use: "conv" = every Conv2d except the classifier, "linear" = every other
#: Linear except the classifier (a ConvNeXt block's channels-last Linears, a transformer's MLP), "fc" = the
#: classifier the model declares (see ``classifier_name``). Only Conv2d and Linear modules carry weight compression.
LAYER_KINDS = ("conv", "linear", "fc")
_WEIGHTED = (nn.Conv2d, nn.Linear)


def _parametrizations(module: nn.Module) -> Sequence[nn.Module]:
    if parametrize.is_parametrized(module, "weight"):
        return list(module.parametrizations.weight)
    return []


def weight_mask(module: nn.Module):
    """The module's ``WeightMask`` parametrization, or ``None``."""
    return next((p for p in _parametrizations(module) if isinstance(p, WeightMask)), None)


def weight_quantizer(module: nn.Module):
    """The module's ``WeightQuantizer`` parametrization, or ``None``."""
    return next((p for p in _parametrizations(module) if isinstance(p, WeightQuantizer)), None)


def input_quantizer(module: nn.Module):
    """The module's input ``ActQuantizer``, or ``None``."""
    return getattr(module, "input_quantizer", None)


def raw_weight(module: nn.Module):
    """The trainable (dense, unquantized) weight tensor behind any parametrizations."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def compressed_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) pairs of modules that carry a mask, a weight quantizer or an input quantizer."""
    for name, module in model.named_modules():
        if weight_mask(module) is not None or weight_quantizer(module) is not None:
            yield name, module
        elif input_quantizer(module) is not None:
            yield name, module


def has_training_form(model: nn.Module) -> bool:
    """True if any module carries training-form compression (weight parametrizations, input quantizers)."""
    return any(parametrize.is_parametrized(m) or input_quantizer(m) is not None for m in model.modules())


def is_quantized(model: nn.Module) -> bool:
    """True if any weight or activation in the model is quantized."""
    for module in model.modules():
        if isinstance(module, IntConv2d | IntLinear | RoundClamp):
            return True
        if weight_quantizer(module) is not None or input_quantizer(module) is not None:
            return True
    return False


# torch modules whose forward reads their child Linears' weights directly instead of calling them
# (F.multi_head_attention_forward reads out_proj.weight; the Transformer layers' fast path passes linear1/linear2
# and the attention weights to one fused kernel): an input quantizer's hook on such a Linear never runs, and no
# integer replacement (codes + scales) can stand where a float weight is read.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def weight_read_directly(model: nn.Module) -> dict[str, str]:
    """{path of a Linear: the torch module type that reads its weight without calling it} over ``model``."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, _READS_CHILD_WEIGHTS):
            for child_name, child in module.named_modules():
                if child_name and isinstance(child, nn.Linear):
                    found[f"{name}.{child_name}" if name else child_name] = type(module).__name__
    return found


def check_quantizable(model: nn.Module, paths: Sequence[str] | None = None) -> None:
    """Refuse (one line) a quantizer on a Linear whose owner reads its weight directly (``weight_read_directly``):
    the ``paths`` about to be quantized, or every quantized layer of ``model`` when ``paths`` is None."""
    direct = weight_read_directly(model)
    if not direct:
        return
    if paths is None:
        paths = [n for n, m in model.named_modules()
                 if weight_quantizer(m) is not None or input_quantizer(m) is not None]
    bad = next((p for p in paths if p in direct), None)
    if bad is not None:
        raise MicronetError(
            f"{bad}: cannot quantize a Linear inside nn.{direct[bad]}, which reads its weight directly instead of "
            f"calling it (its input quantizer would never run and integer codes cannot replace the weight); "
            f"leave it float (exclude={bad!r}); pruning it is supported")


def classifier_name(model: nn.Module) -> str | None:
    """Qualified name of the model's classifier: the one it declares, else the last Linear (third-party models).

    A model declares it as timm models do: a ``classifier_name`` string attribute (every zoo family), or a
    ``get_classifier()`` method returning the module. "The last Linear" is only a guess for models that declare
    nothing: on a SkipNet it would be the gate controller's projection.
    """
    declared = getattr(model, "classifier_name", None)
    if isinstance(declared, str):
        return declared
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        name = next((n for n, m in model.named_modules() if m is head), None)
        if name is not None:
            return name
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


def select_layers(
    model: nn.Module,
    kinds: Sequence[str] = ("conv",),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[tuple[str, nn.Module]]:
    """Layers of the given kinds, narrowed by fnmatch name patterns; a pattern that matches no layer is an error.

    ``include`` and ``exclude`` only ever narrow the layers of ``kinds``: ``kinds=("conv",)`` never yields the
    classifier, whatever the patterns say.
    """
    unknown_kinds = set(kinds) - set(LAYER_KINDS)
    if unknown_kinds:
        raise MicronetError(f"unknown layer kind(s) {sorted(unknown_kinds)}; valid: {list(LAYER_KINDS)}")
    weighted = [(n, m) for n, m in model.named_modules() if isinstance(m, _WEIGHTED)]
    for pattern in (*include, *exclude):
        if not fnmatch.filter([n for n, _ in weighted], pattern):
            raise MicronetError(f"layer name pattern {pattern!r} matches no conv/linear layer of the model")
    head = classifier_name(model)

    def wanted(name: str, module: nn.Module) -> bool:
        kind = "fc" if name == head else "conv" if isinstance(module, nn.Conv2d) else "linear"
        return (kind in kinds
                and (not include or any(fnmatch.fnmatchcase(name, p) for p in include))
                and not any(fnmatch.fnmatchcase(name, p) for p in exclude))

    return [(n, m) for n, m in weighted if wanted(n, m)]


def first_conv_name(model: nn.Module) -> str | None:
    """Name of the first convolution in registration order (the stem of every zoo model)."""
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


@contextlib.contextmanager
def preserved_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every submodule's own train/eval flag on exit, whatever the body switched."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model with neither)."""
    return next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
