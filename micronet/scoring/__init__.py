"""The MicroNet scorer: trace one forward at the aten level, price every op under a named policy.

``score(model, policy="official", track="cifar100") -> ScoreReport`` (files load through ``micronet.io``).
See docs/architecture.md ("Scoring data flow") and spec scoring.md for the conventions.
"""

from micronet.scoring.accumulators import accumulate, adder_tree_bitadds
from micronet.scoring.api import INPUT_DTYPES, score
from micronet.scoring.policy import PRESETS, TRACKS, Policy, Track, get_track, list_policies, resolve_policy
from micronet.scoring.report import LayerRow, ScoreReport
from micronet.scoring.rules import RULES, Cost, register

__all__ = [
    "INPUT_DTYPES",
    "PRESETS",
    "RULES",
    "TRACKS",
    "Cost",
    "LayerRow",
    "Policy",
    "ScoreReport",
    "Track",
    "accumulate",
    "adder_tree_bitadds",
    "get_track",
    "list_policies",
    "register",
    "resolve_policy",
    "score",
]
