"""Hierarchy metrics: tree statistics, and, on synthetic data with a known forest, absorption, edge
precision/recall/F1 and parent coverage. All are functions of tensors (no CLI, no files).

Definitions (used by the CLI, the benchmarks and the tests alike):

- A *forest* is a LongTensor `parents` of length n_latents, -1 for a latent without a parent.
  `tree_stats` counts: `edges` (latents with a parent), `roots` (no parent, at least one child),
  `orphans` (no parent and no child: latents outside every tree), `depth` (edges on the longest
  root-to-leaf path; 0 without edges), `mean_branching` / `max_branching` (children per latent that
  has any), `in_tree` (latents in some tree).
- *Latent of a true feature*: L(f) = the latent whose decoder row has the highest cosine with the
  true direction d_f (`hsae.eval.groundtruth.best_match_cosines`).
- *Absorption* (`absorption`): over every true edge (p, c) and every sample where both true features
  p and c are active and the child's latent L(c) fires, the fraction where the parent's latent L(p) is
  silent (micro-averaged over all such (edge, sample) pairs). When L(p) == L(c) the model has no
  separate parent latent for that pair, and every such sample counts as absorbed. Pairs whose L(c)
  never fires on those samples contribute nothing (that is a recovery failure, not absorption; see
  `child_silent`, the fraction of (edge, sample) pairs with both true features on where L(c) is
  silent).
- *Edge precision/recall/F1* (`edge_scores`): the true edges mapped into latent space are
  T = {(L(p), L(c))}. Reported edges are R = {(parents[j], j)} restricted to latents that are the
  image of some true feature (edges between latents that match nothing cannot be judged against the
  truth and are ignored). precision = |R ∩ T| / |R|, recall = fraction of true edges (p, c) with
  parents[L(c)] == L(p) and L(p) != L(c), F1 their harmonic mean (0 when both are 0).
- *Parent coverage* (`parent_coverage`): for reported edges (i -> j), P(i active | j active) over the
  data, averaged over edges whose child fired; Tree SAE's activation condition makes it 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hsae.errors import HsaeError
from hsae.eval.groundtruth import best_match_cosines
from hsae.models.codes import Codes, as_sparse, encode_rows


# ----- forest structure ---------------------------------------------------------------------------
def depths(parents: Tensor) -> Tensor:
    """Depth of every latent (0 for a latent without a parent); raises on a cycle."""
    parents = torch.as_tensor(parents, dtype=torch.long).cpu()
    n = parents.numel()
    if n and (parents.max() >= n or parents.min() < -1):
        raise HsaeError("parents holds an index outside [-1, n_latents)")
    depth = torch.zeros(n, dtype=torch.long)
    cur = parents.clone()
    for step in range(1, n + 2):
        has = cur >= 0
        if not has.any():
            return depth
        depth[has] = step
        cur = torch.where(has, parents[cur.clamp_min(0)], cur)
    raise HsaeError("the parent links contain a cycle; not a forest")


@dataclass
class TreeStats:
    n_latents: int
    edges: int
    roots: int
    orphans: int
    in_tree: int
    depth: int
    mean_branching: float
    max_branching: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def tree_stats(parents: Tensor) -> TreeStats:
    parents = torch.as_tensor(parents, dtype=torch.long).cpu()
    n = parents.numel()
    d = depths(parents)
    has_parent = parents >= 0
    children = torch.bincount(parents[has_parent], minlength=n) if n else torch.zeros(0, dtype=torch.long)
    has_children = children > 0
    roots = int((~has_parent & has_children).sum())
    orphans = int((~has_parent & ~has_children).sum())
    return TreeStats(
        n_latents=n,
        edges=int(has_parent.sum()),
        roots=roots,
        orphans=orphans,
        in_tree=n - orphans,
        depth=int(d.max()) if n else 0,
        mean_branching=float(children[has_children].float().mean()) if roots or has_children.any() else 0.0,
        max_branching=int(children.max()) if n else 0,
    )


def children_of(parents: Tensor, i: int) -> list[int]:
    return torch.nonzero(torch.as_tensor(parents) == i).flatten().tolist()


# ----- against a known forest --------------------------------------------------------------------
def true_edges(true_parents: Tensor) -> Tensor:
    """(n_edges, 2) pairs (parent, child) of a forest."""
    true_parents = torch.as_tensor(true_parents, dtype=torch.long).cpu()
    child = torch.nonzero(true_parents >= 0).flatten()
    return torch.stack([true_parents[child], child], dim=1)


def latent_of_features(W_dec: Tensor, true_directions: Tensor) -> Tensor:
    """L(f): the best-cosine latent of each true feature."""
    return best_match_cosines(W_dec, true_directions)[1].cpu()


@dataclass
class EdgeScores:
    precision: float
    recall: float
    f1: float
    reported: int  # reported edges between matched latents
    correct: int


def edge_scores(parents: Tensor, true_parents: Tensor, latent_of: Tensor) -> EdgeScores:
    parents = torch.as_tensor(parents, dtype=torch.long).cpu()
    latent_of = torch.as_tensor(latent_of, dtype=torch.long).cpu()
    edges = true_edges(true_parents)
    lp, lc = latent_of[edges[:, 0]], latent_of[edges[:, 1]]
    hits = (parents[lc] == lp) & (lp != lc)
    recall = float(hits.float().mean()) if edges.numel() else 0.0
    matched = torch.zeros(parents.numel(), dtype=torch.bool)
    matched[latent_of] = True
    kids = torch.nonzero(matched & (parents >= 0)).flatten()
    kids = kids[matched[parents[kids]]]
    true_set = {(int(a), int(b)) for a, b in zip(lp.tolist(), lc.tolist(), strict=False) if a != b}
    correct = sum((int(parents[j]), int(j)) in true_set for j in kids.tolist())
    reported = int(kids.numel())
    precision = correct / reported if reported else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return EdgeScores(precision=precision, recall=recall, f1=f1, reported=reported, correct=correct)


@dataclass
class Absorption:
    rate: float  # absorbed / (pairs where the child's latent fired)
    child_silent: float  # pairs where L(c) was silent / all pairs with both true features on
    pairs: int  # (edge, sample) pairs with both true features on


def absorption(codes: Codes, true_acts: Tensor, true_parents: Tensor, latent_of: Tensor) -> Absorption:
    """`codes`: the model's codes of the samples (sparse, or a dense (n, n_latents) activity mask);
    `true_acts`: (n, n_features)."""
    on = (true_acts != 0).cpu()
    latent_of = torch.as_tensor(latent_of, dtype=torch.long).cpu()
    # activity of the latents that are some true feature's image only, (n, n_features)
    active = as_sparse(codes).to("cpu").columns(latent_of) != 0
    column = torch.arange(latent_of.numel())
    edges = true_edges(true_parents)
    absorbed = fired = pairs = 0
    for p, c in edges.tolist():
        both = on[:, p] & on[:, c]
        n_both = int(both.sum())
        if n_both == 0:
            continue
        pairs += n_both
        child_fires = both & active[:, column[c]]
        n_fire = int(child_fires.sum())
        fired += n_fire
        if latent_of[p] == latent_of[c]:
            absorbed += n_fire
        else:
            absorbed += int((child_fires & ~active[:, column[p]]).sum())
    return Absorption(
        rate=absorbed / fired if fired else float("nan"),
        child_silent=1 - fired / pairs if pairs else float("nan"),
        pairs=pairs,
    )


def parent_cofiring(parents: Tensor, codes: Codes) -> tuple[Tensor, Tensor]:
    """(fires (m,), fires_with_parent (m,)): per latent, the rows where it is active and those where
    its parent is active too (0 for latents without a parent), from sparse codes (or a dense
    activity mask) without a (rows x latents) tensor."""
    parents = torch.as_tensor(parents, dtype=torch.long).cpu()
    csr = as_sparse(codes).to("cpu").csr()
    rows, lat = csr.row_ids(), csr.indices
    m = parents.numel()
    fires = torch.bincount(lat, minlength=m)
    par = parents[lat]
    has = par >= 0
    both = csr.contains(rows[has], par[has])
    return fires, torch.bincount(lat[has][both], minlength=m)


def parent_coverage(parents: Tensor, codes: Codes) -> float:
    """Mean over reported edges (i -> j) whose child fired of P(i active | j active)."""
    parents = torch.as_tensor(parents, dtype=torch.long).cpu()
    kids = torch.nonzero(parents >= 0).flatten()
    if kids.numel() == 0:
        return float("nan")
    fires, both = parent_cofiring(parents, codes)
    n_child = fires[kids]
    keep = n_child > 0
    if not keep.any():
        return float("nan")
    return float((both[kids][keep].float() / n_child[keep].float()).mean())


# ----- one call for a model on synthetic data -----------------------------------------------------
def hierarchy_report(
    sae,
    x: Tensor,
    true_acts: Tensor,
    true_directions: Tensor,
    true_parents: Tensor,
    parents: Tensor | None = None,
    codes: Codes | None = None,
) -> dict:
    """Absorption, edge scores, parent coverage and tree statistics of `sae` (its `hierarchy()`
    unless `parents` is given) on a synthetic sample with known truth; `codes` of x if at hand."""
    parents = sae.hierarchy() if parents is None else torch.as_tensor(parents, dtype=torch.long)
    codes = encode_rows(sae, x) if codes is None else codes
    lat = latent_of_features(sae.W_dec, true_directions)
    ab = absorption(codes, true_acts, true_parents, lat)
    es = edge_scores(parents, true_parents, lat)
    return {
        "absorption": ab.rate,
        "child_silent": ab.child_silent,
        "edge_precision": es.precision,
        "edge_recall": es.recall,
        "edge_f1": es.f1,
        "parent_coverage": parent_coverage(parents, codes),
        **tree_stats(parents).as_dict(),
    }


__all__ = [
    "depths",
    "TreeStats",
    "tree_stats",
    "children_of",
    "true_edges",
    "latent_of_features",
    "EdgeScores",
    "edge_scores",
    "Absorption",
    "absorption",
    "parent_coverage",
    "parent_cofiring",
    "hierarchy_report",
]
