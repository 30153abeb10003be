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
    epoch_rows: Callable[[], int], rows_from: Callable[[int, int], Iterable[Tensor]], start_row: int, what: str = "data"
) -> Iterator[Tensor]:
    """Row blocks of the endless stream from row `start_row`: `rows_from(epoch, row)` yields an
    epoch's blocks from its row `row` on; `epoch_rows()` (rows per epoch, called only to resume past
    row 0, since counting may cost a pass over the data) locates the start. An epoch with no rows
    at all is an error (`what` names the data), not an endless loop."""
    epoch, offset = 0, 0
    if start_row:
        per_epoch = epoch_rows()
        if per_epoch <= 0:
            raise HsaeError(f"the {what} gives no rows to read")
        epoch, offset = divmod(start_row, per_epoch)
    while True:
        rows = 0
        for block in rows_from(epoch, offset):
            rows += len(block)
            yield block
        if rows == 0 and offset == 0:
            raise HsaeError(f"the {what} gives no rows to read")
        epoch, offset = epoch + 1, 0


# Every this-many-th document (by its number in the corpus, or row of an array file) is held out of
# training for evaluation: 5%, spread evenly over the corpus, whole documents on one side.
DEFAULT_HELDOUT_EVERY = 20
SPLITS = ("train", "heldout", "all")


def check_split(split: str, heldout_every: int) -> None:
    if split not in SPLITS:
        raise HsaeError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if heldout_every < 0 or heldout_every == 1:
        raise HsaeError(f"heldout_every must be 0 (hold nothing out) or at least 2, got {heldout_every}")


def in_split(ids: Tensor, split: str, heldout_every: int) -> Tensor:
    """Which rows of document (or row) numbers `ids` belong to `split`: the held-out rows are those
    of every `heldout_every`-th document (numbers heldout_every - 1, 2 * heldout_every - 1, ...)."""
    if split == "all" or heldout_every == 0:
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    held = ids % heldout_every == heldout_every - 1
    return held if split == "heldout" else ~held


def check_batch_request(batch_size: int, rank: int, world_size: int) -> None:
    """The arguments every source's `batches` takes, checked once."""
    if batch_size <= 0:
        raise HsaeError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise HsaeError(f"rank {rank} is not in 0..{world_size - 1}")
