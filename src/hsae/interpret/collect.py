"""What the examples pass keeps as rows stream by: per latent counts, a histogram and example tables.

For each block of rows (with a few rows of context on either side) it adds:
- firing counts, token counts (the corpus's base rates, for labelling), and a histogram of activation
  values per latent on a fixed log scale (8 bins a decade over 1e-4..1e4, negative values in a
  mirrored half): exact and streaming, where linear bins would need each latent's maximum in advance;
- the top activations (and, for signed codes, the most negative ones) with the context window around
  each and the latent's activation on every token of it;
- a uniform sample of every latent's firings (for quantile examples), each with the other latents
  active on the same token (for co-firing statistics);
- a uniform sample of context windows of the whole stream, each with every latent active anywhere in
  it (the non-activating and near-miss contexts of the scorers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hsae.interpret.rows import RowBlock
from hsae.interpret.tables import BestPerLatent

HIST_LOW, HIST_HIGH, HIST_PER_DECADE = -4, 4, 8
HIST_BINS = (HIST_HIGH - HIST_LOW) * HIST_PER_DECADE  # bins per sign


def histogram_edges() -> list[float]:
    """Edges of the |activation| bins (HIST_BINS + 1 values); the outer bins also hold what lies beyond."""
    return [10.0 ** (HIST_LOW + i / HIST_PER_DECADE) for i in range(HIST_BINS + 1)]


def histogram_bin(values: Tensor) -> Tensor:
    """Bin of each nonzero value: 0..HIST_BINS-1 for positive values, HIST_BINS.. for negative ones."""
    b = ((values.abs().log10() - HIST_LOW) * HIST_PER_DECADE).floor().clamp(0, HIST_BINS - 1).long()
    return b + (values < 0).long() * HIST_BINS


class EntryLookup:
    """The value of latent l on row r of a block (0 where inactive), for many (r, l) at once."""

    def __init__(self, block: RowBlock, n_latents: int):
        keys = block.entry_rows() * n_latents + block.latents
        self.keys, order = keys.sort()
        self.values = block.values[order]
        self.n_latents = n_latents

    def value(self, rows: Tensor, latents: Tensor) -> Tensor:
        if self.keys.numel() == 0:
            return torch.zeros(rows.shape)
        query = rows * self.n_latents + latents
        at = torch.searchsorted(self.keys, query).clamp(max=self.keys.numel() - 1)
        return torch.where(self.keys[at] == query, self.values[at], torch.zeros(()))


def row_latents(block: RowBlock, rows: Tensor, width: int) -> Tensor:
    """(len(rows), width) int64: the first `width` active latents of each row (TopK codes list the
    strongest first), -1 padded."""
    start = block.offsets[rows]
    count = block.offsets[rows + 1] - start
    slot = torch.arange(width)
    if block.latents.numel() == 0:
        return torch.full((rows.numel(), width), -1, dtype=torch.long)
    at = (start[:, None] + slot).clamp(max=block.latents.numel() - 1)
    return torch.where(slot[None, :] < count[:, None], block.latents[at], -1)


class ExampleTables:
    def __init__(
        self,
        n_latents: int,
        *,
        top: int,
        sample: int,
        before: int,
        after: int,
        cofire_width: int,
        contexts: int,
        seed: int,
    ):
        self.n_latents, self.before, self.after, self.cofire_width = n_latents, before, after, cofire_width
        width = before + 1 + after
        self.window_spec = {
            "value": ((), torch.float32, 0.0),
            "row": ((), torch.long, -1),
            "doc": ((), torch.long, -1),
            "position": ((), torch.long, -1),
            "tokens": ((width,), torch.int32, -1),
            "acts": ((width,), torch.float32, 0.0),
        }
        self.top_capacity = top
        self.top = BestPerLatent(n_latents, top, self.window_spec)
        self.bottom: BestPerLatent | None = None  # made when the first negative activation arrives
        self.sample = BestPerLatent(
            n_latents, sample, {**self.window_spec, "coactive": ((cofire_width,), torch.int32, -1)}
        )
        self.contexts = BestPerLatent(
            1,
            contexts,
            {
                "row": ((), torch.long, -1),
                "tokens": ((width,), torch.int32, -1),
                "active": ((width * cofire_width,), torch.int32, -1),
            },
        )
        self.fires = torch.zeros(n_latents, dtype=torch.long)
        self.hist = torch.zeros(n_latents, 2 * HIST_BINS, dtype=torch.long)
        self.token_counts = torch.zeros(0, dtype=torch.long)
        self.rows_seen = 0
        self.generator = torch.Generator().manual_seed(seed)

    # -- per block ------------------------------------------------------------------------------

    def _window_rows(self, block: RowBlock, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(rows clamped into the block, valid mask), (len(rows), window): the rows around each row that
        belong to its document."""
        offsets = torch.arange(-self.before, self.after + 1)
        around = rows[:, None] + offsets
        clamped = around.clamp(0, len(block) - 1)
        valid = (around >= 0) & (around < len(block)) & (block.doc_ids[clamped] == block.doc_ids[rows][:, None])
        return clamped, valid

    def _windows(self, block: RowBlock, lookup: EntryLookup, rows: Tensor, latents: Tensor, values: Tensor):
        around, valid = self._window_rows(block, rows)
        acts = torch.zeros(around.shape)
        acts[valid] = lookup.value(around[valid], latents[:, None].expand_as(around)[valid])
        return {
            "value": values,
            "row": block.rows[rows],
            "doc": block.doc_ids[rows],
            "position": block.positions[rows],
            "tokens": torch.where(valid, block.token_ids[around], -1),
            "acts": acts,
        }

    def _context(self, block: RowBlock, rows: Tensor) -> dict[str, Tensor]:
        around, valid = self._window_rows(block, rows)
        active = row_latents(block, around.reshape(-1), self.cofire_width).view(rows.numel(), -1)
        active = torch.where(valid.repeat_interleave(self.cofire_width, dim=1), active, -1).sort(dim=1).values
        repeat = torch.zeros_like(active, dtype=torch.bool)
        repeat[:, 1:] = active[:, 1:] == active[:, :-1]
        active = torch.where(repeat, -1, active).sort(dim=1, descending=True).values
        return {"row": block.rows[rows], "tokens": torch.where(valid, block.token_ids[around], -1), "active": active}

    def add(self, block: RowBlock, lo: int, hi: int) -> None:
        """Count rows lo..hi-1 of `block`; the rest of it is context for their windows."""
        n = self.n_latents
        first, last = int(block.offsets[lo]), int(block.offsets[hi])
        latents, values = block.latents[first:last], block.values[first:last]
        rows = block.entry_rows()[first:last]
        lookup = EntryLookup(block, n)

        self.fires += torch.bincount(latents, minlength=n)
        self.hist.view(-1).add_(
            torch.bincount(latents * 2 * HIST_BINS + histogram_bin(values), minlength=self.hist.numel())
        )
        counts = torch.bincount(block.token_ids[lo:hi])
        if counts.numel() > self.token_counts.numel():
            self.token_counts = torch.cat(
                [self.token_counts, counts.new_zeros(counts.numel() - self.token_counts.numel())]
            )
        self.token_counts[: counts.numel()] += counts
        self.rows_seen += hi - lo

        def windows_of(entries: Tensor):
            return lambda e: self._windows(block, lookup, rows[entries[e]], latents[entries[e]], values[entries[e]])

        positive = (values > 0).nonzero().squeeze(1)
        self.top.offer(latents[positive], values[positive], windows_of(positive))
        negative = (values < 0).nonzero().squeeze(1)
        if negative.numel():
            if self.bottom is None:
                self.bottom = BestPerLatent(n, self.top_capacity, self.window_spec)
            self.bottom.offer(latents[negative], -values[negative], windows_of(negative))

        every = torch.arange(latents.numel())
        with_window = windows_of(every)

        def sampled(e: Tensor) -> dict[str, Tensor]:
            return {**with_window(e), "coactive": row_latents(block, rows[e], self.cofire_width)}

        self.sample.offer(latents, torch.rand(latents.numel(), generator=self.generator), sampled)
        here = torch.arange(lo, hi)
        self.contexts.offer(
            torch.zeros(here.numel(), dtype=torch.long),
            torch.rand(here.numel(), generator=self.generator),
            lambda e: self._context(block, here[e]),
        )

    # -- checkpoints ----------------------------------------------------------------------------

    def tensors(self) -> dict[str, Tensor]:
        out = {"fires": self.fires, "hist": self.hist, "token_counts": self.token_counts}
        out["generator"] = self.generator.get_state()
        out["rows_seen"] = torch.tensor(self.rows_seen)
        for name, table in self.tables().items():
            out.update(table.tensors(name))
        return out

    def load(self, tensors: dict[str, Tensor]) -> None:
        self.fires, self.hist = tensors["fires"].clone(), tensors["hist"].clone()
        self.token_counts = tensors["token_counts"].clone()
        self.generator.set_state(tensors["generator"].clone())
        self.rows_seen = int(tensors["rows_seen"])
        if "bottom.keys" in tensors:
            self.bottom = BestPerLatent(self.n_latents, self.top_capacity, self.window_spec)
        for name, table in self.tables().items():
            table.load(tensors, name)

    def tables(self) -> dict[str, Any]:
        named = {"top": self.top, "sample": self.sample, "contexts": self.contexts}
        if self.bottom is not None:
            named["bottom"] = self.bottom
        return named
