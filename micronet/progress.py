"""Progress bars: tqdm when asked for, a do-nothing bar otherwise.

tqdm is imported only when a bar is shown, so library code that reports progress (BN recalibration, scoring, the
training loop) still runs where tqdm is not installed, e.g. ``make gpu-check`` on a bare GPU machine.
"""

from __future__ import annotations

from typing import Any


class _NoBar:
    """The part of tqdm's interface that micronet calls, doing nothing."""

    total: int | None = None

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw: Any) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, desc: str, show: bool, unit: str = "it") -> Any:
    """A tqdm bar over ``total`` steps when ``show``, else one that does nothing."""
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
