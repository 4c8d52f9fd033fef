"""A CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``: records the ops that would read back to the host.

On CUDA each recorded op synchronises the device with the host: ``.item()``/``int()``/``bool()`` (``aten.
_local_scalar_dense``, ``is_nonzero``), ``torch.equal``, ``nonzero`` and everything built on it (``masked_select``,
``unique``), boolean-mask indexing ``x[mask]`` (``aten.index.Tensor``) and assignment ``x[mask] = v``
(``aten.index_put_``), and ``.tolist()`` (which dispatches nothing on the CPU, so it is wrapped directly).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING = ("_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "masked_scatter", "unique",
           "_unique", "_unique2", "unique_dim", "unique_consecutive")
MASK_INDEXED = ("index.Tensor", "index_put_", "index_put", "_index_put_impl_")


def _boolean_index(args) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or [])


class HostSyncOps(TorchDispatchMode):
    """Use as ``with HostSyncOps() as mode: ...``; ``mode.seen`` lists the syncing ops in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []
        self._tolist = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__  # e.g. "index.Tensor", "_local_scalar_dense.default"
        base = name.split(".")[0]
        if base in SYNCING or (name in MASK_INDEXED or base in MASK_INDEXED) and _boolean_index(args):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        seen, original = self.seen, self._tolist

        def tolist(t: torch.Tensor):
            seen.append("tolist")
            return original(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)
