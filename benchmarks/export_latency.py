"""Latency of float-input vs pixel-input ONNX exports: onnxruntime vs PyTorch eager (issue 11, item 5).

Exports one model twice (``--input float`` and ``--input pixels``) without verification, then times each
at batch 1 and 64 with the same thread count in both runtimes (``torch.set_num_threads(n)``,
onnxruntime ``intra_op_num_threads=n``, one inter-op thread), reporting the median of ``--repeats`` runs
after a warm-up, the four variants interleaved run by run (float inputs are the pixels normalised).
Target: the pixel-input model at most 10% slower than the float-input one in onnxruntime.

Models: ``winner`` (the synthetic 2019 winner-format DenseNet-BC-100, riair2019 legacy normalisation) or
any zoo spec, pruned 75% and quantized to 4 bits (6-bit FC).
Usage: ``python benchmarks/export_latency.py [--model winner|SPEC] [--threads N] [--repeats R] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

from micronet import models
from micronet.compress import QuantConfig, SparsityConfig, deploy_form, prune_, quantize_
from micronet.data import get_normalization
from micronet.export import export_onnx
from micronet.io.riair2019 import build_riair2019, random_riair2019_state

MAX_PIXEL_SLOWDOWN = 1.10


def build(spec: str) -> tuple[torch.nn.Module, str]:
    """(model, normalisation name) for ``winner`` or a compressed zoo spec."""
    if spec == "winner":
        return build_riair2019(random_riair2019_state(0)), "riair2019"
    torch.manual_seed(0)
    model = models.create(spec).eval()
    prune_(model, SparsityConfig(0.75))
    calib = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4, fc_weight_bits=6, refit_iters=3), calib)
    return model.eval(), "cifar100"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 if the pixel-input model is more than 10% slower in onnxruntime."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="winner")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, norm = build(args.model)
    out = Path(tempfile.mkdtemp(prefix="micronet_latency_"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    sessions, deploys = {}, {}
    for kind in ("float", "pixels"):
        path = out / f"{kind}.onnx"
        export_onnx(model, path, input=kind, normalization=norm if kind == "pixels" else None, verify=False)
        deploys[kind] = deploy_form(model, input=kind,
                                    normalization=get_normalization(norm) if kind == "pixels" else None)
        sessions[kind] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    results: dict[str, dict[str, dict[int, float]]] = {k: {"onnxruntime": {}, "pytorch": {}} for k in sessions}
    for b in (int(v) for v in args.batches.split(",")):
        g = torch.Generator().manual_seed(1)
        pixels = torch.randint(0, 256, (b, 3, 32, 32), generator=g, dtype=torch.uint8)
        inputs = {"pixels": pixels, "float": get_normalization(norm)(pixels)}
        calls = {}
        for kind in sessions:
            x = inputs[kind]
            calls[(kind, "onnxruntime")] = lambda xn=x.numpy(), s=sessions[kind]: s.run(["logits"], {"input": xn})

            def eager(x: torch.Tensor = x, net: torch.nn.Module = deploys[kind]) -> None:
                with torch.inference_mode():
                    net(x)

            calls[(kind, "pytorch")] = eager
        # interleaved repeats, so a noisy neighbour slows every variant alike
        times: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
        for fn in calls.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for key, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t0) * 1e3)
        for (kind, runtime), ts in times.items():
            results[kind][runtime][b] = statistics.median(ts)
    ratios = {b: results["pixels"]["onnxruntime"][b] / results["float"]["onnxruntime"][b]
              for b in results["float"]["onnxruntime"]}
    ok = all(r <= MAX_PIXEL_SLOWDOWN for r in ratios.values())
    if args.json:
        print(json.dumps({"model": args.model, "threads": args.threads, "repeats": args.repeats,
                          "median_ms": results, "pixel_over_float_onnxruntime": ratios, "ok": ok}, indent=2))
    else:
        print(f"{args.model}: median ms, {args.threads} thread(s), {args.repeats} repeats")
        for kind, row in results.items():
            for runtime, by_batch in row.items():
                cells = "  ".join(f"batch {b}: {ms:9.2f}" for b, ms in by_batch.items())
                print(f"  {kind:6} {runtime:11} {cells}")
        print("  pixel / float (onnxruntime): " + ", ".join(f"batch {b}: {r:.3f}" for b, r in ratios.items()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
