"""Image normalisation: per-channel ``(x/255 - mean)/std`` presets, or ``train-stats`` computed from a training
set, applied to uint8 batches on their device."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from micronet.errors import MicronetError


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``(x/255 - mean)/std``, optionally divided once more (the 2019 winner's legacy scaling)."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    extra_divisor: float = 1.0  # 255 reproduces riair2019's double scaling (spec training.md §1.7)

    def __call__(self, images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Normalise a uint8 batch ``B×3×H×W`` on its own device; returns ``dtype``."""
        mean, std = _channel_stats(self.mean, self.std, self.extra_divisor, images.device)
        return ((images.to(torch.float32) - mean) / std).to(dtype)

    def mean_colour(self) -> tuple[int, int, int]:
        """The uint8 colour that normalises to zero (the TF-AutoAugment/Cutout fill)."""
        return tuple(int(round(m * 255)) for m in self.mean)  # type: ignore[return-value]


@functools.lru_cache(maxsize=32)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], divisor: float,
                   device: torch.device) -> tuple[Tensor, Tensor]:
    # Built once per device: a fresh host tensor per batch would mean a synchronising copy per step.
    m = torch.tensor(mean).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std).view(1, 3, 1, 1) * 255.0 * divisor
    return m.to(device), s.to(device)


_WINNER_MEAN = (0.49139968, 0.48215841, 0.44653091)
NORMALIZATIONS: dict[str, Normalization] = {
    n.name: n
    for n in (
        Normalization("cifar100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        Normalization("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        # The winner's constants: CIFAR-10 pixel mean/std, used for CIFAR-100 too (spec §4.3).
        Normalization("micronet2019", _WINNER_MEAN, (0.24703223, 0.24348513, 0.26158784)),
        # Fast AutoAugment's constants (CIFAR-10 mean, per-image-average std; used for CIFAR-100 too).
        Normalization("fastaa", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        # Only for evaluating the released 2019 checkpoint: same constants, then ÷255 again.
        Normalization("riair2019", _WINNER_MEAN, (0.24703223, 0.24348513, 0.26158784), 255.0),
    )
}


TRAIN_STATS = "train-stats"


def train_stats(images: Tensor, chunk: int = 4096) -> Normalization:
    """``train-stats``: per-channel mean and population std of ``x/255`` over a uint8 ``N×3×H×W`` set.

    Sums of ``x`` and ``x²`` are exact integers (int64, chunked), so the figures do not depend on the order
    or the batch size, and equal numpy's ``mean``/``std`` (ddof 0) of ``x/255`` up to float64 rounding.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise MicronetError(f"train-stats needs a non-empty uint8 N×3×H×W image set, got {tuple(images.shape)}")
    s1 = torch.zeros(3, dtype=torch.int64)
    s2 = torch.zeros(3, dtype=torch.int64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(device="cpu", dtype=torch.int64)
        s1 += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = [int(a) / count / 255.0 for a in s1]
    # Var = E[x²] − E[x]², computed from the exact integer sums: n·S2 − S1² is exact in Python ints.
    var = [(count * int(b) - int(a) ** 2) / count**2 / 255.0**2 for a, b in zip(s1, s2, strict=True)]
    if min(var) <= 0:
        raise MicronetError("train-stats: a colour channel is constant over the training set (std 0)")
    return Normalization(TRAIN_STATS, tuple(mean), tuple(math.sqrt(v) for v in var))  # type: ignore[arg-type]


def normalization_record(norm: Normalization) -> dict[str, Any]:
    """What a checkpoint stores about its normalisation: the name and the actual numbers."""
    return {"name": norm.name, "mean": list(norm.mean), "std": list(norm.std), "extra_divisor": norm.extra_divisor}


def normalization_from_record(name: Any, record: Any, where: str) -> Normalization:
    """The normalisation a checkpoint recorded: a preset by ``name``, or ``train-stats`` from its numbers."""
    if not isinstance(name, str):
        raise MicronetError(f"{where}: normalization must be a name, got {type(name).__name__}")
    if name != TRAIN_STATS:
        return get_normalization(name)
    if not isinstance(record, dict):
        raise MicronetError(f"{where}: train-stats normalization without its recorded mean/std")
    values: dict[str, tuple[float, ...]] = {}
    for key in ("mean", "std"):
        v = record.get(key)
        if (not isinstance(v, list) or len(v) != 3
                or not all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
            raise MicronetError(f"{where}: normalization {key} must be three finite numbers, got {v!r}")
        values[key] = tuple(float(x) for x in v)
    if min(values["std"]) <= 0:
        raise MicronetError(f"{where}: normalization std must be positive, got {list(values['std'])}")
    return Normalization(TRAIN_STATS, values["mean"], values["std"])  # type: ignore[arg-type]


def get_normalization(name: str | Normalization) -> Normalization:
    """Look up a normalization preset by name (a Normalization passes through unchanged)."""
    if isinstance(name, Normalization):
        return name
    if name == TRAIN_STATS:
        raise MicronetError("train-stats normalization is computed from a training set; it has no fixed numbers "
                            "(use the checkpoint's recorded ones, or micronet data stats)")
    try:
        return NORMALIZATIONS[name]
    except KeyError:
        raise MicronetError(f"unknown normalization {name!r}; choose one of {', '.join(NORMALIZATIONS)}, "
                            f"{TRAIN_STATS}") from None
