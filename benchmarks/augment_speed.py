"""Augmentation throughput alone: images/s of the training pipelines on uint8 batches already on the device.

    PYTHONPATH=. python benchmarks/augment_speed.py                  # CPU (and CUDA when available)
    PYTHONPATH=. python benchmarks/augment_speed.py --device cuda --batch-size 256 --iters 50

Pipelines: the 2019 policy (one and two sub-policies per image), a Fast AutoAugment policy (the shipped one
when there is one, else a seeded random policy of the same shape: 498 sub-policies of 2 ops), Cutout alone
and pad-crop + flip alone. Each batch draws from its own seeded generator, as training does.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from micronet.training.augment import OPS, Augmentation, AugmentConfig, available_policies


def fast_aa_policy() -> tuple[str, str]:
    """(policy name or path, description): the shipped Fast-AA policy, else a same-shaped seeded stand-in."""
    shipped = [p for p in available_policies() if "fast" in p.lower() or p.lower().startswith("fa")]
    if shipped:
        return shipped[0], f"shipped {shipped[0]}"
    g = torch.Generator().manual_seed(0)
    names = sorted(n for n in OPS if n != "Identity")
    subs = [[[names[int(torch.randint(len(names), (1,), generator=g))], float(torch.rand(1, generator=g)),
              float(torch.rand(1, generator=g))] for _ in range(2)] for _ in range(498)]
    path = Path(tempfile.gettempdir()) / "micronet-fast-aa-shaped.json"
    path.write_text(json.dumps(subs))
    return str(path), "Fast-AA-shaped stand-in (no shipped Fast-AA policy found): 498 random 2-op sub-policies"


def pipelines() -> dict[str, AugmentConfig]:
    """The augmentation configurations measured, by label."""
    fa, _ = fast_aa_policy()
    return {
        "2019 policy + crop/flip/cutout16": AugmentConfig(policy="micronet2019", pad_fill="mean", cutout=16),
        "2019 policy x2 + crop/flip/cutout16": AugmentConfig(policy="micronet2019", ops_per_image=2, pad_fill="mean",
                                                             cutout=16),
        "Fast-AA policy + crop/flip/cutout16": AugmentConfig(policy=fa, cutout=16),
        "cutout16 only": AugmentConfig(crop_padding=0, flip=False, cutout=16),
        "crop/flip only": AugmentConfig(),
    }


def measure(config: AugmentConfig, device: torch.device, batch: int, iters: int, warmup: int = 2) -> float:
    """Images per second of ``iters`` augmented batches after ``warmup`` untimed ones."""
    aug = Augmentation(config)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    for k in range(warmup):
        aug(images, torch.Generator().manual_seed(k))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for k in range(iters):
        out = aug(images, torch.Generator().manual_seed(1000 + k))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del out
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    """Parse options, measure every pipeline on every device, print the table."""
    # Lazy: gpu_check.py imports this module on bare GPU machines without tabulate (only main() prints).
    from tabulate import tabulate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=None, help="timed batches (default 5 on CPU, 50 on CUDA)")
    parser.add_argument("--device", action="append", help="cpu and/or cuda (default: both when available)")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (default: PyTorch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for name in devices:
        device = torch.device(name)
        iters = args.iters or (50 if device.type == "cuda" else 5)
        for label, config in pipelines().items():
            rows.append([name, label, f"{measure(config, device, args.batch_size, iters):,.0f}"])
    print(f"batch {args.batch_size}, 32x32 uint8, {fast_aa_policy()[1]}")
    print(tabulate(rows, headers=["device", "pipeline", "images/s"]))


if __name__ == "__main__":
    main()
