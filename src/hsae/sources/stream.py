"""The shuffled, resumable row stream that every sharded or streamed source shares.

A source's rows are read in epochs; each epoch is a sequence of windows (a store's groups of
shards, an on-the-fly source's runs of `buffer_rows` rows), each window's rows permuted with a
seed of (seed, epoch, window). Batch s is rows [s * B, (s + 1) * B) of the endless concatenation of
epochs, so a source resumes at any step without replaying what came before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from hsae.errors import HsaeError


def window_permutation(seed: int, epoch: int, window: int, n: int) -> Tensor:
    """The seeded order of the rows of one shuffle window."""
    return torch.from_numpy(np.random.default_rng([seed, epoch, window]).permutation(n))


def rebatch(blocks: Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    """Cut a stream of row blocks into batches of exactly `batch_size` rows (a short tail is dropped)."""
    carry: list[Tensor] = []
    carried = 0
    for block in blocks:
        while len(block):
            take = min(batch_size - carried, len(block))
            carry.append(block[:take])
            carried += take
            block = block[take:]
            if carried == batch_size:
                yield torch.cat(carry) if len(carry) > 1 else carry[0]
                carry, carried = [], 0


def endless_rows(
    epoch_rows: Callable[[], int], rows_from: Callable[[int, int], Iterable[Tensor]], start_row: int
) -> Iterator[Tensor]:
    """Row blocks of the endless stream from row `start_row`: `rows_from(epoch, row)` yields an
    epoch's blocks from its row `row` on; `epoch_rows()` (rows per epoch, called only to resume past
    row 0, since counting may cost a pass over the data) locates the start."""
    epoch, offset = 0, 0
    if start_row:
        per_epoch = epoch_rows()
        if per_epoch <= 0:
            raise HsaeError("the data gives no rows to train on")
        epoch, offset = divmod(start_row, per_epoch)
    while True:
        yield from rows_from(epoch, offset)
        epoch, offset = epoch + 1, 0


def check_batch_request(batch_size: int, rank: int, world_size: int) -> None:
    """The arguments every source's `batches` takes, checked once."""
    if batch_size <= 0:
        raise HsaeError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise HsaeError(f"rank {rank} is not in 0..{world_size - 1}")
