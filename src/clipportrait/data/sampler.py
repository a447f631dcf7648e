"""An endless, rank-sharded, resumable order of dataset items for GAN training.

GAN training counts images (kimg), not epochs, so the stream never ends: epoch e is a permutation
seeded by (seed, e), cut to a multiple of the world size and dealt round-robin to the ranks
(rank r takes positions r, r + W, ...), like ``DistributedSampler(drop_last=True)`` but continued
forever. ``start`` skips that many items of this rank's stream, so a run resumed after k batches of
size B continues with exactly the items it would have seen (start = k * B).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, num_items: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 start: int = 0) -> None:
        if num_items < num_replicas:
            raise ValueError(f"{num_items} items cannot be shared by {num_replicas} ranks (need >= 1 each)")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank}: expected 0 <= rank < num_replicas={num_replicas}")
        if start < 0:
            raise ValueError(f"start={start}: expected >= 0")
        self.num_items, self.num_replicas, self.rank = num_items, num_replicas, rank
        self.seed, self.shuffle, self.start = int(seed), shuffle, int(start)
        self.per_epoch = num_items // num_replicas  # items of this rank per epoch

    def epoch_items(self, epoch: int) -> torch.Tensor:
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        else:
            order = torch.arange(self.num_items)
        return order[: self.per_epoch * self.num_replicas][self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            yield from self.epoch_items(epoch)[offset:].tolist()
            epoch, offset = epoch + 1, 0
