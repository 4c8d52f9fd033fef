"""Turn traces into report rows: apply the cost rules, charge each stored tensor once, average examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from micronet.scoring.policy import Policy
from micronet.scoring.report import LayerRow
from micronet.scoring.rules import FREE_OPS, RULES, Cost, CostContext
from micronet.scoring.storage import ParamUse, storage_bits
from micronet.scoring.trace import QUANTIZERS, Trace


@dataclass
class Accounts:
    """Rows (per example), unknown and free ops, and whether anything was quantized."""

    rows: list[LayerRow] = field(default_factory=list)
    unknown_ops: list[dict] = field(default_factory=list)
    free_ops: dict[str, int] = field(default_factory=dict)
    quantized: bool = False
    examples: int = 0


def account(traces: list[Trace], policy: Policy, param_traces: list[Trace] | tuple = ()) -> Accounts:
    """Cost every dynamic op of every trace; ops are averaged over all traced examples, params are not.

    ``param_traces`` contribute parameters only: a dynamic network's all-paths (training-mode) forward,
    so that blocks no traced example executed still pay for their stored weights.
    """
    rows: dict[tuple[str, str], LayerRow] = {}
    raw: dict[tuple[str, str], list[int]] = {}  # per row: mults, adds, mult bitops, add bitops (summed)
    seen_params: set = set()
    unknown: dict[tuple[str, str], dict] = {}
    free: dict[str, int] = {}
    quantized = False
    examples = sum(t.batch for t in traces)

    def row_for(module: str, kind: str, cost: Cost | None) -> tuple[str, str]:
        key = (module, kind)
        if key not in rows:
            mod = traces[0].modules.get(module) or next(
                (t.modules.get(module) for t in traces if module in t.modules), None
            )
            rows[key] = LayerRow(module, kind, type(mod).__name__ if mod is not None else "")
            raw[key] = [0, 0, 0, 0]
        row = rows[key]
        if cost is not None:
            if not row.shape and cost.shape is not None:
                row.shape = (
                    tuple(cost.shape[1:]) if kind not in ("conv", "linear", "matmul") else tuple(cost.shape)
                )
            if row.weight_bits is None:
                row.weight_bits = cost.weight_bits
            if row.input_bits is None:
                row.input_bits = cost.input_bits
        return key

    def charge_params(key: tuple[str, str], uses: list[ParamUse]) -> None:
        row = rows[key]
        for use in uses:
            if use.key in seen_params:
                continue
            seen_params.add(use.key)
            bits, _, mask_bits = storage_bits(use, policy.mask)
            row.param_bits += bits
            row.mask_bits += mask_bits

    for trace in [*traces, *param_traces]:
        ops_count = trace not in param_traces
        ctx = CostContext(policy, trace)
        for rec in trace.records:
            if ops_count and (rec.op in QUANTIZERS or any(r.info.codes and r.static for r in rec.inputs)):
                quantized = True
            if not rec.dynamic:
                continue  # folded at deploy time
            target = rec.args[0] if rec.args else None
            if rec.op.endswith("_") and getattr(target, "static", False) and target.info.stored:
                # In-place update of a buffer (run statistics, gate counters): bookkeeping, not model work.
                free["bookkeeping " + rec.op] = free.get("bookkeeping " + rec.op, 0) + 1
                continue
            rule = RULES.get(rec.op)
            result = rule(rec, ctx) if rule is not None else None
            if result is None:
                if not ops_count:
                    kind = "data"
                elif rec.op in FREE_OPS:
                    free[rec.op] = free.get(rec.op, 0) + 1
                    kind = "data"
                else:
                    entry = unknown.setdefault(
                        (rec.op, rec.module),
                        {
                            "op": rec.op,
                            "module": rec.module,
                            "count": 0,
                            "shape": list(rec.outputs[0].shape) if rec.outputs else [],
                        },
                    )
                    entry["count"] += 1
                    kind = "unknown"
                uses = [ctx.param(r, module=rec.module) for r in rec.inputs if r.static and r.info.stored]
                if uses:
                    charge_params(row_for(rec.module, kind, None), uses)
                continue
            for cost in result if isinstance(result, list) else [result]:
                key = row_for(cost.module if cost.module is not None else rec.module, cost.kind, cost)
                if ops_count:
                    totals = raw[key]
                    totals[0] += cost.mults
                    totals[1] += cost.adds
                    totals[2] += cost.mult_bitops
                    totals[3] += cost.add_bitops
                row = rows[key]
                if cost.weight_numel is not None and trace is traces[0]:
                    row.weight_numel += cost.weight_numel
                    row.weight_nnz += cost.weight_nnz or 0
                uses = cost.params
                if uses is None:
                    uses = [ctx.param(r, module=rec.module) for r in rec.inputs if r.static and r.info.stored]
                charge_params(key, uses)

    for key, row in rows.items():
        mults, adds, mult_bitops, add_bitops = raw[key]
        row.mults_raw = Fraction(mults, examples)
        row.adds_raw = Fraction(adds, examples)
        row.mult_bitops = Fraction(mult_bitops, examples)
        row.add_bitops = Fraction(add_bitops, examples)
    kept = [
        r
        for r in rows.values()
        if r.param_bits or r.mult_bitops or r.add_bitops or r.kind == "unknown" or r.mults_raw or r.adds_raw
    ]
    return Accounts(kept, list(unknown.values()), dict(sorted(free.items())), quantized, examples)
