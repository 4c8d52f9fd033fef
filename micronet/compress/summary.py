"""A readable per-layer account of a model's compression state."""

from __future__ import annotations

from torch import nn

from micronet.compress import state


def compression_rows(model: nn.Module) -> list[dict]:
    """One dict per conv/linear layer: sparsity, weight bits, input bits and the quantizer scales."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        w = module.weight.detach()
        wq, aq = state.weight_quantizer(module), state.input_quantizer(module)
        mask = state.weight_mask(module)
        scale = wq.scale.detach().reshape(-1) if wq is not None else None
        rows.append({
            "layer": name,
            "shape": "x".join(map(str, w.shape)),
            "sparsity": 1.0 - int(w.count_nonzero()) / w.numel(),
            "mask": "block " + "x".join(map(str, mask.block)) if mask is not None and mask.block else
                    ("yes" if mask is not None else "-"),
            "weight_bits": wq.bits if wq is not None else 32,
            "weight_scale": "-" if scale is None else f"{float(scale.min()):.3g}..{float(scale.max()):.3g}",
            "input_bits": (aq.bits if aq is not None else 32),
            "input_signed": ("-" if aq is None else aq.signed),
            "input_scale": "-" if aq is None else f"{float(aq.scale):.4g}",
        })
    return rows


def compression_summary(model: nn.Module) -> str:
    """Per-layer table (sparsity, weight bits, input bits, scales) plus overall sparsity."""
    rows = compression_rows(model)
    sizes = [m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]  # same order
    total = sum(sizes)
    zeros = sum(r["sparsity"] * n for r, n in zip(rows, sizes))
    # Lazy: only this printout needs tabulate, and `make gpu-check` imports micronet.compress on bare GPU machines.
    from tabulate import tabulate

    table = tabulate(rows, headers="keys", floatfmt=".4f")
    return f"{table}\n\noverall conv/linear sparsity: {zeros / max(total, 1):.4f} of {total:,} weights"
