"""Peak memory of `micronet.scoring.score` against a plain forward pass, each in a fresh process.

    .venv/bin/python benchmarks/score_memory.py [--models densenet100_k12 pyramidnet272_a200 torchvision:resnet18]

For each model a child process builds it, then samples its resident set size (RSS, /proc/self/statm) every
millisecond while it runs either a no-grad eval forward (batch 1, the track's input size) or `score()`
(official policy), twice. Printed: the peak RSS over the process's RSS just after building the model, in MB,
and the ratio.
`score()` scores a deploy form that shares the caller's weights read-only and computes folded weights per op;
"score - copy" subtracts the size of the parameters and buffers (what a full copy would hold), clamped at 0.
Target: score <= 2x forward.
Linux only (reads /proc). RSS also holds what the C allocator keeps after a free: glibc raises its mmap threshold
to the largest block freed (up to 32 MB), so later blocks of a weight's size come from the heap and stay counted
after they are freed. `MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/score_memory.py` fixes the threshold and
shows the memory actually live (measured on wrn28_10: score 70.9 MB over a 32.7 MB forward with glibc's
default, 48.7 MB over 28.5 MB with the threshold fixed).
"""

from __future__ import annotations

import argparse
import json
import os
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
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
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
    return {"peak_over_start": peak[0] - start, "model_bytes": model_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(*args.child)))
        return
    rows = []
    for name in args.models:
        got = {}
        for mode in ("forward", "score"):
            out = subprocess.run([sys.executable, __file__, "--child", name, mode], capture_output=True, text=True,
                                 check=True)
            got[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        mb = 1 / 2**20
        fwd, sc = got["forward"]["peak_over_start"], got["score"]["peak_over_start"]
        trace_only = max(sc - got["score"]["model_bytes"], 0)
        rows.append([name, f"{got['score']['model_bytes'] * mb:,.1f}", f"{fwd * mb:,.1f}", f"{sc * mb:,.1f}",
                     f"{trace_only * mb:,.1f}", f"{sc / max(fwd, 1):.2f}", f"{trace_only / max(fwd, 1):.2f}"])
    print(tabulate(rows, headers=["model", "params+buffers MB", "forward MB", "score MB", "score - copy MB",
                                  "score/forward", "(score - copy)/forward"], disable_numparse=True))


if __name__ == "__main__":
    main()
