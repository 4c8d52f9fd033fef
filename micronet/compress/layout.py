"""The compression *structure* of a model as JSON-able data, so a checkpoint can rebuild it.

``compression_layout(model)`` lists, per module name, which mask / weight quantizer / input quantizer
it carries and their settings (not their tensors: those are in the state_dict). ``apply_layout``
re-creates the same structure on a fresh model, after which ``load_state_dict(strict=True)`` fills in
masks, scales and weights.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from micronet.compress import state
from micronet.compress.parametrizations import ActQuantizer, WeightMask, WeightQuantizer
from micronet.compress.quant import attach_input_quantizer
from micronet.errors import MicronetError


def compression_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per compressed module: its mask, weight-quantizer and input-quantizer settings."""
    layout: dict[str, dict[str, Any]] = {}
    for name, module in state.compressed_modules(model):
        entry: dict[str, Any] = {}
        mask = state.weight_mask(module)
        if mask is not None:
            entry["mask"] = {"sparsity": mask.sparsity, "group": mask.group, "gradient": mask.gradient,
                             "block": list(mask.block) if mask.block else None, "frozen": mask.frozen}
        wq = state.weight_quantizer(module)
        if wq is not None:
            entry["weight_quant"] = {"bits": wq.bits, "per_channel": wq.per_channel,
                                     "refit_iters": wq.refit_iters, "refit": wq.refit}
        aq = state.input_quantizer(module)
        if aq is not None:
            entry["input_quant"] = {"bits": aq.bits, "signed": aq.signed, "method": aq.method,
                                    "percentile": aq.percentile, "learn_scale": aq.learn_scale}
        # Order matters for rebuilding: mask before quantizer, as in the parametrization chain.
        if parametrize.is_parametrized(module, "weight"):
            entry["order"] = [type(p).__name__ for p in module.parametrizations.weight]
        layout[name] = entry
    return layout


def apply_layout(model: nn.Module, layout: dict[str, dict[str, Any]]) -> nn.Module:
    """Re-create the structure described by ``layout`` on ``model`` (tensors are placeholders)."""
    modules = dict(model.named_modules())
    for name, entry in layout.items():
        if name not in modules:
            raise MicronetError(f"checkpoint layout names module {name!r}, which this architecture lacks")
        module = modules[name]
        for kind in entry.get("order", []):
            w = state.raw_weight(module)
            if kind == "WeightMask":
                m = entry["mask"]
                block = tuple(m["block"]) if m.get("block") else None
                p = WeightMask(torch.ones_like(w, dtype=torch.bool), sparsity=m["sparsity"], group=m["group"],
                               gradient=m["gradient"], block=block)
                p.frozen = bool(m.get("frozen", False))
            elif kind == "WeightQuantizer":
                q = entry["weight_quant"]
                p = WeightQuantizer(w, q["bits"], per_channel=q["per_channel"], refit_iters=q["refit_iters"],
                                    refit=q["refit"])
            else:
                raise MicronetError(f"checkpoint layout has unknown parametrization {kind!r} on {name}")
            parametrize.register_parametrization(module, "weight", p, unsafe=True)
        if "input_quant" in entry:
            q = entry["input_quant"]
            aq = ActQuantizer(q["bits"], signed=q["signed"], method=q["method"], percentile=q["percentile"],
                              learn_scale=q["learn_scale"])
            attach_input_quantizer(module, aq)
    return model
