"""The synthetic orientation task: the label is the (mirror-folded) angle of a grating, so rotations and
shears change the label while colour ops, translations and flips do not."""

from __future__ import annotations

import math

import torch

from micronet.data import ImageSet
from tests.threads import one_thread_per_test  # noqa: F401  (autouse: one thread per test)

CLASSES = 10
STEP_DEGREES = 10.0  # class c: gratings at +-c·10° (0..90°); a mirror maps +a to -a (same class). Steps this fine
# make almost every Rotate/Shear level change the label (a rotation of 5° or more reaches the next class).
LABEL_DESTROYING = ("Rotate", "ShearX", "ShearY")
TINY_MODEL = "densenet_bc:depth=10,growth=6"


def orientation_images(per_class: int, seed: int, size: int = 16) -> ImageSet:
    """uint8 gratings of random colour, phase and period; label = folded orientation class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    labels = labels[torch.randperm(len(labels), generator=g)]
    n = len(labels)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    angle = torch.deg2rad(labels.double() * STEP_DEGREES * sign)
    period = 4.0 + 2.0 * torch.rand(n, generator=g, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    # Stripes run along the angle: intensity varies across it.
    across = (-xx[None] * torch.sin(angle)[:, None, None] + yy[None] * torch.cos(angle)[:, None, None])
    wave = 0.5 + 0.5 * torch.cos(2 * math.pi * across / period[:, None, None] + phase[:, None, None])
    fg = 120 + 135 * torch.rand(n, 3, generator=g, dtype=torch.float64)
    bg = 60 * torch.rand(n, 3, generator=g, dtype=torch.float64)
    images = bg[:, :, None, None] + (fg - bg)[:, :, None, None] * wave[:, None]
    return ImageSet(images.round().clamp(0, 255).to(torch.uint8), labels, tuple(f"deg{int(c * STEP_DEGREES)}"
                                                                               for c in range(CLASSES)))
