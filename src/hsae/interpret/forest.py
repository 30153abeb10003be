"""Post-hoc feature forests for models without a built-in tree (flat families, Matryoshka, MP-SAE).

For every pair of latents the extraction measures, over a sample of activations,
- coverage(i | j) = P(latent i active | latent j active) (co-activation),
- lift(i | j) = coverage(i | j) / P(latent i active): how much more often i fires with j than at
  its base rate (a latent that fires on half the tokens covers half of anything, lift 1), and
- cos(i, j), the cosine of their decoder rows,
and gives latent j the parent i of best lift (`rank="lift"`; or best coverage) among candidates with
coverage >= `min_coverage`, lift >= `min_lift`, cosine >= `min_cosine`, a firing rate of at most
`max_parent_density` and a strictly higher fire count than j (a parent is more general than its
child; this also makes the result acyclic); ties are broken by decoder cosine. Latents that fire
fewer than `min_fires` times get no parent. The defaults were chosen by measurement on hsae's and
SAELens's synthetic forests and on MiniLM + WordNet (docs/hierarchy.md, benchmarks/forest_criterion.py).
Works on any loaded model: it only uses `encode` and `W_dec`.

Cost: one (n_latents x n_latents) co-occurrence matrix (float32), accumulated from the sparse codes
(the pairs of latents active in the same row, O(rows * L0^2)); candidate parents are then scored a
block of children at a time, so nothing else of that size exists. Fine up to a few ten thousand
latents; no (rows x latents) tensor is formed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hsae.errors import HsaeError
from hsae.models.codes import Codes, as_sparse, encode_rows

RANKS = ("coverage", "lift")


@dataclass
class ForestOptions:
    min_coverage: float = 0.3
    min_cosine: float = -0.25
    min_fires: int = 10
    # 0 and 1.0 switch these two off (coverage alone, as before issue 16: min_coverage 0.6)
    min_lift: float = 2.0
    max_parent_density: float = 1.0
    rank: str = "lift"
    batch_size: int = 4096

    def validate(self) -> None:
        if not 0 <= self.min_coverage <= 1:
            raise HsaeError(f"min_coverage must be in [0, 1], got {self.min_coverage}")
        if not -1 <= self.min_cosine <= 1:
            raise HsaeError(f"min_cosine must be in [-1, 1], got {self.min_cosine}")
        if self.min_lift < 0 or not math.isfinite(self.min_lift):
            raise HsaeError(f"min_lift must be a finite number >= 0, got {self.min_lift}")
        if not 0 < self.max_parent_density <= 1:
            raise HsaeError(f"max_parent_density must be in (0, 1], got {self.max_parent_density}")
        if self.rank not in RANKS:
            raise HsaeError(f"rank must be one of {', '.join(RANKS)}, got {self.rank!r}")
        if self.min_fires < 0 or self.batch_size <= 0:
            raise HsaeError("min_fires must be >= 0 and batch_size positive")

    def describe(self) -> str:
        """The criterion in words, for printing."""
        parts = [f"coverage >= {self.min_coverage:g}"]
        if self.min_lift > 0:
            parts.append(f"lift >= {self.min_lift:g}")
        if self.max_parent_density < 1:
            parts.append(f"parent density <= {self.max_parent_density:g}")
        parts.append(f"cosine >= {self.min_cosine:g}")
        return ", ".join(parts) + f"; the parent of best {self.rank}"


@dataclass
class ExtractedForest:
    parents: Tensor  # (n_latents,) long, -1 = no parent
    coverage: Tensor  # (n_latents,) P(parent on | child on) of the chosen parent (nan without one)
    cosine: Tensor  # (n_latents,) decoder cosine with the chosen parent (nan without one)
    lift: Tensor  # (n_latents,) P(parent on | child on) / P(parent on) of the chosen parent (nan without one)
    fire_counts: Tensor  # (n_latents,)
    n_samples: int


# Pairs (i, j) of latents active in one row added to the co-occurrence matrix at once, and children
# (columns) scored at once: bounded temporaries whatever the sample size and width.
PAIR_CHUNK = 1 << 22
CHILD_BLOCK = 1024


def coactivation(sae, x: Tensor, batch_size: int = 4096, codes: Codes | None = None) -> tuple[Tensor, Tensor]:
    """Fire counts (m,) and co-occurrence counts (m, m) of the latents of `sae` on raw activations x
    (or on their `codes`, if at hand): co[i, j] = rows where both i and j are active."""
    m = sae.n_latents
    csr = (encode_rows(sae, x, batch_size) if codes is None else as_sparse(codes).to("cpu")).csr()
    assert csr.offsets is not None
    counts = torch.bincount(csr.indices, minlength=m).double()
    co = torch.zeros(m * m, dtype=torch.float32)
    per_row = csr.offsets.diff()
    # rows grouped so that each group's pairs (sum of L0^2) stay within PAIR_CHUNK
    cost = torch.cumsum(per_row * per_row, 0)
    start = 0
    n = per_row.numel()
    while start < n:
        base = int(cost[start - 1]) if start else 0
        stop = max(start + 1, int(torch.searchsorted(cost, base + PAIR_CHUNK, right=True)))
        lo, hi = int(csr.offsets[start]), int(csr.offsets[stop])
        lat = csr.indices[lo:hi]
        sizes = per_row[start:stop]
        row = torch.arange(stop - start).repeat_interleave(sizes)
        # all ordered pairs within a row: entry e with every entry of its row
        first = csr.offsets[start:stop] - lo
        a = torch.arange(hi - lo).repeat_interleave(sizes[row])
        b = first[row].repeat_interleave(sizes[row]) + _within(sizes[row])
        co.index_add_(0, lat[a] * m + lat[b], torch.ones(a.numel()))
        start = stop
    return counts, co.view(m, m)


def _within(sizes: Tensor) -> Tensor:
    """0, 1, ..., s-1 for each size s, concatenated."""
    total = int(sizes.sum())
    starts = torch.cumsum(sizes, 0) - sizes
    return torch.arange(total) - starts.repeat_interleave(sizes)


def extract_forest(sae, x: Tensor, options: ForestOptions | None = None, codes: Codes | None = None) -> ExtractedForest:
    """The post-hoc forest (module docstring) of `sae` on raw activations x (or their `codes`)."""
    opt = options or ForestOptions()
    opt.validate()
    if x.shape[0] == 0:
        raise HsaeError("post-hoc forest extraction needs at least one activation row")
    counts, co = coactivation(sae, x, opt.batch_size, codes)
    with torch.no_grad():
        dec = sae.W_dec.detach().float().cpu()
    return forest_from_coactivation(counts, co, int(x.shape[0]), dec, opt)


def forest_from_coactivation(
    counts: Tensor, co: Tensor, n_rows: int, W_dec: Tensor, options: ForestOptions | None = None
) -> ExtractedForest:
    """The forest from fire counts (m,), co-occurrence counts (m, m) over `n_rows` rows and the
    decoder rows (m, d): children are scored a block at a time."""
    opt = options or ForestOptions()
    opt.validate()
    dec = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    m = counts.numel()
    parents = torch.full((m,), -1, dtype=torch.long)
    coverage = torch.full((m,), float("nan"))
    cosine = torch.full((m,), float("nan"))
    lift = torch.full((m,), float("nan"))
    fcounts = counts.float()
    density = fcounts / max(1, n_rows)  # P(i on)
    parent_ok = (density <= opt.max_parent_density)[:, None]
    for j0 in range(0, m, CHILD_BLOCK):
        j1 = min(m, j0 + CHILD_BLOCK)
        cov = co[:, j0:j1] / fcounts[j0:j1].clamp_min(1)[None, :]  # cov[i, j] = P(i on | j on)
        lif = cov / density.clamp_min(1e-12)[:, None]  # P(i on | j on) / P(i on)
        cos = dec @ dec[j0:j1].T
        ok = (cov >= opt.min_coverage) & (lif >= opt.min_lift) & (cos >= opt.min_cosine) & parent_ok
        ok &= counts[:, None] > counts[None, j0:j1]
        ok &= counts[None, j0:j1] >= opt.min_fires
        ok[torch.arange(j0, j1), torch.arange(j1 - j0)] = False  # no latent is its own parent
        rank = cov if opt.rank == "coverage" else lif
        score = torch.where(ok, rank + 1e-3 * cos, torch.full_like(cov, -math.inf))
        best, parent = score.max(dim=0)
        has = best > -math.inf
        cols = torch.arange(j1 - j0)
        parents[j0:j1] = torch.where(has, parent, torch.full_like(parent, -1))
        coverage[j0:j1] = torch.where(has, cov[parent, cols], coverage[j0:j1])
        cosine[j0:j1] = torch.where(has, cos[parent, cols], cosine[j0:j1])
        lift[j0:j1] = torch.where(has, lif[parent, cols], lift[j0:j1])
    return ExtractedForest(
        parents=parents, coverage=coverage, cosine=cosine, lift=lift, fire_counts=counts.long(), n_samples=n_rows
    )


def has_builtin_hierarchy(sae) -> bool:
    return bool(type(sae).builtin_hierarchy)


def model_forest(sae, x: Tensor | None = None, options: ForestOptions | None = None) -> Tensor:
    """The forest to report for `sae`: its built-in tree, or (flat families) the post-hoc extraction
    on x (if given) — otherwise what `hierarchy()` holds (a forest saved earlier, or all roots)."""
    if has_builtin_hierarchy(sae) or x is None:
        return sae.hierarchy()
    return extract_forest(sae, x, options).parents


__all__ = [
    "ForestOptions",
    "ExtractedForest",
    "coactivation",
    "extract_forest",
    "forest_from_coactivation",
    "has_builtin_hierarchy",
    "model_forest",
]
