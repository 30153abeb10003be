"""Synthetic activations from a known forest of features: the ground truth hsae is checked against.

The forest: `n_roots` root features, each with `branching` children, down to `depth` levels. A root
fires with probability `p_root`; an active feature activates exactly one of its children with
probability `p_child` (siblings are mutually exclusive, and a child never fires without its parent).
A child's direction has cosine `parent_cos` with its parent's, the rest a random orthogonal part, so
the hierarchy is visible both in co-occurrence and in geometry. Magnitudes are uniform in
[`mag_low`, `mag_high`]. The sample is x = sum_i a_i d_i + noise.

`SyntheticForest.sample(n, generator)` returns the data together with the true activations; the
directions (`directions`, unit rows) and the parent of each feature (`parents`, -1 for roots) are
attributes of the forest. `SyntheticSource` streams batches of it for training, deterministically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor

from hsae.config import to_dict
from hsae.errors import HsaeError


_FOREST_STREAM = 0x5EED


@dataclass
class SyntheticConfig:
    d_in: int = 96
    n_roots: int = 40
    branching: int = 4
    depth: int = 2
    p_root: float = 0.05
    p_child: float = 0.8
    parent_cos: float = 0.5
    mag_low: float = 0.5
    mag_high: float = 1.5
    noise_std: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        if self.d_in < 2 or self.n_roots < 1 or self.branching < 1 or self.depth < 1:
            raise HsaeError("synthetic: d_in >= 2, n_roots >= 1, branching >= 1, depth >= 1 are needed")
        for name in ("p_root", "p_child"):
            if not 0 <= getattr(self, name) <= 1:
                raise HsaeError(f"synthetic: {name} must be in [0, 1]")
        if not -1 < self.parent_cos < 1:
            raise HsaeError("synthetic: parent_cos must be in (-1, 1)")
        if not 0 <= self.mag_low <= self.mag_high:
            raise HsaeError("synthetic: need 0 <= mag_low <= mag_high")

    @property
    def n_features(self) -> int:
        return self.n_roots * sum(self.branching**level for level in range(self.depth))


@dataclass
class SyntheticBatch:
    x: Tensor  # (n, d_in)
    true_acts: Tensor  # (n, n_features), magnitudes of the true features (0 = off)


class SyntheticForest:
    """The feature forest: directions, parents and levels, built from `config.seed`."""

    def __init__(self, config: SyntheticConfig):
        config.validate()
        self.config = config
        # A stream distinct from torch.manual_seed(seed): with the plain seed, a model initialised
        # with the same seed would start with the true directions as its decoder rows.
        gen = _generator(config.seed, _FOREST_STREAM)
        d = config.d_in
        directions: list[Tensor] = []
        parents: list[int] = []
        levels: list[list[int]] = []
        roots = torch.randn(config.n_roots, d, generator=gen)
        roots /= roots.norm(dim=1, keepdim=True)
        directions.extend(roots)
        parents.extend([-1] * config.n_roots)
        levels.append(list(range(config.n_roots)))
        c = config.parent_cos
        for _ in range(1, config.depth):
            level: list[int] = []
            for p in levels[-1]:
                for _ in range(config.branching):
                    u = torch.randn(d, generator=gen)
                    u -= (u @ directions[p]) * directions[p]
                    u /= u.norm()
                    directions.append(c * directions[p] + math.sqrt(1 - c * c) * u)
                    parents.append(p)
                    level.append(len(parents) - 1)
            levels.append(level)
        self.directions = torch.stack(directions)
        self.directions /= self.directions.norm(dim=1, keepdim=True)
        self.parents = torch.tensor(parents, dtype=torch.long)
        self.levels = levels

    @property
    def n_features(self) -> int:
        return self.parents.numel()

    def sample(self, n: int, generator: torch.Generator) -> SyntheticBatch:
        cfg = self.config
        acts = torch.zeros(n, self.n_features)
        b = cfg.branching

        def magnitudes(count: int) -> Tensor:
            return cfg.mag_low + (cfg.mag_high - cfg.mag_low) * torch.rand(count, generator=generator)

        roots = torch.tensor(self.levels[0])
        on = torch.rand(n, roots.numel(), generator=generator) < cfg.p_root
        rows, cols = on.nonzero(as_tuple=True)
        acts[rows, roots[cols]] = magnitudes(rows.numel())
        for depth in range(1, cfg.depth):
            parent_ids = torch.tensor(self.levels[depth - 1])
            child_ids = torch.tensor(self.levels[depth]).view(-1, b)  # children of each parent
            parent_on = acts[:, parent_ids] > 0
            fires = parent_on & (torch.rand(n, parent_ids.numel(), generator=generator) < cfg.p_child)
            choice = torch.randint(0, b, (n, parent_ids.numel()), generator=generator)
            rows, cols = fires.nonzero(as_tuple=True)
            acts[rows, child_ids[cols, choice[rows, cols]]] = magnitudes(rows.numel())
        x = acts @ self.directions
        if cfg.noise_std > 0:
            x += cfg.noise_std * torch.randn(x.shape, generator=generator)
        return SyntheticBatch(x=x, true_acts=acts)


def _generator(*parts: int) -> torch.Generator:
    # A distinct, reproducible stream per (seed, step, rank): mix the parts into one 63-bit seed.
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p + 0x632BE59BD9B4E019 + (h << 6) + (h >> 2))) & 0x7FFFFFFFFFFFFFFF
    return torch.Generator().manual_seed(h)


class SyntheticSource:
    """An endless, deterministic stream of synthetic activations (ActivationSource)."""

    def __init__(self, config: SyntheticConfig):
        self.config = config
        self.forest = SyntheticForest(config)
        self.d_in = config.d_in

    def batches(
        self, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterator[Tensor]:
        step = start_step
        while True:
            yield self.forest.sample(batch_size, _generator(self.config.seed, step, rank)).x
            step += 1

    def sample(self, n: int) -> Tensor:
        return self.sample_with_truth(n).x

    def sample_with_truth(self, n: int, stream: int = -1) -> SyntheticBatch:
        """A fixed sample (stream -1 is held out from training batches) with its true activations."""
        return self.forest.sample(n, _generator(self.config.seed, stream, -7))

    def describe(self) -> dict[str, Any]:
        return {"kind": "synthetic", **to_dict(self.config)}
