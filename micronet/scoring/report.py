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


def _count(x: Fraction | int | float, places: int = 1) -> str:
    """A count for people: ``1,234`` when whole, else ``1,234.6`` (``places`` decimals); never ``1,234.0``."""
    if x == int(x):
        return f"{int(x):,}"
    return f"{float(x):,.{places}f}"


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
class DynamicCompute:
    """A dynamic (gated) model's compute beyond the mean: worst case, gate network, spread over examples."""

    label: str  # how the mean was obtained: "mean over N real test images" or "estimate over N images ..."
    images: int
    real_images: bool
    worst_ops: Fraction  # every gate open, 32-bit-op units per example
    worst_op_score: float
    gate_ops: Fraction  # the gate network's own ops (mean per example; included in the totals)
    gate_params: Fraction  # and its parameters (32-bit units; included in the totals)
    ops_per_example: list[float] = field(default_factory=list)

    def to_dict(self, track: Track, params: Fraction) -> dict[str, Any]:
        """JSON-able fields, with the all-gates-open score."""
        return {
            "label": self.label,
            "images": self.images,
            "real_images": self.real_images,
            "worst_case_ops": _num(self.worst_ops),
            "worst_case_op_score": self.worst_op_score,
            "worst_case_score": float(params / track.baseline_params) + self.worst_op_score,
            "gate_network_ops": _num(self.gate_ops),
            "gate_network_params": _num(self.gate_params),
            "ops_per_example": self.ops_per_example,
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
    dynamic: DynamicCompute | None = None
    notes: list[str] = field(default_factory=list)
    model: str = ""
    quantized: bool = False
    input_shape: tuple[int, ...] = ()  # one example's shape, batch 1 first
    input_dtype: str = "float32"  # e.g. int64 for token ids
    input_bits: int = 32  # the width the input was charged at
    dead: list[dict[str, Any]] = field(default_factory=list)  # work whose result never reaches the output

    @property
    def complete(self) -> bool:
        """True when every op had a cost rule (otherwise the totals are a lower bound)."""
        return not self.unknown_ops

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
            "complete": self.complete,
            "input_shape": list(self.input_shape),
            "input_size": list(self.input_shape[2:]) if len(self.input_shape) == 4 else None,
            "input_dtype": self.input_dtype,
            "input_bits": self.input_bits,
            "samples": self.samples,
            "gate_rates": self.gate_rates,
            "dynamic": self.dynamic.to_dict(self.track, self.params) if self.dynamic else None,
            "notes": self.notes,
            "layers": [r.to_dict() for r in self.layers],
            "by_kind": self.by_kind(),
            "unknown_ops": self.unknown_ops,
            "free_ops": self.free_ops,
            "dead": self.dead,
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The to_dict() object as JSON text."""
        return json.dumps(self.to_dict(), indent=indent)

    def table(self, max_rows: int | None = None) -> str:
        """Human-readable report: per-layer table, totals by kind, totals and the score."""
        from tabulate import tabulate

        fmt = _count

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
                _count(v["params"]),
                _count(v["mults"]),
                _count(v["adds"]),
                _count(v["ops"]),
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
            f"params  {_count(self.params, 2)}  (32-bit units)   param score {self.param_score:.6f}"
        )
        parts.append(
            f"ops     {_count(self.ops, 2)}  = mults {_count(self.mults, 2)} + adds {_count(self.adds, 2)}"
            f"  (32-bit units per example; raw {int(self.mults_raw):,} mults, {int(self.adds_raw):,} adds)"
            f"   op score {self.op_score:.6f}"
        )
        bound = "" if self.complete else "   LOWER BOUND: some ops have no cost rule (see WARNING)"
        parts.append(f"score   {self.score:.6f}{bound}")
        if self.input_shape:
            parts.append(f"input   {'x'.join(map(str, self.input_shape[1:]))} {self.input_dtype} per example, "
                         f"charged at {self.input_bits} bits")
        if self.samples > 1:
            parts.append(f"ops are the mean over {self.samples} examples")
        if self.dynamic is not None:
            d = self.dynamic.to_dict(self.track, self.params)
            parts.append(f"dynamic score: {d['label']}")
            parts.append(f"worst case (every gate open): ops {_count(self.dynamic.worst_ops, 2)}   "
                         f"op score {d['worst_case_op_score']:.6f}   score {d['worst_case_score']:.6f}")
            parts.append(f"gate network (included above): ops {_count(self.dynamic.gate_ops, 2)}   "
                         f"params {_count(self.dynamic.gate_params, 2)}")
        for gate, rate in self.gate_rates.items():
            parts.append(f"gate {gate}: executed for {rate:.1%} of examples")
        if self.unknown_ops:
            names = ", ".join(f"{u['op']} x{u['count']}" for u in self.unknown_ops)
            parts.append(f"WARNING: ops with no cost rule (not counted): {names}")
        for d in self.dead:
            parts.append(
                f"dead: {d['module'] or '(root)'} {d['op']} x{d['count']}: result never reaches the output, not "
                f"charged (would cost {_count(d['ops'])} ops, {_count(d['params'])} params)"
            )
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
        """Draw :meth:`figure` to a PNG (needs matplotlib), written atomically; ``force`` to overwrite."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise MicronetError("--plot needs matplotlib: pip install 'micronet[plot]'") from None
        fig = self.figure(plt)
        suffix = Path(path).suffix.lstrip(".").lower() or "png"
        try:
            # The temp file's name ends in .tmp, so name the format from the real path's suffix.
            atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=suffix), force=force)
        except ValueError as exc:  # e.g. an extension matplotlib has no writer for
            raise MicronetError(f"cannot write plot {path}: {str(exc).splitlines()[0]}") from None
        finally:
            plt.close(fig)

    def figure(self, plt: Any) -> Any:
        """Three panels of score contributions (param and op parts stacked): per block in execution order with the
        network's stages marked, the top layers, and the op kinds. ``plt`` is ``matplotlib.pyplot``."""
        from matplotlib.ticker import FuncFormatter  # matplotlib is optional: only a plot needs it

        rows = [r for r in self.layers if r.params or r.ops]
        pb, ob = self.track.baseline_params, self.track.baseline_ops
        blocks = _blocks(rows)
        top = sorted(rows, key=lambda r: -(r.params / pb + r.ops / ob))[:15]
        kinds = sorted(self.by_kind().items(), key=lambda kv: -(kv[1]["params"] / pb + kv[1]["ops"] / ob))
        kinds = [(k, v) for k, v in kinds if v["params"] or v["ops"]]
        colours = {"param": "#1f77b4", "op": "#ff7f0e"}
        plain = FuncFormatter(_plain_number)

        lower = 0.26 * max(len(top), len(kinds)) + 1.2
        dynamic = self.dynamic is not None and bool(self.dynamic.ops_per_example)
        heights = [5.0, lower, 3.0] if dynamic else [5.0, lower]
        fig = plt.figure(figsize=(14, sum(heights)), layout="constrained")
        grid = fig.add_gridspec(len(heights), 2, height_ratios=heights)
        ax = fig.add_subplot(grid[0, :])
        xs = list(range(len(blocks)))
        p = [float(sum((r.params for r in rs), Fraction(0)) / pb) for _, _, rs in blocks]
        o = [float(sum((r.ops for r in rs), Fraction(0)) / ob) for _, _, rs in blocks]
        ax.bar(xs, p, color=colours["param"], label="param score (params / baseline params)", width=0.8)
        ax.bar(xs, o, bottom=p, color=colours["op"], label="op score (ops / baseline ops)", width=0.8)
        size = 7 if len(blocks) <= 60 else 5
        ax.set_xticks(xs, [name for _, name, _ in blocks], rotation=90, fontsize=size)
        ax.set_xlim(-0.7, len(blocks) - 0.3)
        ax.yaxis.set_major_formatter(plain)
        ax.set_ylabel("score contribution")
        ax.set_title(f"per block, in execution order ({len(rows)} layer rows in {len(blocks)} blocks; shaded: "
                     "stages of the network)", fontsize=10)
        stage_runs: list[tuple[str, int, int]] = []
        for i, (stage, _, _) in enumerate(blocks):
            if stage_runs and stage_runs[-1][0] == stage:
                stage_runs[-1] = (stage, stage_runs[-1][1], i)
            else:
                stage_runs.append((stage, i, i))
        top_y = max((a + b for a, b in zip(p, o)), default=0) or 1.0
        ax.set_ylim(0, top_y * 1.12)
        for j, (stage, first, last) in enumerate(stage_runs):
            if last > first:  # a stage of several blocks: shade it and name it above its bars
                ax.axvspan(first - 0.45, last + 0.45, color="0.93" if j % 2 else "0.86", zorder=0)
                ax.text((first + last) / 2, top_y * 1.06, stage, ha="center", va="center", fontsize=9,
                        fontweight="bold")

        ax_top = fig.add_subplot(grid[1, 0])
        ys = list(range(len(top)))[::-1]
        tp = [float(r.params / pb) for r in top]
        to = [float(r.ops / ob) for r in top]
        ax_top.barh(ys, tp, color=colours["param"])
        ax_top.barh(ys, to, left=tp, color=colours["op"])
        ax_top.set_yticks(ys, [f"{r.name or '(root)'} [{r.kind}]" for r in top], fontsize=8)
        ax_top.xaxis.set_major_formatter(plain)
        ax_top.set_xlabel("score contribution")
        ax_top.set_title(f"top {len(top)} layer rows", fontsize=10)
        ax_top.legend(*ax.get_legend_handles_labels(), loc="lower right", fontsize=8, framealpha=0.9)

        ax_kind = fig.add_subplot(grid[1, 1])
        ys = list(range(len(kinds)))[::-1]
        kp = [float(Fraction(v["params"]) / pb) for _, v in kinds]
        ko = [float(Fraction(v["ops"]) / ob) for _, v in kinds]
        ax_kind.barh(ys, kp, color=colours["param"])
        ax_kind.barh(ys, ko, left=kp, color=colours["op"])
        ax_kind.set_yticks(ys, [f"{k} ({v['layers']} rows)" for k, v in kinds], fontsize=8)
        ax_kind.xaxis.set_major_formatter(plain)
        ax_kind.set_xlabel("score contribution")
        ax_kind.set_title("by op kind", fontsize=10)
        totals = [a + b for a, b in zip(kp, ko)]
        for y, v in zip(ys, totals):  # each kind's share of the whole score
            ax_kind.text(v, y, f" {100 * v / (sum(totals) or 1.0):.1f}%", va="center", fontsize=7)
        ax_kind.set_xlim(0, max(totals, default=1.0) * 1.18 or 1.0)

        if dynamic:  # a gated model: how its ops spread over the examples, against every gate open
            hist = fig.add_subplot(grid[2, :])
            hist.hist(self.dynamic.ops_per_example, bins=20, color=colours["op"])
            hist.axvline(float(self.dynamic.worst_ops), color="black", linestyle="--", label="every gate open")
            hist.set(xlabel="ops per example (32-bit units)", ylabel="examples",
                     title=f"ops per example: {self.dynamic.label}")
            hist.legend(fontsize=8)

        fig.suptitle(f"{self.model or 'model'}: score {self.score:.4f} = param {self.param_score:.4f} + op "
                     f"{self.op_score:.4f}  ({self.policy.name} policy, {self.track.name} baseline)", fontsize=12)
        return fig


def _plain_number(value: float, _position: Any = None) -> str:
    """Axis labels as plain decimals (no 1e-5 offsets): enough digits for the value, trailing zeros dropped."""
    if value == 0:
        return "0"
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0", "0") else f"{value:.2g}"


def _blocks(rows: list[LayerRow]) -> list[tuple[str, str, list[LayerRow]]]:
    """Consecutive layer rows grouped by block: ``(stage, block, rows)`` in execution order.

    The stage is the first name component where the rows differ (``block1``, ``layer2``); the block adds the
    next component when it is an index (``block1.3``), so repeated blocks of one stage are told apart."""
    parts = [(r.name or "(root)").split(".") for r in rows]
    depth = 0
    while len({tuple(p[: depth + 1]) for p in parts}) < 2 and any(len(p) > depth + 1 for p in parts):
        depth += 1  # skip a wrapper every name shares (features.*)
    groups: list[tuple[str, str, list[LayerRow]]] = []
    for row, p in zip(rows, parts):
        stage = ".".join(p[: depth + 1])
        block = ".".join(p[: depth + 2]) if len(p) > depth + 2 and p[depth + 1].isdigit() else stage
        if groups and groups[-1][1] == block:
            groups[-1][2].append(row)
        else:
            groups.append((stage, block, [row]))
    return groups


# ----------------------------------------------------------------------------------------------- gates
def format_gate_summary(summary: dict[str, Any]) -> str:
    """A few text lines for a gate summary (``GateStats.summary()``): blocks, MACs and per-gate rates."""
    rates = " ".join(f"{r:.2f}" for r in summary["gate_rates"])
    return "\n".join([
        f"gates over {summary['images']} images: executed blocks {summary['executed_blocks_mean']:.2f} of "
        f"{summary['gated_blocks']} per image (mean)",
        f"MACs per image {summary['macs_per_image_mean']:,.0f} (all gates open {summary['macs_all_open']:,}, "
        f"all shut {summary['macs_all_shut']:,}; {summary['macs_skipped_fraction']:.1%} skipped)",
        f"per-gate execution rates: {rates}",
    ])


def plot_gate_summary(summary: dict[str, Any], path: str | Path, title: str = "") -> None:
    """Per-gate execution rates and the executed-blocks / MACs-per-image histograms (PNG; needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MicronetError("--plot needs matplotlib: pip install 'micronet[plot]'") from None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rates = summary["gate_rates"]
    axes[0].bar(range(len(rates)), rates, color="tab:blue")
    axes[0].set(xlabel="gate", ylabel="execution rate", ylim=(0, 1), title="per-gate execution rate")
    blocks = summary["executed_blocks_hist"]
    axes[1].bar(range(len(blocks)), blocks, color="tab:green")
    axes[1].set(xlabel="gated blocks executed", ylabel="images",
                title=f"executed blocks (mean {summary['executed_blocks_mean']:.2f} of {summary['gated_blocks']})")
    edges, hist = summary["macs_hist_edges"], summary["macs_hist"]
    width = max(edges[1] - edges[0], 1.0) / 1e6
    axes[2].bar([e / 1e6 for e in edges[:-1]], hist, width=width, align="edge", color="tab:orange")
    axes[2].set(xlabel="MMACs per image", ylabel="images",
                title=f"MACs per image (mean {summary['macs_per_image_mean'] / 1e6:.3f} M)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except (OSError, ValueError) as exc:
        raise MicronetError(f"cannot write plot {path}: {str(exc).splitlines()[0]}") from None
    finally:
        plt.close(fig)
