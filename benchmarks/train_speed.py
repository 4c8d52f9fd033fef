"""Training throughput of the three kinds of stage step: float, masked (pruned) and fake-quant (+ masks).

Runs the real training loop (``micronet.training.loop.train_epoch``) on random uint8 images kept on the
device, and prints images/s and the overhead of each kind relative to the float step::

    python benchmarks/train_speed.py                      # CPU, and CUDA when available
    python benchmarks/train_speed.py --device cuda --compile --model densenet100_k12 --steps 50

The issue's target is a fake-quant + mask overhead of at most 1.3x the float step on CUDA.
"""

from __future__ import annotations

import argparse
import time

import torch

from micronet import compress, models
from micronet.data import ImageSet, get_normalization
from micronet.training.batches import BatchStream
from micronet.training.kd import cross_entropy
from micronet.training.loop import StepContext, setup_runtime, train_epoch

KINDS = ("float", "masked", "fake-quant")


def build(kind: str, model_name: str, device: torch.device, calibration: torch.Tensor) -> torch.nn.Module:
    """A model in the training form of ``kind`` (what the prune / quant-weight stages optimise)."""
    torch.manual_seed(0)
    model = models.create(model_name).to(device)
    if kind in ("masked", "fake-quant"):
        compress.prune_(model, compress.SparsityConfig(0.75))
        compress.freeze_masks_(model)
    if kind == "fake-quant":
        compress.quantize_(model, compress.QuantConfig(weight_bits=4, act_bits=4), calibration)
    return model


def measure(kind: str, model_name: str, device: str, batch: int, steps: int, warmup: int, compile: bool) -> float:
    """Images per second of ``steps`` timed training steps after ``warmup`` untimed ones."""
    rt = setup_runtime(device, compile=compile)
    normalize = get_normalization("cifar100")
    g = torch.Generator().manual_seed(0)
    n = batch * max(steps, warmup)
    data = ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g).to(rt.device),
                    torch.randint(0, 100, (n,), generator=g).to(rt.device), tuple(str(i) for i in range(100)))
    model = build(kind, model_name, rt.device, normalize(data.images[:batch]))
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    forward = torch.compile(model) if rt.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=True)

    def loss_fn(x: torch.Tensor, y: torch.Tensor):
        with rt.autocast():
            logits = forward(x)
        return cross_entropy(logits, y), logits

    ctx = StepContext(optimizer, loss_fn, params, lambda s: 0.01, progress=False, describe=kind)
    results = []
    for epoch, count in enumerate((warmup, steps)):
        stream = BatchStream(ImageSet(data.images[: batch * count], data.labels[: batch * count], data.classes),
                             batch, shuffle=True, seed=epoch)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result, _ = train_epoch(stream, epoch, 0, ctx, normalize, rt)  # ends with a host read: synchronised
        results.append(result.images / (time.perf_counter() - start))
    return results[-1]


def main() -> None:
    """Parse options, measure every kind on every device, print the table."""
    # Lazy: gpu_check.py imports this module on bare GPU machines without tabulate (only main() prints).
    from tabulate import tabulate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet100_k12")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5 on CPU, 50 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2 on CPU, 20 on CUDA)")
    parser.add_argument("--device", action="append", help="cpu and/or cuda (default: both when available)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    parser.add_argument("--threads", type=int, help="CPU intra-op threads (default: PyTorch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for device in devices:
        cuda = device.startswith("cuda")
        steps = args.steps or (50 if cuda else 5)
        warmup = args.warmup or (20 if cuda else 2)
        speed = {k: measure(k, args.model, device, args.batch_size, steps, warmup, args.compile and cuda)
                 for k in KINDS}
        for kind in KINDS:
            rows.append([device, kind, f"{speed[kind]:.1f}", f"{speed['float'] / speed[kind]:.2f}x"])
    print(f"{args.model}, batch {args.batch_size}, SGD step incl. normalization"
          f"{', bf16 autocast + channels_last on CUDA' if any(d.startswith('cuda') for d in devices) else ''}")
    print(tabulate(rows, headers=["device", "step", "images/s", "time vs float"]))


if __name__ == "__main__":
    main()
