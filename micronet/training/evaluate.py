"""Test-set accuracy of a model or a checkpoint file (micronet, riair2019 or plain state_dict), on one test set
or several of the same classes, with the accuracy drop between them and its 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from micronet import io
from micronet.data import (
    DATASETS,
    TRAIN_STATS,
    ImageSet,
    Normalization,
    detect_layout,
    get_normalization,
    load_dataset,
    train_stats,
)
from micronet.errors import MicronetError
from micronet.training.batches import BatchStream
from micronet.training.loop import Runtime, accuracy_sums, gate_statistics, setup_runtime, summarize


def evaluate(model: nn.Module, data: ImageSet, normalization: Normalization, *, device: str = "auto",
             batch_size: int = 500, half: bool = False) -> dict[str, float]:
    """Top-1/top-5 (percent) and mean CE of ``model`` on ``data``; ``half`` runs weights and inputs in fp16."""
    rt = setup_runtime(device, amp=False, channels_last=False)
    if rt.distributed:  # evaluation is single-process; shard nothing
        rt = Runtime(rt.device)
    model = model.to(rt.device).eval()
    dtype = None
    stream = BatchStream(data.to(rt.device if rt.device.type == "cuda" else "cpu"), batch_size, shuffle=False)
    # A gated model also reports its gates: per-gate rates, executed blocks and MACs per image.
    with gate_statistics(model, tuple(data.images.shape[1:]), rt) as gates:
        if half:
            model = model.half()
            dtype = torch.float16
        sums = accuracy_sums(model, stream.epoch(0), normalization, rt, dtype=dtype)
    result = summarize(sums, "test")
    return {"top1": result["test_top1"], "top5": result["test_top5"], "loss": result["test_loss"],
            "images": result["test_images"], **gates}


Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


def drop_interval(top1_a: float, images_a: int, top1_b: float, images_b: int) -> tuple[float, float, float]:
    """Accuracy drop ``A - B`` in percentage points and its 95% confidence interval ``(drop, low, high)``.

    Method: the normal (Wald) approximation for the difference of two independent proportions,
    ``d ± z·sqrt(p_a(1-p_a)/n_a + p_b(1-p_b)/n_b)`` with ``z = 1.96``: each test set is treated as an
    independent sample of its distribution and the model as fixed. It is what the CIFAR-10.2 study's
    question needs (how much accuracy is lost on a new test set drawn the same way), not a paired test.
    """
    if images_a < 1 or images_b < 1:
        raise MicronetError("an accuracy drop needs at least one image in each test set")
    p_a, p_b = top1_a / 100.0, top1_b / 100.0
    half = Z_95 * math.sqrt(p_a * (1 - p_a) / images_a + p_b * (1 - p_b) / images_b)
    drop = p_a - p_b
    return 100.0 * drop, 100.0 * (drop - half), 100.0 * (drop + half)


def parse_also_on(item: str, data_root: str | Path) -> tuple[str, Path]:
    """``NAME`` (a dataset under ``data_root``) or ``NAME=DIR`` (under another root) for ``--also-on``."""
    name, sep, root = item.partition("=")
    name = name.strip()
    if name not in DATASETS or (sep and not root.strip()):
        raise MicronetError(f"--also-on {item!r}: expected NAME or NAME=DIR with NAME one of {', '.join(DATASETS)}")
    return name, Path(root.strip()) if sep else Path(data_root)


def evaluate_checkpoint(path: str | Path, data_root: str | Path, *, dataset: str = "auto", format: str = "auto",
                        model: str | None = None, normalization: str | None = None, half: bool = False,
                        device: str = "auto", batch_size: int = 500,
                        also_on: Sequence[str] = (), allow_large: bool = False) -> dict[str, Any]:
    """Load a checkpoint in any supported format and report its test-set accuracy (``allow_large``: lift the
    parameter budget on the model it names).

    The input normalization defaults to what the checkpoint was trained with (recorded in micronet
    checkpoints, ``train-stats`` numbers included; the legacy ``riair2019`` scaling for the winner's file;
    CIFAR-100 statistics otherwise); ``normalization="train-stats"`` computes them from the train split under
    ``data_root``. ``also_on`` (``NAME`` or ``NAME=DIR``) adds test sets of the same classes: each gets its
    accuracy and its top-1/top-5 drop from the first set with a 95% interval (:func:`drop_interval`).
    """
    path = Path(path)
    if not path.is_file():
        raise MicronetError(f"checkpoint {path} does not exist")
    others = [parse_also_on(item, data_root) for item in also_on]  # bad names fail before any loading
    fmt = io.detect_format(path) if format == "auto" else format
    net = io.load_model(path, format=fmt, model=model, allow_large=allow_large)
    dataset = detect_layout(data_root, dataset)
    if normalization == TRAIN_STATS:
        norm = train_stats(load_dataset(data_root, "train", dataset).images)
    else:
        norm = get_normalization(normalization or io.checkpoint_normalization(path, fmt))
    test = load_dataset(data_root, "test", dataset)
    classes = getattr(net, "micronet_spec", {}).get("num_classes")
    if classes is not None and classes != test.num_classes:
        raise MicronetError(f"{path} predicts {classes} classes but the test set under {data_root} has "
                            f"{test.num_classes}")
    extra_sets = []
    for name, root in others:
        other = load_dataset(root, "test", name)
        if other.num_classes != test.num_classes:
            raise MicronetError(f"--also-on {name}: its test set under {root} has {other.num_classes} classes, "
                                f"the main one {test.num_classes}; compare test sets of the same classes")
        extra_sets.append((name, root, other))
    result = evaluate(net, test, norm, device=device, batch_size=batch_size, half=half)
    report: dict[str, Any] = {"checkpoint": str(path), "format": fmt, "normalization": norm.name, "half": half,
                              "dataset": dataset, "data_root": str(data_root), **result}
    if extra_sets:
        report["also_on"] = []
        for name, root, other in extra_sets:
            r = evaluate(net, other, norm, device=device, batch_size=batch_size, half=half)
            drops = {}
            for k in ("top1", "top5"):
                d, lo, hi = drop_interval(result[k], result["images"], r[k], r["images"])
                drops[k] = {"drop": d, "ci95": [lo, hi]}
            report["also_on"].append({"dataset": name, "data_root": str(root), **r, "drop": drops})
        report["drop_method"] = ("normal approximation for the difference of two independent proportions, "
                                 "95% (z = 1.96)")
    return report
