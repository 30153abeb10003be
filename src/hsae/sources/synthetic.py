"""Synthetic activations from a known forest of features: the ground truth hsae is checked against.

The forest: `n_roots` root features, each with `branching` children, down to `depth` levels. A root
fires with probability `p_root`; an active feature activates exactly one of its children with
probability `p_child` (siblings are mutually exclusive, and a child never fires without its parent).
A child's direction has cosine `parent_cos` with its parent's, the rest a random orthogonal part, so
the hierarchy is visible both in co-occurrence and in geometry. Magnitudes are uniform in
[`mag_low`, `mag_high`]. The sample is x = sum_i a_i d_i + noise.

Optional, off by default (the defaults draw exactly the numbers they always drew):
- `exclusive_roots=true`: roots are mutually exclusive, like siblings. Each sample carries root r
  with probability `p_root` and no root with probability 1 - n_roots * p_root (so n_roots * p_root
  must be <= 1). This is the MP-SAE paper's toy (Costa et al. 2025, official tree.json: the top-level
  features are mutually exclusive children of an always-on, unread node), where one concept and at
  most one of its children are present at a time.
- `mag_dist="normal"`: each active feature's magnitude is drawn independently as
  `mag_mean + mag_std * N(0, 1)`, clamped at `mag_floor` * mag_mean from below so that an active
  feature stays positive (the same toy uses 1.5 + 0.25 N(0, 1) for every feature). `mag_low` and
  `mag_high` are then unused.

`SyntheticForest.sample(n, generator)` returns the data together with the true activations; the
directions (`directions`, unit rows) and the parent of each feature (`parents`, -1 for roots) are
attributes of the forest. `SyntheticSource` streams batches of it for training, deterministically.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

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
    # Options (see the module docstring); the defaults keep the original sampling bit for bit.
    exclusive_roots: bool = False
    mag_dist: str = "uniform"  # uniform | normal
    mag_mean: float = 1.5
    mag_std: float = 0.25
    mag_floor: float = 0.01

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
        if self.noise_std < 0:
            raise HsaeError(f"synthetic: noise_std must be >= 0, got {self.noise_std}")
        if not isinstance(self.exclusive_roots, bool):
            raise HsaeError(f"synthetic: exclusive_roots must be true or false, got {self.exclusive_roots!r}")
        if self.exclusive_roots and self.n_roots * self.p_root > 1 + 1e-9:
            raise HsaeError(
                f"synthetic: with exclusive_roots, n_roots * p_root (the probability that a sample has a root) "
                f"must be <= 1, got {self.n_roots} * {self.p_root} = {self.n_roots * self.p_root:g}; "
                f"e.g. p_root={1 / self.n_roots:g}"
            )
        if self.mag_dist not in ("uniform", "normal"):
            raise HsaeError(f"synthetic: mag_dist must be uniform or normal, got {self.mag_dist!r}")
        if not self.mag_mean > 0:
            raise HsaeError("synthetic: mag_mean must be > 0")
        if self.mag_std < 0:
            raise HsaeError("synthetic: mag_std must be >= 0")
        if not 0 < self.mag_floor <= 1:
            raise HsaeError("synthetic: mag_floor must be in (0, 1] (a fraction of mag_mean)")

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
            if cfg.mag_dist == "normal":
                m = cfg.mag_mean + cfg.mag_std * torch.randn(count, generator=generator)
                return m.clamp_min(cfg.mag_floor * cfg.mag_mean)
            return cfg.mag_low + (cfg.mag_high - cfg.mag_low) * torch.rand(count, generator=generator)

        roots = torch.tensor(self.levels[0])
        if cfg.exclusive_roots:
            # one draw per sample: root r when u falls in [r p_root, (r + 1) p_root), none past n_roots p_root
            slot = (
                (torch.rand(n, generator=generator) / cfg.p_root).floor().long()
                if cfg.p_root > 0
                else torch.full((n,), roots.numel())
            )
            on = slot[:, None] == torch.arange(roots.numel())
        else:
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

    def batches(self, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[Tensor]:
        step = start_step
        while True:
            yield self.forest.sample(batch_size, _generator(self.config.seed, step, rank)).x
            step += 1

    def sample(self, n: int) -> Tensor:
        return self.sample_with_truth(n).x

    def epoch_rows(self) -> int | None:
        return None  # an endless stream: every batch is new

    def sample_with_truth(self, n: int, stream: int = -1) -> SyntheticBatch:
        """A fixed sample (stream -1 is held out from training batches) with its true activations."""
        return self.forest.sample(n, _generator(self.config.seed, stream, -7))

    def describe(self) -> dict[str, Any]:
        return {"kind": "synthetic", **to_dict(self.config)}
