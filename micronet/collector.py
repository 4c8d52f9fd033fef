"""``collector_paused``: Python's cyclic garbage collector paused for a block of work (a layer-free helper).

Building or scoring a network allocates some 10^5 small containers (modules, fx nodes, op records); each time
they cross the collector's thresholds it re-scans every object in the process, which is everything torch has
loaded: a quarter to a third of ``micronet models`` and of ``score()`` on a deep net. What the block leaves
behind is collected at the first collection after it.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector paused inside the block, and resumed after if it was running."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
