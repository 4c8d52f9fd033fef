"""ONNX export size and latency of a full-size compressed DenseNet-BC-100 (issue 6 size targets).

Builds DenseNet-BC-100 (k=12) with random weights, prunes 75% of the conv weights (global magnitude),
quantizes conv weights and activations to 4 bits and the FC to 6 bits (the 2019 winner's layout),
then exports it twice (dense INT4, and ``--sparse-weights``) and prints sizes against the targets:

* default export <= 0.65 MB (650,000 B);
* sparse-weights export <= 1.5 x the scorer's storage bound (params x 4 B).

Usage: ``python benchmarks/export_size.py [--samples N] [--out DIR] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from micronet import models
from micronet.compress import QuantConfig, SparsityConfig, prune_, quantize_
from micronet.export import export_onnx

DEFAULT_TARGET_BYTES = 650_000
SPARSE_TARGET_RATIO = 1.5


def build_model(seed: int = 0) -> torch.nn.Module:
    """75%-sparse, 4-bit (6-bit FC) DenseNet-BC-100 with random weights and calibrated activations."""
    torch.manual_seed(seed)
    model = models.create("densenet100_k12").eval()
    prune_(model, SparsityConfig(0.75))
    calib = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4, fc_weight_bits=6), calib)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 if a size target is missed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=512, help="verification inputs per export")
    ap.add_argument("--out", type=Path, default=None, help="keep the .onnx files here (default: temp dir)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    model = build_model()
    out = args.out or Path(tempfile.mkdtemp(prefix="micronet_export_"))
    out.mkdir(parents=True, exist_ok=True)
    fp32_ckpt = out / "densenet100_fp32.pt"
    torch.save({k: v.float() for k, v in model.state_dict().items() if v.is_floating_point()}, fp32_ckpt)

    results = {}
    for name, sparse in (("dense_int4", False), ("sparse_weights", True)):
        t0 = time.perf_counter()
        rep = export_onnx(model, out / f"densenet100_{name}.onnx", sparse_weights=sparse, samples=args.samples,
                          force=True)
        results[name] = {**rep.to_dict(), "export_seconds": round(time.perf_counter() - t0, 1)}
        if not args.json:
            print(f"== {name} ==")
            print(rep.format())
            print()

    dense, sparse = results["dense_int4"], results["sparse_weights"]
    storage = sparse["storage_bytes"]
    checks = {
        "default_le_650000": dense["file_bytes"] <= DEFAULT_TARGET_BYTES,
        "sparse_le_1.5x_storage": storage is not None and sparse["file_bytes"] <= SPARSE_TARGET_RATIO * storage,
    }
    summary = {
        "fp32_checkpoint_bytes": fp32_ckpt.stat().st_size,
        "storage_bytes": storage,
        "dense_int4_bytes": dense["file_bytes"],
        "sparse_weights_bytes": sparse["file_bytes"],
        "sparse_over_storage": None if not storage else round(sparse["file_bytes"] / storage, 3),
        "checks": checks,
    }
    if args.json:
        print(json.dumps({"summary": summary, "exports": results}, indent=2))
    else:
        print("== summary ==")
        for key, value in summary.items():
            print(f"{key}: {value}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
