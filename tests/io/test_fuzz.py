"""Property-based fuzzing of every file reader: each mutant of a valid file ends in a one-line error naming the
file or in a correct result, never a traceback, a wrong result or a hang (issue 12).

Mutants come from benchmarks/fuzz_loaders.py (the same targets and mutators its large runs use), drawn by
hypothesis with a fixed seed and a bounded number of examples per format, so the suite is repeatable and fast.
The counts of every run are printed at the end of the module (``pytest -s``) and written to the pytest cache
folder as ``fuzz_counts.json``.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import fuzz_loaders  # noqa: E402 - a benchmark script, importable from its folder

# Examples per format: enough to reach every structured mutator several times, ~35 s in all on 2 cores.
EXAMPLES = {"micronet": 70, "state_dict": 40, "riair2019": 24, "cifar_pickle": 40, "npz": 30, "npy": 30,
            "image_folder": 30, "recipe": 60, "aug_policy": 40, "score_policy": 40, "resume": 40}
COUNTS: dict[str, Counter] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    yield
    total = sum(COUNTS.values(), Counter())
    lines = [f"{name:<14} " + " ".join(f"{o}={c[o]}" for o in ("tried", *fuzz_loaders.OUTCOMES))
             for name, c in [*COUNTS.items(), ("TOTAL", total)]]
    print("\nfuzz counts:\n" + "\n".join(lines))
    if getattr(request.config, "cache", None) is not None:
        request.config.cache.set("micronet/fuzz_counts", {k: dict(v) for k, v in [*COUNTS.items(), ("TOTAL", total)]})


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_mutants_fail_cleanly_or_load_correctly(name, workdir):
    target = fuzz_loaders.TARGETS[name]()
    target.setup(workdir / name)
    counts = COUNTS.setdefault(name, Counter())
    findings: list[str] = []

    @settings(max_examples=EXAMPLES[name], derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(rng=st.randoms(use_true_random=False))
    def check(rng):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols of the mutants
            kind, data = target.mutate(rng)
            outcome, detail = fuzz_loaders.run_mutant(target, kind, data, timeout=5.0)
        counts["tried"] += 1
        counts[outcome] += 1
        if outcome not in ("clean", "success"):
            findings.append(f"{outcome}: {detail}")

    check()
    assert not findings, "\n".join(findings[:10])
    assert counts["tried"] >= EXAMPLES[name] and counts["clean"] > 0


def test_counts_json_round_trips():
    assert json.loads(json.dumps({k: dict(v) for k, v in COUNTS.items()})) == {k: dict(v) for k, v in COUNTS.items()}
