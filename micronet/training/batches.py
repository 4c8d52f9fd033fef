"""Batch streams: one rank's augmented batches of an ImageSet, epoch by epoch.

Randomness is *stateless*: batch ``k`` of epoch ``e`` on rank ``r`` is shuffled and augmented with
generators derived from ``(seed, e, r, k)`` only. Any worker count, a resumed run, or a run that skips
to batch ``k`` therefore sees exactly the same batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from micronet.data import ImageSet, host_to_device
from micronet.errors import MicronetError


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (stable across Python runs, unlike ``hash``)."""
    digest = hashlib.blake2b("/".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


Augment = Callable[[Tensor, torch.Generator], Tensor]


def shard_indices(n: int, epoch: int, *, seed: int, shuffle: bool, rank: int, world_size: int,
                  even: bool = True) -> Tensor:
    """This rank's sample indices for ``epoch``: one shared permutation, strided over ranks.

    ``even`` pads with the first samples (like DistributedSampler) so every rank runs the same number of
    training steps; evaluation uses ``even=False`` so every image is counted exactly once.
    """
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch)))
    else:
        order = torch.arange(n)
    pad = (-n) % world_size if even else 0
    if pad:
        order = torch.cat([order, order[:pad]])
    return order[rank::world_size]


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose items are whole augmented batches keyed by ``(epoch, batch index)``."""

    def __init__(self, stream: BatchStream) -> None:
        self.stream = stream

    def __len__(self) -> int:
        return len(self.stream)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor]:
        return self.stream.make_batch(*key)


class _EpochSampler(torch.utils.data.Sampler):
    """Yields the ``(epoch, batch index)`` keys of the current epoch (set by the stream before iterating)."""

    def __init__(self) -> None:
        self.epoch, self.batches = 0, 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter((self.epoch, k) for k in range(self.batches))

    def __len__(self) -> int:
        return self.batches


class BatchStream:
    """One rank's batches of an ImageSet, epoch by epoch, augmented deterministically on the data's device.

    When the data lives on a CUDA device (or ``num_workers`` is 0), batches are cut and augmented in
    the main process on that device; otherwise a DataLoader with pinned memory and persistent workers
    produces whole batches in parallel.
    """

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        *,
        shuffle: bool,
        augment: Augment | None = None,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        even_shards: bool = True,
        num_workers: int = 0,
    ) -> None:
        if batch_size < 1:
            raise MicronetError(f"batch size must be positive, got {batch_size}")
        self.data, self.batch_size, self.shuffle, self.augment = data, batch_size, shuffle, augment
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.even_shards = even_shards
        self._cached: tuple[int, Tensor] | None = None
        self.samples_per_rank = len(self._indices(0))
        self._loader: torch.utils.data.DataLoader | None = None
        self._sampler: _EpochSampler | None = None
        if num_workers > 0 and data.images.device.type == "cpu":
            self._sampler = _EpochSampler()
            self._loader = torch.utils.data.DataLoader(
                _BatchDataset(self),
                sampler=self._sampler,
                batch_size=None,
                num_workers=num_workers,
                pin_memory=torch.cuda.is_available(),
                persistent_workers=True,
            )

    def __getstate__(self) -> dict:
        # Workers receive the stream by pickling (forkserver/spawn); they need the data, not the loader.
        return {**self.__dict__, "_loader": None, "_sampler": None}

    def __len__(self) -> int:
        if self.drop_last:
            return self.samples_per_rank // self.batch_size
        return -(-self.samples_per_rank // self.batch_size)

    def _indices(self, epoch: int) -> Tensor:
        """This rank's sample order for ``epoch``, on the data's device (moved once per epoch)."""
        if self._cached is None or self._cached[0] != epoch:
            idx = shard_indices(len(self.data), epoch, seed=self.seed, shuffle=self.shuffle, rank=self.rank,
                                world_size=self.world_size, even=self.even_shards)
            self._cached = (epoch, host_to_device(idx, self.data.images.device))
        return self._cached[1]

    def make_batch(self, epoch: int, k: int) -> tuple[Tensor, Tensor]:
        """Batch ``k`` of ``epoch``: uint8 images (augmented) and labels, on the data's device."""
        idx = self._indices(epoch)[k * self.batch_size : (k + 1) * self.batch_size]
        images, labels = self.data.images[idx], self.data.labels[idx]
        if self.augment is not None:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, k, 1))
            images = self.augment(images, g)
        return images, labels

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate the batches of ``epoch``."""
        if self._loader is None:
            for k in range(len(self)):
                yield self.make_batch(epoch, k)
            return
        assert self._sampler is not None
        self._sampler.epoch, self._sampler.batches = epoch, len(self)
        yield from self._loader
