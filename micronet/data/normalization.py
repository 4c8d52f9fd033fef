"""Image normalisation: per-channel ``(x/255 - mean)/std`` presets, applied to uint8 batches on their device."""

from __future__ import annotations

import functools
from dataclasses import dataclass

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


def get_normalization(name: str) -> Normalization:
    """Look up a normalization preset by name."""
    try:
        return NORMALIZATIONS[name]
    except KeyError:
        raise MicronetError(f"unknown normalization {name!r}; choose one of {', '.join(NORMALIZATIONS)}") from None
