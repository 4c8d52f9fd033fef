"""One intra-op thread for tests that train: deterministic, and faster than two on a shared 2-core machine."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block with one torch intra-op thread, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread_per_test() -> Iterator[None]:
    """Autouse in the conftests that import it (module- and session-scoped fixtures use ``one_thread``)."""
    with one_thread():
        yield
