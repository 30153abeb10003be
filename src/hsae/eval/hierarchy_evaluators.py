"""The "hierarchy" section of every report: the model's forest, its shape, and how parent-like its
parents are; on synthetic data, also recovery of the true forest (hsae.eval.hierarchy defines each).

Which forest: a family's built-in tree; else a forest saved in the model folder (`hsae tree --save`);
else one extracted post hoc on the evaluation sample (hsae.interpret.forest, default thresholds),
which is then also what later sections (WordNet alignment) read.

Parent-explained fraction: for each edge (p -> c) whose child fired, the share of the child's
decoded contribution a_c d_c that the parent's contribution explains, ||proj_{d_p}(d_c)||^2 /
||d_c||^2 = cos^2(d_p, d_c) on tokens where the parent is active too and 0 where it is not;
i.e. P(p on | c on) * cos^2(d_p, d_c), averaged over edges.
"""

from __future__ import annotations

from typing import Any

import torch

from hsae.eval import plots
from hsae.eval.hierarchy import depths, hierarchy_report, parent_cofiring, parent_coverage, tree_stats
from hsae.eval.run import EvalContext, evaluator
from hsae.interpret.forest import extract_forest, has_builtin_hierarchy
from hsae.models.codes import Codes


def parent_explained_fraction(parents: torch.Tensor, codes: Codes, W_dec: torch.Tensor) -> float:
    """Mean over edges whose child fired of P(parent on | child on) * cos^2(parent row, child row)."""
    parents = torch.as_tensor(parents, dtype=torch.long).cpu()
    kids = torch.nonzero(parents >= 0).flatten()
    if kids.numel() == 0:
        return float("nan")
    dec = W_dec.detach().float().cpu()
    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos2 = (dec[kids] * dec[parents[kids]]).sum(1).pow(2)
    fires, both = parent_cofiring(parents, codes)
    n_child = fires[kids]
    keep = n_child > 0
    if not keep.any():
        return float("nan")
    cover = both[kids].float() / n_child.clamp_min(1).float()
    return float((cover * cos2)[keep].mean())


def _forest(ctx: EvalContext) -> tuple[torch.Tensor, str]:
    sae = ctx.model
    if has_builtin_hierarchy(sae):
        return sae.hierarchy(), "built-in"
    saved = sae.hierarchy()
    if (saved >= 0).any():
        return saved, "saved"
    codes, _ = ctx.codes_and_recon()
    parents = extract_forest(sae, ctx.x, codes=codes).parents
    sae.set_hierarchy(parents)  # in memory only: later sections read the same forest
    return parents, "extracted post hoc"


def _figures(ctx: EvalContext, metrics: dict[str, Any]) -> list[tuple[str, str]]:
    parents = ctx.cache["parents"]
    depth_counts = torch.bincount(depths(parents)).tolist()
    has = parents >= 0
    branching = torch.bincount(parents[has], minlength=parents.numel())
    return [
        (
            "the forest's shape: latents per depth, children per parent",
            plots.forest_shape(depth_counts, branching[branching > 0].tolist()),
        )
    ]


@evaluator("hierarchy", figures=_figures)
def hierarchy(ctx: EvalContext) -> dict[str, Any]:
    codes, _ = ctx.codes_and_recon()
    parents, source = _forest(ctx)
    ctx.cache["parents"] = parents
    metrics: dict[str, Any] = {
        "forest": source,
        **tree_stats(parents).as_dict(),
        "parent_coverage": parent_coverage(parents, codes),
        "parent_explained": parent_explained_fraction(parents, codes, ctx.model.W_dec),
    }
    forest = getattr(ctx.source, "forest", None)
    truth = ctx.cache.get("true_acts")
    if forest is not None and truth is not None:
        report = hierarchy_report(
            ctx.model, ctx.x, truth, forest.directions, forest.parents, parents=parents, codes=codes
        )
        metrics.update(
            {
                f"true_{k}": v
                for k, v in report.items()
                if k in ("absorption", "child_silent", "edge_precision", "edge_recall", "edge_f1")
            }
        )
    return metrics
