"""Time `micronet models`: the zoo table after import (issue 9 target: <= 1 s), and where the time goes.

    .venv/bin/python benchmarks/models_speed.py [--repeats 5]

Each repeat is a fresh interpreter (the table is cached in-process), timed from after `import micronet.cli`
to the table printed (the import itself is `python -X importtime`'s business). Then one in-process pass per
zoo model: building it on the meta device, counting its parameters, and the shape-only MAC forward.
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import subprocess
import sys
import time

import micronet.cli  # noqa: F401  (what `micronet models` has loaded before it starts: torch's meta kernels)
from micronet.models import create, list_models
from micronet.models.summary import build_for_sizing, count_params, forward_macs

# Run in a child interpreter: everything after the import, as `micronet models` does it.
_CHILD = """
import io, time, contextlib
import micronet.cli
wall, cpu = time.perf_counter(), time.process_time()
with contextlib.redirect_stdout(io.StringIO()):
    micronet.cli.main(["models"{extra}], standalone_mode=False)
print(time.perf_counter() - wall, time.process_time() - cpu)
"""


def _table_seconds(as_json: bool) -> tuple[float, float]:
    code = _CHILD.format(extra=', "--json"' if as_json else "")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    wall, cpu = out.split()[-2:]
    return float(wall), float(cpu)


def _per_model() -> list[tuple[str, float, float, float]]:
    rows = []
    gc.disable()  # as describe_models does
    try:
        for name in list_models():
            start = time.perf_counter()
            model = build_for_sizing(functools.partial(create, name))
            built = time.perf_counter()
            count_params(model)
            counted = time.perf_counter()
            forward_macs(model, (3, 32, 32))
            rows.append((name, built - start, counted - built, time.perf_counter() - counted))
    finally:
        gc.enable()
    return rows


def main() -> None:
    """Run the benchmark and print the tables."""
    # Lazy: tabulate is a CLI dependency, only main() prints.
    from tabulate import tabulate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="Fresh interpreters per variant.")
    args = parser.parse_args()
    rows = []
    for label, as_json in (("micronet models", False), ("micronet models --json", True)):
        walls, cpus = zip(*(_table_seconds(as_json) for _ in range(args.repeats)), strict=True)
        rows.append((label, statistics.median(walls), min(walls), statistics.median(cpus)))
    # CPU time too: on a shared machine the wall time mostly measures the other processes.
    print(f"{len(list_models())} zoo models, {args.repeats} fresh processes each, seconds after import:")
    print(tabulate(rows, headers=["command", "median wall s", "min wall s", "median CPU s"], floatfmt=".3f"))
    print()
    per_model = _per_model()
    total = ("total", *(sum(row[i] for row in per_model) for i in (1, 2, 3)))
    print(tabulate([*per_model, total], headers=["model", "build (meta) s", "params s", "MAC forward s"],
                   floatfmt=".3f"))


if __name__ == "__main__":
    main()
