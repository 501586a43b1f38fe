"""The training data order as one endless stream of batches that can start at any batch (exact resume).

Batch j of the stream is the batch the loader this replaces drew at that point: a DataLoader with
`shuffle=True, drop_last=True` and one torch.Generator seeded with `seed`, iterated once per epoch (each epoch
draws from that generator when its iterator is made and when its permutation is drawn). Replaying those draws on
an index loader reproduces the order bit for bit, so runs trained before resume existed train on the same batches.
With several processes, rank r takes stream batches r, r + world, r + 2 world, ...
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableBatches(Sampler[list[int]]):
    """Endless (no `len`): training ends when the method stops, not when an epoch does."""

    def __init__(self, length: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        if length < batch_size:
            raise ValueError(f"{length} items cannot fill one batch of {batch_size}")
        self.length, self.batch_size, self.seed = length, batch_size, seed
        self.start, self.rank, self.world = start, rank, world

    def stream(self) -> Iterator[list[int]]:
        """Every rank's batches, from stream batch 0."""
        gen = torch.Generator().manual_seed(self.seed)
        epochs = DataLoader(range(self.length), batch_size=self.batch_size, shuffle=True, drop_last=True,
                            generator=gen)
        per_epoch = len(epochs)
        while True:
            # One iter() per epoch, left after its last full batch as Lightning left it (knowing the length, it
            # never asks for more, so the sampler never reaches its tail, which would draw another permutation).
            for batch in itertools.islice(iter(epochs), per_epoch):
                yield batch.tolist()

    def __iter__(self) -> Iterator[list[int]]:
        # Skipping replays the generator's draws; an epoch of 1,000 items costs well under a millisecond.
        first = self.start * self.world + self.rank
        return itertools.islice(self.stream(), first, None, self.world)
