"""Fast AutoAugment search throughput: trials per minute for a small budget, on CPU (and CUDA when present).

Generates a CIFAR-sized task (coloured blobs, 10 classes), trains one split model with the
baseline augmentation (timed separately), then runs ``--trials`` Fast-AA trials (TPE, SQLite storage,
``--policies-per-trial`` sub-policies x 2 ops, any-of-``--views`` reward on D_A) and reports trials/minute.
The trial cost is dominated by augmenting and classifying |D_A| x V images, so it scales with both.

Usage: ``python benchmarks/augment_search_speed.py [--images 2000] [--trials 20] [--views 5]
[--model wrn:depth=10,width=1] [--device cpu|cuda|all] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from micronet.data import ImageSet, get_normalization
from micronet.training.loop import setup_runtime
from micronet.training.policy_search import SearchSettings, open_search, search_fastaa
from micronet.training.policy_search.common import data_identity


def blobs(n: int, classes: int = 10, seed: int = 0) -> ImageSet:
    """32x32 uint8 images: a disc of the class colour at a random place on noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    palette = torch.randint(60, 256, (classes, 3), generator=g)
    images = torch.randint(0, 80, (n, 3, 32, 32), generator=g)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    centre = torch.randint(8, 24, (n, 2), generator=g)
    disc = (yy[None] - centre[:, 0, None, None]) ** 2 + (xx[None] - centre[:, 1, None, None]) ** 2 <= 49
    images = torch.where(disc[:, None], palette[labels][:, :, None, None], images)
    return ImageSet(images.to(torch.uint8), labels, tuple(f"c{c}" for c in range(classes)))


def measure(device: str, args: argparse.Namespace) -> dict:
    """Train one split model and run the trials on ``device``; return the timings."""
    data = blobs(args.images)
    settings = SearchSettings(model=args.model, epochs=args.epochs, splits=1, trials=args.trials, rounds=1,
                              policies_per_trial=args.policies_per_trial, top=min(10, args.trials), views=args.views)
    rt, norm = setup_runtime(device), get_normalization("fastaa")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "search"
        open_search(out, settings, data_identity(data), resume=False)
        # The first run trains the split model and runs the trials (it also warms up kernels and caches) ...
        start = time.perf_counter()
        search_fastaa(data, settings, out, rt, norm, searched_on="blobs", progress=False)
        total = time.perf_counter() - start
        # ... the second runs the same trials alone, on the saved model, in a fresh study.
        out2 = Path(tmp) / "again"
        open_search(out2, settings, data_identity(data), resume=False)
        (out2 / "split0").mkdir()
        (out2 / "split0" / "model.safetensors").write_bytes((out / "split0" / "model.safetensors").read_bytes())
        start = time.perf_counter()
        search_fastaa(data, settings, out2, rt, norm, searched_on="blobs", progress=False)
        trials_s = time.perf_counter() - start
    return {"device": device, "images": args.images, "d_a_images": round(args.images * settings.holdout),
            "views": args.views, "trials": args.trials, "model": args.model,
            "split_model_s": round(total - trials_s, 2), "trials_s": round(trials_s, 2),
            "trials_per_minute": round(60 * args.trials / trials_s, 1)}


def main() -> None:
    """Parse the flags, run on each device, print a line (or JSON) per device."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--views", type=int, default=5)
    parser.add_argument("--policies-per-trial", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--model", default="wrn:depth=10,width=1")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if not torch.cuda.is_available():
        devices = [d for d in devices if d != "cuda"]
    for device in devices:
        r = measure(device, args)
        print(json.dumps(r) if args.json else
              f"{device}: {r['trials_per_minute']} trials/min ({r['trials']} trials, |D_A| = {r['d_a_images']}, "
              f"V = {r['views']}, {r['model']}; split model {r['split_model_s']} s)")


if __name__ == "__main__":
    main()
