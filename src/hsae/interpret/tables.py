"""For every latent, the entries with the largest keys seen so far in a stream, with what to show for them.

The examples pass keeps several such tables: the top activations (key = activation), the most negative
ones of signed codes (key = -activation), and a uniform sample of all firings (key = a uniform random
number: the entries with the largest random keys are a uniform sample without replacement, which is
how quantile examples and co-firing statistics are drawn without knowing in advance how often a
latent fires). Memory is n_latents x capacity entries whatever the stream's length.

An offer costs O(entries) to compare against each latent's current threshold; only entries above it
(all of them at first, few once the table has filled) are ranked and merged, and the payload (context
window, co-active latents) is built only for the entries that actually enter the table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

PayloadSpec = dict[str, tuple[tuple[int, ...], torch.dtype, float]]  # name -> (shape per entry, dtype, fill)


class BestPerLatent:
    def __init__(self, n_latents: int, capacity: int, payload: PayloadSpec):
        self.n_latents, self.capacity = n_latents, capacity
        self.keys = torch.full((n_latents, capacity), -torch.inf)
        self.payload = {
            name: torch.full((n_latents, capacity, *shape), fill, dtype=dtype)
            for name, (shape, dtype, fill) in payload.items()
        }
        # The smallest key each latent holds (-inf while a slot is free): an entry must beat it to enter.
        self.threshold = torch.full((n_latents,), -torch.inf)

    def offer(self, latents: Tensor, keys: Tensor, make_payload: Callable[[Tensor], dict[str, Tensor]]) -> None:
        """Offer entries (latents[e], keys[e] > 0); `make_payload(e)` builds the payload of the entries e
        that enter, as tensors with one row per entry."""
        beats = (keys > self.threshold[latents]).nonzero().squeeze(1)
        if beats.numel() == 0:
            return
        lat, key = latents[beats], keys[beats]
        # Rank the candidates within each latent, largest key first, and keep at most `capacity` each:
        # one sort of (latent, descending key) packed in an int64 (keys are positive floats here, whose
        # bit patterns order as the floats do).
        packed = lat * (1 << 31) + ((1 << 31) - 1 - key.float().view(torch.int32).long())
        order = torch.sort(packed, stable=True).indices
        groups, counts = torch.unique_consecutive(lat[order], return_counts=True)
        group = torch.repeat_interleave(torch.arange(groups.numel()), counts)
        rank = torch.arange(order.numel()) - (counts.cumsum(0) - counts)[group]
        keep = rank < self.capacity
        order, group, rank = order[keep], group[keep], rank[keep]
        n_groups, cap = groups.numel(), self.capacity
        cand_keys = torch.full((n_groups, cap), -torch.inf)
        cand_keys[group, rank] = key[order]
        cand_entry = torch.full((n_groups, cap), -1, dtype=torch.long)
        cand_entry[group, rank] = beats[order]
        # The best `capacity` of old and new together; the new ones that make it replace the smallest old ones.
        old_keys = self.keys[groups]
        chosen = torch.zeros(n_groups, 2 * cap, dtype=torch.bool)
        chosen.scatter_(1, torch.cat([old_keys, cand_keys], 1).topk(cap, dim=1).indices, True)
        winners = chosen[:, cap:] & (cand_entry >= 0)
        n_win = winners.sum(1)
        evict_order = old_keys.argsort(dim=1)
        evict = evict_order[torch.arange(cap)[None, :] < n_win[:, None]]
        rows = groups[torch.repeat_interleave(torch.arange(n_groups), n_win)]
        entries = cand_entry[winners]
        self.keys[rows, evict] = keys[entries]
        for name, values in make_payload(entries).items():
            self.payload[name][rows, evict] = values.to(self.payload[name].dtype)
        self.threshold[groups] = self.keys[groups].min(dim=1).values

    def filled(self) -> tuple[Tensor, Tensor]:
        """(latent, slot) of every held entry, by latent, largest key first within a latent."""
        order = self.keys.argsort(dim=1, descending=True, stable=True)
        held = torch.gather(self.keys, 1, order) > -torch.inf
        latents = torch.arange(self.n_latents)[:, None].expand_as(order)
        return latents[held], order[held]

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        out = {f"{prefix}.keys": self.keys}
        out.update({f"{prefix}.{name}": value for name, value in self.payload.items()})
        return out

    def load(self, tensors: dict[str, Tensor], prefix: str) -> None:
        self.keys = tensors[f"{prefix}.keys"].clone()
        for name in self.payload:
            self.payload[name] = tensors[f"{prefix}.{name}"].clone()
        self.threshold = self.keys.min(dim=1).values
