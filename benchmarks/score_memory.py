"""Peak memory of `micronet.scoring.score` against a plain forward pass, each in a fresh process.

    .venv/bin/python benchmarks/score_memory.py [--models densenet100_k12 pyramidnet272_a200] [--repeat 5]

For each model a child process builds it, then samples its resident set size (RSS, /proc/self/statm) every
millisecond while it runs either a no-grad eval forward (batch 1, the track's input size) or `score()`
(official policy), twice. Its figure: the peak RSS over the process's RSS just after building the model, in MB.
One such figure varies by up to ±25% from run to run (the C allocator's placement), so each is measured in
``--repeat`` fresh processes: printed are the medians, their ratio (the target's figure), and the largest score
figure over the median forward (the worst case seen).
`score()` scores a deploy form that shares the caller's weights read-only and computes folded weights per op
(its cost rules read only where a weight is nonzero, found a few channels at a time). Target: score <= 2x forward.
Linux only (reads /proc). RSS also holds what the C allocator keeps after a free: glibc raises its mmap threshold
to the largest block freed (up to 32 MB), so later blocks of a weight's size come from the heap and stay counted
after they are freed. `MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/score_memory.py` fixes the threshold and
shows the memory actually live.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from tabulate import tabulate

MODELS = ("densenet100_k12", "pyramidnet272_a200", "wrn28_10", "torchvision:resnet18")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def _child(name: str, mode: str) -> dict:
    """Run one measurement in this (fresh) process and return its figures."""
    import torch

    from micronet.io import create_model
    from micronet.scoring import score

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = create_model(name).eval()
    imagenet = name.startswith(("torchvision:", "timm:"))
    size = 224 if imagenet else 32
    x = torch.randn(1, 3, size, size)
    track = "imagenet" if imagenet else "cifar100"

    def step() -> None:
        if mode == "forward":
            with torch.no_grad():
                model(x)
        else:
            score(model, track=track)

    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    start = _rss()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    step()  # twice: the first run pays one-time costs (kernels, allocator pools), the second shows any growth
    step()
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss())
    return {"peak_over_start": peak[0] - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--repeat", type=lambda v: max(int(v), 1), default=5,
                        help="fresh processes per model and mode (default 5, at least 1)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    rows = []
    mb = 1 / 2**20
    for name in args.models:
        got: dict[str, list[int]] = {"forward": [], "score": []}
        for _ in range(args.repeat):
            for mode in ("forward", "score"):
                out = subprocess.run([sys.executable, __file__, "--child", name, mode], capture_output=True,
                                     text=True, check=True)
                got[mode].append(json.loads(out.stdout.strip().splitlines()[-1])["peak_over_start"])
        fwd, sc = statistics.median(got["forward"]), statistics.median(got["score"])
        rows.append([name, f"{fwd * mb:,.1f}", f"{sc * mb:,.1f}", f"{sc / max(fwd, 1):.2f}",
                     f"{max(got['score']) / max(fwd, 1):.2f}"])
    print(tabulate(rows, headers=["model", "forward MB (median)", "score MB (median)", "score/forward",
                                  "worst score/forward"], disable_numparse=True))
    print(f"({args.repeat} fresh processes per model and mode)")


if __name__ == "__main__":
    main()
