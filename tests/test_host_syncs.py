"""The test suite's host-sync detector flags every read-back the CUDA sync debug mode would (its own check)."""

from __future__ import annotations

import pytest
import torch

from tests.host_syncs import HostSyncOps

x = torch.arange(12.0).view(3, 4)
mask = x > 5


@pytest.mark.parametrize("name, fn", [
    ("item", lambda: x[0, 0].item()), ("int", lambda: int(x[1, 1])), ("bool", lambda: bool(x[0, 1] > 0)),
    ("equal", lambda: torch.equal(x, x)), ("nonzero", lambda: mask.nonzero()), ("mask index", lambda: x[mask]),
    ("mask assign", lambda: x.clone().__setitem__(mask, 0.0)), ("tolist", lambda: x.tolist()),
    ("unique", lambda: torch.unique(x)), ("masked_select", lambda: x.masked_select(mask)),
])
def test_each_read_back_is_flagged(name, fn):
    with HostSyncOps() as mode:
        fn()
    assert mode.seen, name


def test_device_side_work_is_not_flagged():
    with HostSyncOps() as mode:
        y = torch.where(mask, x, 0.0).sum(1)
        x[torch.tensor([0, 2])]  # integer indices: no read-back
        x.clone().index_put_((torch.tensor([1]),), torch.tensor(0.0))
        (x != x.flip(0)).any()
    assert mode.seen == [] and y.shape == (3,)
    assert torch.Tensor.tolist is not None and x[:1].tolist() == [[0.0, 1.0, 2.0, 3.0]]  # restored
