"""Moving small host tensors to the device without stalling its queue."""

from __future__ import annotations

import torch
from torch import Tensor


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a small host tensor to ``device`` without stalling the GPU queue (pinned, non-blocking)."""
    if device.type == "cpu":
        return t
    # A copy from pageable memory waits for the stream to drain; a pinned one is queued like a kernel.
    return t.pin_memory().to(device, non_blocking=True)
