"""Time `micronet.scoring.score` against a plain forward pass and thop on the same models, same run.

    .venv/bin/python benchmarks/score_speed.py [--models densenet100_k12 ...] [--repeats 3] [--threads 1]

Prints a table: median wall time (``--clock cpu``: process CPU time) of a no-grad forward (batch 1, 32x32),
of `compress.deploy_form` (the copy, rewrite and merge every score pays), of `score()` (official policy, float
model: deploy form, one traced forward, accounting), of a process's first `score()` (in a fresh process: one-time
costs included), of `thop.profile`, and the ratios. Target: score <= ~1.5 forward passes plus the deploy form,
no slower than thop.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import time

import torch

from micronet.compress import deploy_form
from micronet.io import create_model
from micronet.scoring import score

MODELS = ("densenet100_k12", "pyramidnet272_a200", "wrn28_10")


CLOCKS = {"wall": "perf_counter", "cpu": "process_time"}


def _median_time(fn, repeats: int, clock: str) -> float:
    now = getattr(time, CLOCKS[clock])
    fn()  # warm-up: lazy imports, allocator
    times = []
    for _ in range(repeats):
        start = now()
        fn()
        times.append(now() - start)
    return statistics.median(times)


def _first_score(name: str, threads: int, clock: str) -> float:
    """Time of the first score() in a fresh process (model built and imports done beforehand)."""
    now = CLOCKS[clock]
    code = (f"import time, torch; torch.set_num_threads({threads}); from micronet.io import create_model; "
            f"from micronet.scoring import score; m = create_model({name!r}).eval(); t = time.{now}(); "
            f"score(m); print(time.{now}() - t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run the benchmark and print the table."""
    # Lazy: keeps the module importable where tabulate is not installed (only main() prints).
    from tabulate import tabulate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="cpu: process CPU time, steadier than wall time on a shared machine (threads=1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import thop
    except ImportError:
        thop = None
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name).eval()
        x = torch.randn(1, 3, 32, 32)

        def forward(model=model, x=x):
            with torch.no_grad():
                model(x)

        t_first = _first_score(name, args.threads, args.clock)
        t_fwd = _median_time(forward, args.repeats, args.clock)
        t_deploy = _median_time(lambda model=model: deploy_form(model), args.repeats, args.clock)
        t_score = _median_time(lambda model=model: score(model), args.repeats, args.clock)
        t_thop = float("nan")
        if thop is not None:
            # thop leaves buffers on the model it profiles: give each call a fresh copy, made untimed.
            copies = [copy.deepcopy(model) for _ in range(args.repeats + 1)]

            def run_thop(copies=copies, x=x):
                thop.profile(copies.pop(), inputs=(x,), verbose=False)

            t_thop = _median_time(run_thop, args.repeats, args.clock)
        rows.append([name, f"{t_fwd * 1e3:.0f}", f"{t_deploy * 1e3:.0f}", f"{t_score * 1e3:.0f}",
                     f"{t_first * 1e3:.0f}", f"{t_thop * 1e3:.0f}", f"{t_score / t_fwd:.2f}",
                     f"{(t_score - t_deploy) / t_fwd:.2f}", f"{t_score / t_thop:.2f}"])
    headers = ["model", "forward ms", "deploy_form ms", "score ms", "first score ms", "thop ms", "score/forward",
               "(score - deploy)/forward", "score/thop"]
    print(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))
    print(f"threads={args.threads}, repeats={args.repeats}, median {args.clock} time, CPU, batch 1, 32x32")


if __name__ == "__main__":
    main()
