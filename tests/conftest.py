"""Suite-wide settings for `make test` (pytest-xdist, one worker per core, ``--dist loadgroup``).

Every test is put in the xdist group of its file, as ``--dist loadfile`` would (files share module- and
session-scoped fixtures), except the few long tests named in ``_OWN_GROUP`` that share no costly fixture with
the rest of their file. Under xdist the longest units are queued first, so the run does not end waiting on
one long file that started last.
"""

from __future__ import annotations

import os

import pytest
import torch

#: Long tests that use no module- or session-scoped fixture of their file worth sharing (seconds on the 2-core CI
#: machine): each is a work unit of its own.
_OWN_GROUP = frozenset({
    "tests/training/test_pipeline.py::test_two_process_gloo_ddp_keeps_replicas_identical",  # ~15 s, subprocesses
    "tests/training/test_pipeline.py::test_eval_cli_reads_riair2019_files_with_the_legacy_scaling",  # ~6 s
    "tests/training/test_pipeline.py::test_select_best_keeps_the_best_epoch_on_the_held_out_split",  # ~3 s
})

#: The longest work units, longest first (measured with ``--durations=0``); the rest follow in collection order.
_LONGEST_FIRST = (
    "tests/training/test_pipeline.py",  # the session-scoped eight-stage run (~30 s) and the resume test
    "tests/export/test_export.py",
    "tests/scoring/test_policies_cli.py",
    "tests/export/test_cli.py",
    "tests/models/test_zoo_registry.py",
    *sorted(_OWN_GROUP),
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


def _unit(item: pytest.Item) -> str:
    test = item.nodeid.split("[")[0]
    return test if test in _OWN_GROUP else item.nodeid.split("::")[0]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group tests by file (or alone, see ``_OWN_GROUP``); under xdist, queue the longest units first."""
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_unit(item)))
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a serial run keeps the plain collection order
        rank = {unit: index for index, unit in enumerate(_LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(_unit(item), len(rank)))
