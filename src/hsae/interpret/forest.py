"""Post-hoc feature forests for models without a built-in tree (flat families, Matryoshka, MP-SAE).

For every pair of latents the extraction measures, over a sample of activations,
- coverage(i | j) = P(latent i active | latent j active)  (co-activation; Masked-Cosine-Similarity
  style), and
- cos(i, j), the cosine of their decoder rows,
and gives latent j the parent i that maximises coverage(i | j) (ties broken by decoder cosine) among
candidates with coverage >= `min_coverage`, cosine >= `min_cosine` and a strictly higher firing
frequency than j (a parent is more general than its child; this also makes the result acyclic).
Latents that fire fewer than `min_fires` times get no parent. Works on any loaded model: it only
uses `encode` and `W_dec`.

Cost: one (n_latents x n_latents) co-occurrence matrix (float32), accumulated from the sparse codes
(the pairs of latents active in the same row, O(rows * L0^2)); candidate parents are then scored a
block of children at a time, so nothing else of that size exists. Fine up to a few ten thousand
latents; no (rows x latents) tensor is formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hsae.errors import HsaeError
from hsae.models.codes import Codes, as_sparse, encode_rows


@dataclass
class ForestOptions:
    min_coverage: float = 0.6
    min_cosine: float = -0.25
    min_fires: int = 10
    batch_size: int = 4096


@dataclass
class ExtractedForest:
    parents: Tensor  # (n_latents,) long, -1 = no parent
    coverage: Tensor  # (n_latents,) P(parent on | child on) of the chosen parent (nan without one)
    cosine: Tensor  # (n_latents,) decoder cosine with the chosen parent (nan without one)
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
    if not 0 <= opt.min_coverage <= 1:
        raise HsaeError(f"min_coverage must be in [0, 1], got {opt.min_coverage}")
    if x.shape[0] == 0:
        raise HsaeError("post-hoc forest extraction needs at least one activation row")
    counts, co = coactivation(sae, x, opt.batch_size, codes)
    with torch.no_grad():
        dec = sae.W_dec.detach().float().cpu()
    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    m = sae.n_latents
    parents = torch.full((m,), -1, dtype=torch.long)
    coverage = torch.full((m,), float("nan"))
    cosine = torch.full((m,), float("nan"))
    fcounts = counts.float()
    for j0 in range(0, m, CHILD_BLOCK):
        j1 = min(m, j0 + CHILD_BLOCK)
        cov = co[:, j0:j1] / fcounts[j0:j1].clamp_min(1)[None, :]  # cov[i, j] = P(i on | j on)
        cos = dec @ dec[j0:j1].T
        ok = (cov >= opt.min_coverage) & (cos >= opt.min_cosine) & (counts[:, None] > counts[None, j0:j1])
        ok &= counts[None, j0:j1] >= opt.min_fires
        ok[torch.arange(j0, j1), torch.arange(j1 - j0)] = False  # no latent is its own parent
        score = torch.where(ok, cov + 1e-3 * cos, torch.full_like(cov, -1.0))
        best, parent = score.max(dim=0)
        has = best >= 0
        cols = torch.arange(j1 - j0)
        parents[j0:j1] = torch.where(has, parent, torch.full_like(parent, -1))
        coverage[j0:j1] = torch.where(has, cov[parent, cols], coverage[j0:j1])
        cosine[j0:j1] = torch.where(has, cos[parent, cols], cosine[j0:j1])
    return ExtractedForest(
        parents=parents,
        coverage=coverage,
        cosine=cosine,
        fire_counts=counts.long(),
        n_samples=int(x.shape[0]),
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
    "has_builtin_hierarchy",
    "model_forest",
]
