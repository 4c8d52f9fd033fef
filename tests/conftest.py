"""Suite-wide settings for `make test` (pytest-xdist, one worker per core, ``--dist loadfile``)."""

from __future__ import annotations

import os

import pytest
import torch

#: The longest test files (measured with ``--durations=0`` on the 2-core CI machine), longest first. Under xdist they
#: are queued first (with ``--no-loadscope-reorder``), so the run does not end waiting on one long file that
#: started last; the rest follow in collection order. (xdist's own reordering sorts files by test count.)
_LONGEST_FIRST = (
    "tests/export/test_exact.py",  # full-size winner-format exports checked against float64
    "tests/training/test_pipeline.py",  # the session-scoped eight-stage run, DDP and resume tests
    "tests/export/test_export.py",
    "tests/scoring/test_policies_cli.py",
    "tests/export/test_cli.py",
    "tests/scoring/test_ecosystem_rules.py",
    "tests/models/test_zoo_registry.py",
    "tests/compress/test_integer.py",
    "tests/scoring/test_riair2019.py",
    "tests/scoring/test_baselines.py",
    "tests/models/test_shakedrop.py",
)


def pytest_configure(config: pytest.Config) -> None:
    """One torch intra-op thread per xdist worker."""
    # Workers already fill the cores: their own intra-op threads would only oversubscribe them (on the 2-core CI
    # machine, two workers x two threads made a float64 DenseNet score several times slower).
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the longest files first (a serial run keeps the plain collection order)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {path: index for index, path in enumerate(_LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))
