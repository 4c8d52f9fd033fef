"""BatchNorm statistics recalibration (spec training.md §3.6, done the clean way of §6)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from micronet.compress.state import model_device, preserved_modes
from micronet.errors import MicronetError
from micronet.progress import progress_bar

_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, loader: Iterable, batches: int | None = None,
                    device: torch.device | str | None = None, progress: bool = False) -> int:
    """Re-estimate every BatchNorm's running mean/var as an exact cumulative average over ``batches``.

    Statistics are reset and ``momentum=None`` is used (the cumulative average), so the result does not
    depend on batch order the way the original 10-epoch EMA did. Only BN buffers change: all other
    modules run in eval mode (quantizers quantize, ShakeDrop/SkipNet behave as at inference), no
    parameter is touched. ``progress`` shows a tqdm bar (libraries stay quiet unless asked). Returns the
    number of batches used.
    """

    bns = [m for m in model.modules() if isinstance(m, _BN_TYPES) and m.track_running_stats]
    if not bns:
        raise MicronetError("model has no BatchNorm layers with running statistics to recalibrate")
    momenta = {m: m.momentum for m in bns}
    if device is None:
        device = model_device(model)
    used = 0
    with preserved_modes(model):
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        bar = progress_bar(batches, "BN recalibration", progress, unit="batch")
        try:
            for batch in loader:
                if batches is not None and used >= batches:
                    break
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(x.to(device))
                used += 1
                bar.update()
        finally:
            bar.close()
            for m, momentum in momenta.items():
                m.momentum = momentum
    if used == 0:
        raise MicronetError("BN recalibration got no batches")
    return used

