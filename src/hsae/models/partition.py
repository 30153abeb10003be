"""Splitting a dictionary into consecutive groups (Matryoshka prefixes, forest levels, tree layers)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch


def bounds_from_fractions(n_latents: int, fractions: Sequence[float]) -> list[int]:
    """Cut points [0, c1, ..., n_latents] of groups sized in proportion to `fractions`.

    A cut that rounds onto a previous one or onto the end is dropped, so a group too small for
    `n_latents` vanishes; callers compare the number of groups with the number of fractions.
    """
    total = sum(fractions)
    cuts, acc = [0], 0.0
    for f in fractions[:-1]:
        acc += f / total
        cut = int(round(acc * n_latents))
        if cuts[-1] < cut < n_latents:
            cuts.append(cut)
    return cuts + [n_latents]


def group_of_latents(bounds: Sequence[int]) -> torch.Tensor:
    """The group index of every latent, LongTensor (bounds[-1],), from cut points [0, ..., n]."""
    # Built from Python ints: tensor arithmetic on the meta device (base.parameter_count) would load
    # torch's reference ops (a second of start-up).
    return torch.tensor(
        [g for g, (lo, hi) in enumerate(itertools.pairwise(bounds)) for _ in range(hi - lo)], dtype=torch.long
    )
