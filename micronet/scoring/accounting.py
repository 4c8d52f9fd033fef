"""Turn traces into report rows: apply the cost rules, charge each stored tensor once, average examples.

Only the work inference needs is charged: an op whose results cannot reach the model's outputs (nor Python
control flow, nor a stored buffer) is dead, and so is a parameter only dead ops read; both are listed under
``dead`` with what they would have cost. torch.ao observers and the bookkeeping inside fake-quantize modules
are free; their quantize-dequantize ops are priced (rules.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch.ao.quantization import FakeQuantizeBase, ObserverBase

from micronet.scoring.policy import Policy
from micronet.scoring.report import LayerRow
from micronet.scoring.rules import FREE_OPS, RULES, Cost, CostContext
from micronet.scoring.storage import ParamUse, storage_bits
from micronet.scoring.trace import AO_FAKE_QUANT, ESCAPES, QUANTIZERS, OpRecord, Trace, ao_fake_quant_off

_QUANTIZED_DTYPES = (torch.quint8, torch.qint8, torch.qint32, torch.quint4x2, torch.quint2x4)


def live_records(trace: Trace) -> set[int]:
    """Indices of the records whose results can reach the output, Python control flow or a stored buffer.

    A backward sweep: an op is live when a live op reads one of its outputs, when it writes in place into
    memory a live op reads later (views share storage), or when it is a root (returns no tensor, hands a value
    to Python, or updates a stored buffer). Everything else computes something the model throws away.
    """
    live_uids = set(trace.output_uids)
    live_storage: set[int] = set(trace.output_storages)
    live: set[int] = set()
    for rec in reversed(trace.records):
        keep = (
            rec.op in ESCAPES
            or not rec.outputs
            or any(o.uid in live_uids for o in rec.outputs)
            or bool(rec.writes and (rec.writes & live_storage or any(r.static and r.info.stored for r in rec.inputs)))
        )
        if keep:
            live.add(rec.index)
            live_uids.update(r.uid for r in rec.inputs)
            live_storage.update(rec.reads)
    return live


def _is_quantizing(rec: OpRecord) -> bool:
    """Whether this op shows the model is quantized (a quantizer, integer codes, a torch.ao quantized tensor)."""
    return (
        rec.op in QUANTIZERS
        or (rec.op in AO_FAKE_QUANT and not ao_fake_quant_off(rec.op, rec.args))
        or any(r.info.codes and r.static for r in rec.inputs)
        or any(r.dtype in _QUANTIZED_DTYPES for r in rec.inputs)
        or any(isinstance(a, torch.ScriptObject) for a in rec.args)
    )


@dataclass
class Accounts:
    """Rows (per example), unknown and free ops, and whether anything was quantized."""

    rows: list[LayerRow] = field(default_factory=list)
    unknown_ops: list[dict] = field(default_factory=list)
    free_ops: dict[str, int] = field(default_factory=dict)
    quantized: bool = False
    examples: int = 0
    dead: list[dict] = field(default_factory=list)


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
    dead: dict[tuple[str, str], dict] = {}
    dead_params: dict[tuple[str, str], dict] = {}  # per dead row: ParamUse by key
    memory_keys: dict = {}  # CostContext.key_of: derived tensors already charged, by the memory they hold

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

    def account_record(rec: OpRecord, ctx: CostContext, live: set[int], ops_count: bool, first: bool) -> None:
        nonlocal quantized
        if ops_count and _is_quantizing(rec):
            quantized = True
        module = ctx.module(rec)
        if isinstance(module, ObserverBase | FakeQuantizeBase) and rec.op not in AO_FAKE_QUANT:
            # Range tracking and its flags: quantizer bookkeeping, not model work.
            free["observer " + rec.op] = free.get("observer " + rec.op, 0) + 1
            return
        if not rec.dynamic:
            if rec.op in AO_FAKE_QUANT and rec.index in live:
                # A weight's fake-quantizer folds away at deploy time, but its scale and zero-point are stored.
                rule = RULES.get(rec.op)
                cost = rule(rec, ctx) if rule is not None else None
                if cost is not None and not isinstance(cost, list) and cost.params:
                    charge_params(row_for(rec.module, "quant", None), cost.params)
            return  # folded at deploy time
        if rec.index not in live:
            if ops_count:
                rule = RULES.get(rec.op)
                result = rule(rec, ctx) if rule is not None else None
                costs = result if isinstance(result, list) else [result] if result is not None else []
                bitops = sum(c.mult_bitops + c.add_bitops for c in costs)
                uses = [u for c in costs for u in (c.params or [])] if costs else []
                if costs and all(c.params is None for c in costs):
                    uses = [ctx.param(r, module=rec.module) for r in rec.inputs if r.static and r.info.stored]
                if bitops or uses:
                    entry = dead.setdefault(
                        (rec.module, rec.op), {"module": rec.module, "op": rec.op, "count": 0, "bitops": 0}
                    )
                    entry["count"] += 1
                    entry["bitops"] += bitops
                    for use in uses:
                        dead_params.setdefault((rec.module, rec.op), {})[use.key] = use
            return
        target = rec.args[0] if rec.args else None
        if rec.op.endswith("_") and getattr(target, "static", False) and target.info.stored:
            # In-place update of a buffer (run statistics, gate counters): bookkeeping, not model work.
            free["bookkeeping " + rec.op] = free.get("bookkeeping " + rec.op, 0) + 1
            return
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
            return
        for cost in result if isinstance(result, list) else [result]:
            key = row_for(cost.module if cost.module is not None else rec.module, cost.kind, cost)
            if ops_count:
                totals = raw[key]
                totals[0] += cost.mults
                totals[1] += cost.adds
                totals[2] += cost.mult_bitops
                totals[3] += cost.add_bitops
            row = rows[key]
            if cost.weight_numel is not None and first:
                row.weight_numel += cost.weight_numel
                row.weight_nnz += cost.weight_nnz or 0
            uses = cost.params
            if uses is None:
                uses = [ctx.param(r, module=rec.module) for r in rec.inputs if r.static and r.info.stored]
            charge_params(key, uses)

    for trace, ops_count in [*((t, True) for t in traces), *((t, False) for t in param_traces)]:
        ctx = CostContext(policy, trace, memory_keys=memory_keys)
        live = live_records(trace)
        for rec in trace.records:
            account_record(rec, ctx, live, ops_count, trace is traces[0])

    for key, row in rows.items():
        mults, adds, mult_bitops, add_bitops = raw[key]
        row.mults_raw = Fraction(mults, examples)
        row.adds_raw = Fraction(adds, examples)
        row.mult_bitops = Fraction(mult_bitops, examples)
        row.add_bitops = Fraction(add_bitops, examples)
    dead_rows = []
    for key, entry in dead.items():
        uses = [u for u in dead_params.get(key, {}).values() if u.key not in seen_params]
        param_bits = sum(storage_bits(u, policy.mask)[0] for u in uses)
        dead_rows.append(
            {
                "module": entry["module"],
                "op": entry["op"],
                "count": entry["count"] // max(len(traces), 1),
                "ops": float(Fraction(entry["bitops"], 32 * examples)),
                "params": param_bits / 32,
                "param_names": sorted(u.name for u in uses),
            }
        )
    kept = [
        r
        for r in rows.values()
        if r.param_bits or r.mult_bitops or r.add_bitops or r.kind == "unknown" or r.mults_raw or r.adds_raw
    ]
    return Accounts(kept, list(unknown.values()), dict(sorted(free.items())), quantized, examples, dead_rows)
