"""What the trainer reads: a source of activation batches.

Every source is deterministic given its seed, so a resumed run sees exactly the batches the
uninterrupted one would have: `batches(batch_size, start_step=s)` yields batch s, s+1, ... . Data-
parallel ranks pass `rank`/`world_size` and get disjoint data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class ActivationSource(Protocol):
    d_in: int

    def batches(self, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[Tensor]:
        """Float32 batches (batch_size, d_in), endless (epochs wrap), starting at `start_step`."""
        ...

    def sample(self, n: int) -> Tensor:
        """A fixed sample of up to n rows (for b_dec and input-scale initialisation, quick eval)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What to record in config.json's "data" section (kind, path, model, hook, split, ...)."""
        ...

    def epoch_rows(self) -> int | None:
        """Rows one pass over the data reads (the trainer reports epochs), None when endless or unknown."""
        ...
