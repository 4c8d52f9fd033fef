"""Test-set accuracy of a model or a checkpoint file (micronet, riair2019 or plain state_dict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from micronet import io
from micronet.data import ImageSet, Normalization, get_normalization, load_dataset
from micronet.errors import MicronetError
from micronet.training.batches import BatchStream
from micronet.training.loop import Runtime, accuracy_sums, setup_runtime, summarize


def evaluate(model: nn.Module, data: ImageSet, normalization: Normalization, *, device: str = "auto",
             batch_size: int = 500, half: bool = False) -> dict[str, float]:
    """Top-1/top-5 (percent) and mean CE of ``model`` on ``data``; ``half`` runs weights and inputs in fp16."""
    rt = setup_runtime(device, amp=False, channels_last=False)
    if rt.distributed:  # evaluation is single-process; shard nothing
        rt = Runtime(rt.device)
    model = model.to(rt.device).eval()
    dtype = None
    if half:
        model = model.half()
        dtype = torch.float16
    stream = BatchStream(data.to(rt.device if rt.device.type == "cuda" else "cpu"), batch_size, shuffle=False)
    sums = accuracy_sums(model, stream.epoch(0), normalization, rt, dtype=dtype)
    result = summarize(sums, "test")
    return {"top1": result["test_top1"], "top5": result["test_top5"], "loss": result["test_loss"],
            "images": result["test_images"]}


def evaluate_checkpoint(path: str | Path, data_root: str | Path, *, dataset: str = "auto", format: str = "auto",
                        model: str | None = None, normalization: str | None = None, half: bool = False,
                        device: str = "auto", batch_size: int = 500) -> dict[str, Any]:
    """Load a checkpoint in any supported format and report its test-set accuracy.

    The input normalization defaults to what the checkpoint was trained with (recorded in micronet
    checkpoints; the legacy ``riair2019`` scaling for the winner's file; CIFAR-100 statistics otherwise).
    """
    path = Path(path)
    if not path.is_file():
        raise MicronetError(f"checkpoint {path} does not exist")
    fmt = io.detect_format(path) if format == "auto" else format
    net = io.load_model(path, format=fmt, model=model)
    norm = get_normalization(normalization or io.checkpoint_normalization(path, fmt))
    test = load_dataset(data_root, "test", dataset)
    classes = getattr(net, "micronet_spec", {}).get("num_classes")
    if classes is not None and classes != test.num_classes:
        raise MicronetError(f"{path} predicts {classes} classes but the test set under {data_root} has "
                            f"{test.num_classes}")
    result = evaluate(net, test, norm, device=device, batch_size=batch_size, half=half)
    return {"checkpoint": str(path), "format": fmt, "normalization": norm.name, "half": half, **result}
