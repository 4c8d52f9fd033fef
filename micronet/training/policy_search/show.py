"""A readable summary of a policy file: op frequencies and probability/level histograms (and a plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from micronet.errors import MicronetError
from micronet.training.augment import AugmentPolicy

BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def _bin(value: float, top: float) -> int:
    x = value / top
    return min(int(x * (len(BINS) - 1)), len(BINS) - 2)


def policy_summary(policy: AugmentPolicy) -> dict[str, Any]:
    """Per op: how often it appears (count, and its share of all op slots, sub-policies weighted by their
    weights if any, so the shares sum to 1) and histograms of its probabilities and levels over five equal bins
    of [0, 1] ([0, 10] for TF levels)."""
    top = 10.0 if policy.levels == "tf-autoaugment" else 1.0
    weights = policy.weights or tuple(1.0 for _ in policy.subpolicies)
    total = sum(w * len(sub) for sub, w in zip(policy.subpolicies, weights))  # weighted op slots
    ops: dict[str, dict[str, Any]] = {}
    for sub, w in zip(policy.subpolicies, weights):
        for op in sub:
            row = ops.setdefault(op.name, {"count": 0, "share": 0.0, "probability": [0] * (len(BINS) - 1),
                                           "level": [0] * (len(BINS) - 1)})
            row["count"] += 1
            row["share"] += w / total
            row["probability"][_bin(op.probability, 1.0)] += 1
            row["level"][_bin(op.level, top)] += 1
    ordered = dict(sorted(ops.items(), key=lambda kv: (-kv[1]["share"], kv[0])))
    return {"name": policy.name, "subpolicies": len(policy.subpolicies),
            "ops_per_subpolicy": sorted({len(s) for s in policy.subpolicies}), "levels": policy.levels,
            "weighted": policy.weights is not None, "searched_on": policy.searched_on,
            "method": policy.metadata.get("metadata", {}).get("method"), "ops": ordered}


def plot_policy(summary: dict[str, Any], path: str | Path) -> Path:
    """Draw op shares and the probability/level histograms as a PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MicronetError("--plot needs matplotlib (pip install 'micronet[plot]')") from None
    names = list(summary["ops"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.35 * len(names) + 1.5))
    axes[0].barh(names, [summary["ops"][n]["share"] for n in names])
    axes[0].invert_yaxis()
    axes[0].set_title("share of ops")
    for ax, key in zip(axes[1:], ("probability", "level")):
        grid = [summary["ops"][n][key] for n in names]
        ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(len(BINS) - 1), [f"{BINS[i]:.1f}-{BINS[i + 1]:.1f}" for i in range(len(BINS) - 1)])
        ax.set_title(f"{key} histogram")
    fig.suptitle(f"{summary['name']}: {summary['subpolicies']} sub-policies")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
