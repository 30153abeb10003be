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

Cost: one (n_latents x n_latents) co-occurrence matrix (float32), accumulated in batches; fine up to
a few ten thousand latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hsae.errors import HsaeError
from hsae.models.codes import to_dense


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


def coactivation(sae, x: Tensor, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Fire counts (m,) and co-occurrence counts (m, m) of the latents of `sae` on raw activations x."""
    m = sae.n_latents
    counts = torch.zeros(m, dtype=torch.float64)
    co = torch.zeros(m, m, dtype=torch.float32)
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            a = (to_dense(sae.encode(x[start : start + batch_size])) != 0).float().cpu()
            counts += a.sum(0).double()
            co += a.T @ a
    return counts, co


def extract_forest(sae, x: Tensor, options: ForestOptions | None = None) -> ExtractedForest:
    opt = options or ForestOptions()
    if not 0 <= opt.min_coverage <= 1:
        raise HsaeError(f"min_coverage must be in [0, 1], got {opt.min_coverage}")
    if x.shape[0] == 0:
        raise HsaeError("post-hoc forest extraction needs at least one activation row")
    counts, co = coactivation(sae, x, opt.batch_size)
    with torch.no_grad():
        dec = sae.W_dec.detach().float().cpu()
    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = dec @ dec.T
    cov = co / counts.float().clamp_min(1)[None, :]  # cov[i, j] = P(i on | j on)
    ok = (cov >= opt.min_coverage) & (cos >= opt.min_cosine) & (counts[:, None] > counts[None, :]).float().bool()
    ok &= counts[None, :] >= opt.min_fires
    ok.fill_diagonal_(False)
    score = torch.where(ok, cov + 1e-3 * cos, torch.full_like(cov, -1.0))
    best, parent = score.max(dim=0)
    has = best >= 0
    parents = torch.where(has, parent, torch.full_like(parent, -1))
    idx = torch.arange(sae.n_latents)
    nan = torch.full((sae.n_latents,), float("nan"))
    return ExtractedForest(
        parents=parents.long(),
        coverage=torch.where(has, cov[parent, idx], nan),
        cosine=torch.where(has, cos[parent, idx], nan),
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
