"""ScoreReport: per-layer rows that add up to the totals, the score, and its text/JSON/CSV/plot forms.

Units: ``params`` are 32-bit-parameter units (storage bits / 32); ``mults``, ``adds`` and ``ops`` are
32-bit-op units (bit-weighted counts / 32); ``*_raw`` are plain operation counts. Everything is kept as
exact fractions and converted to float only for output.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from micronet.errors import MicronetError
from micronet.io import atomic_write
from micronet.scoring.policy import Policy, Track

LAYER_FIELDS = (
    "name",
    "kind",
    "module_type",
    "shape",
    "density",
    "weight_bits",
    "input_bits",
    "params",
    "mask_bits",
    "mults",
    "adds",
    "ops",
    "mults_raw",
    "adds_raw",
)


def _num(x: Fraction | int) -> float | int:
    """JSON number: an int when exact, else a float."""
    if isinstance(x, Fraction) and x.denominator != 1:
        return float(x)
    return int(x)


@dataclass
class LayerRow:
    """Costs charged to one (module, op kind) pair; counts are per example."""

    name: str
    kind: str
    module_type: str = ""
    shape: tuple[int, ...] = ()
    weight_bits: int | None = None
    input_bits: int | None = None
    weight_numel: int = 0
    weight_nnz: int = 0
    param_bits: int = 0
    mask_bits: int = 0
    mults_raw: Fraction = Fraction(0)
    adds_raw: Fraction = Fraction(0)
    mult_bitops: Fraction = Fraction(0)
    add_bitops: Fraction = Fraction(0)

    @property
    def density(self) -> float | None:
        """Nonzero fraction of the layer's weights (None for layers without weights)."""
        return self.weight_nnz / self.weight_numel if self.weight_numel else None

    @property
    def params(self) -> Fraction:
        """Storage in 32-bit-parameter units."""
        return Fraction(self.param_bits, 32)

    @property
    def mults(self) -> Fraction:
        """Multiplies (and other non-add ops) in 32-bit-op units."""
        return self.mult_bitops / 32

    @property
    def adds(self) -> Fraction:
        """Additions in 32-bit-op units."""
        return self.add_bitops / 32

    @property
    def ops(self) -> Fraction:
        """All math operations in 32-bit-op units."""
        return self.mults + self.adds

    def to_dict(self) -> dict[str, Any]:
        """JSON-able row."""
        return {
            "name": self.name,
            "kind": self.kind,
            "module_type": self.module_type,
            "shape": list(self.shape),
            "density": self.density,
            "weight_bits": self.weight_bits,
            "input_bits": self.input_bits,
            "params": _num(self.params),
            "mask_bits": _num(self.mask_bits),
            "mults": _num(self.mults),
            "adds": _num(self.adds),
            "ops": _num(self.ops),
            "mults_raw": _num(self.mults_raw),
            "adds_raw": _num(self.adds_raw),
        }


@dataclass
class ScoreReport:
    """The result of scoring one model under one policy and track."""

    policy: Policy
    track: Track
    layers: list[LayerRow]
    unknown_ops: list[dict[str, Any]] = field(default_factory=list)
    free_ops: dict[str, int] = field(default_factory=dict)
    samples: int = 1
    gate_rates: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    model: str = ""
    quantized: bool = False

    # Totals: sums of the rows, so the table always adds up.
    @property
    def params(self) -> Fraction:
        """Parameter storage in 32-bit units."""
        return sum((r.params for r in self.layers), Fraction(0))

    @property
    def mults(self) -> Fraction:
        """Multiplies in 32-bit-op units (per example)."""
        return sum((r.mults for r in self.layers), Fraction(0))

    @property
    def adds(self) -> Fraction:
        """Additions in 32-bit-op units (per example)."""
        return sum((r.adds for r in self.layers), Fraction(0))

    @property
    def ops(self) -> Fraction:
        """Math operations in 32-bit-op units (per example)."""
        return self.mults + self.adds

    @property
    def mults_raw(self) -> Fraction:
        """Plain multiply count (per example)."""
        return sum((r.mults_raw for r in self.layers), Fraction(0))

    @property
    def adds_raw(self) -> Fraction:
        """Plain add count (per example)."""
        return sum((r.adds_raw for r in self.layers), Fraction(0))

    @property
    def param_score(self) -> float:
        """params / baseline params."""
        return float(self.params / self.track.baseline_params)

    @property
    def op_score(self) -> float:
        """ops / baseline ops."""
        return float(self.ops / self.track.baseline_ops)

    @property
    def score(self) -> float:
        """The MicroNet score: params/P_base + ops/O_base (lower is better; the baseline scores 2)."""
        return float(self.params / self.track.baseline_params + self.ops / self.track.baseline_ops)

    def by_kind(self) -> dict[str, dict[str, float | int]]:
        """Totals per op kind (conv, linear, affine, relu, ...)."""
        kinds: dict[str, list[LayerRow]] = {}
        for row in self.layers:
            kinds.setdefault(row.kind, []).append(row)
        out = {}
        for kind, rows in kinds.items():
            out[kind] = {
                "params": _num(sum((r.params for r in rows), Fraction(0))),
                "mults": _num(sum((r.mults for r in rows), Fraction(0))),
                "adds": _num(sum((r.adds for r in rows), Fraction(0))),
                "ops": _num(sum((r.ops for r in rows), Fraction(0))),
                "mults_raw": _num(sum((r.mults_raw for r in rows), Fraction(0))),
                "adds_raw": _num(sum((r.adds_raw for r in rows), Fraction(0))),
                "layers": len(rows),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        """One JSON-able object: score, totals, baseline, policy (name and fields), layers, by_kind."""
        policy_fields = {k: v for k, v in self.policy.to_dict().items() if k != "name"}
        return {
            "model": self.model,
            "score": self.score,
            "param_score": self.param_score,
            "op_score": self.op_score,
            "params": _num(self.params),
            "ops": _num(self.ops),
            "mults": _num(self.mults),
            "adds": _num(self.adds),
            "mults_raw": _num(self.mults_raw),
            "adds_raw": _num(self.adds_raw),
            "units": "params: 32-bit parameters; ops/mults/adds: 32-bit ops per example; *_raw: counts",
            "policy": self.policy.name,
            **policy_fields,
            "track": self.track.name,
            "baseline": {
                "params": self.track.baseline_params,
                "ops": self.track.baseline_ops,
                "model": self.track.baseline_model,
            },
            "quantized": self.quantized,
            "samples": self.samples,
            "gate_rates": self.gate_rates,
            "notes": self.notes,
            "layers": [r.to_dict() for r in self.layers],
            "by_kind": self.by_kind(),
            "unknown_ops": self.unknown_ops,
            "free_ops": self.free_ops,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The to_dict() object as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def table(self, max_rows: int | None = None) -> str:
        """Human-readable report: per-layer table, totals by kind, totals and the score."""
        from tabulate import tabulate

        def fmt(x: Fraction) -> str:
            return f"{float(x):,.1f}" if x else "0"

        rows = self.layers if max_rows is None else self.layers[:max_rows]
        body = [
            [
                r.name or "(root)",
                r.kind,
                "x".join(map(str, r.shape)),
                "" if r.density is None else f"{r.density:.3f}",
                r.weight_bits or "",
                r.input_bits or "",
                fmt(r.params),
                fmt(r.mults),
                fmt(r.adds),
                fmt(r.ops),
            ]
            for r in rows
        ]
        headers = ["layer", "kind", "shape", "density", "w bits", "in bits", "params", "mults", "adds", "ops"]
        banner = [n for n in self.notes if n.startswith("PROJECTION")]
        parts = [*banner, tabulate(body, headers=headers, tablefmt="simple", disable_numparse=True)]
        if max_rows is not None and len(self.layers) > max_rows:
            parts.append(f"... {len(self.layers) - max_rows} more rows (use --json or --csv for all)")
        kinds = [
            [
                k,
                f"{v['params']:,.1f}",
                f"{v['mults']:,.1f}",
                f"{v['adds']:,.1f}",
                f"{v['ops']:,.1f}",
                v["layers"],
            ]
            for k, v in self.by_kind().items()
        ]
        parts.append("\nby kind (32-bit units, per example)")
        parts.append(
            tabulate(
                kinds,
                headers=["kind", "params", "mults", "adds", "ops", "rows"],
                tablefmt="simple",
                disable_numparse=True,
            )
        )
        parts.append("")
        parts.append(f"policy {self.policy.name}: {self.policy.description}")
        parts.append(
            f"track {self.track.name}: baseline {self.track.baseline_model} "
            f"{self.track.baseline_params:,} params, {self.track.baseline_ops:,} ops"
        )
        parts.append(
            f"params  {float(self.params):,.2f}  (32-bit units)   param score {self.param_score:.6f}"
        )
        parts.append(
            f"ops     {float(self.ops):,.2f}  = mults {float(self.mults):,.2f} + adds {float(self.adds):,.2f}"
            f"  (32-bit units per example; raw {int(self.mults_raw):,} mults, {int(self.adds_raw):,} adds)"
            f"   op score {self.op_score:.6f}"
        )
        parts.append(f"score   {self.score:.6f}")
        if self.samples > 1:
            parts.append(f"ops are the mean over {self.samples} examples")
        for gate, rate in self.gate_rates.items():
            parts.append(f"gate {gate}: executed for {rate:.1%} of examples")
        if self.unknown_ops:
            names = ", ".join(f"{u['op']} x{u['count']}" for u in self.unknown_ops)
            parts.append(f"WARNING: ops with no cost rule (not counted): {names}")
        parts.extend(f"note: {n}" for n in self.notes)
        return "\n".join(parts)

    def write_csv(self, path: str | Path, force: bool = False) -> None:
        """Write the layer rows as CSV (one row per layer and op kind), atomically; ``force`` to overwrite."""

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=LAYER_FIELDS, extrasaction="ignore")
                writer.writeheader()
                for row in self.layers:
                    d = row.to_dict()
                    d["shape"] = "x".join(map(str, row.shape))
                    writer.writerow(d)

        atomic_write(path, write, force=force)

    def plot(self, path: str | Path, force: bool = False) -> None:
        """Bar chart of each row's share of the param and op scores (needs matplotlib), written atomically;
        ``force`` to overwrite."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise MicronetError("--plot needs matplotlib: pip install 'micronet[plot]'") from None
        rows = [r for r in self.layers if r.params or r.ops]
        names = [f"{r.name or '(root)'} [{r.kind}]" for r in rows]
        p = [float(r.params / self.track.baseline_params) for r in rows]
        o = [float(r.ops / self.track.baseline_ops) for r in rows]
        fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.12), 5))
        xs = range(len(rows))
        ax.bar(xs, p, label="param score", color="tab:blue")
        ax.bar(xs, o, bottom=p, label="op score", color="tab:orange")
        ax.set_ylabel("score contribution")
        ax.set_title(
            f"{self.model or 'model'}: score {self.score:.5f} ({self.policy.name}, {self.track.name})"
        )
        if len(rows) <= 60:
            ax.set_xticks(list(xs), names, rotation=90, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_xlabel(f"{len(rows)} layers in execution order")
        ax.legend()
        fig.tight_layout()
        suffix = Path(path).suffix.lstrip(".").lower() or "png"
        try:
            # The temp file's name ends in .tmp, so name the format from the real path's suffix.
            atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=suffix), force=force)
        except ValueError as exc:  # e.g. an extension matplotlib has no writer for
            raise MicronetError(f"cannot write plot {path}: {str(exc).splitlines()[0]}") from None
        finally:
            plt.close(fig)
