"""The `over_k` evaluator: a model with `supports_k` read at many k (hsae.eval.over_k).

Which k: `-o ks=16,32,...`; without it, nested-over-k families (those with `nesting()`, MSAE) are
read at their nested k and at 16, 32, ... up to the width, as in the MSAE paper, and other families
are skipped (a TopK
model read far from the k it was trained at says little about it; ask with `-o ks=` all the same).
The section holds one scalar per (metric, k), e.g. "fvu@16", and the curve as a list; the figure
draws FVU and CKNNA against L0.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from hsae.eval import plots
from hsae.eval.over_k import doubling_ks, evaluate_over_k, parse_ks
from hsae.eval.run import EvalContext, Skip, evaluator

METRICS = ("l0", "zero_fraction", "fvu", "cosine", "dead_fraction", "cknna_recon", "cknna_codes")


def curve_figure(curves: dict[str, list[dict[str, Any]]], title: str = "FVU and CKNNA against L0") -> str:
    """Each model's rows of `evaluate_over_k` as FVU (solid) and reconstruction CKNNA (dashed) curves."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for label, rows in curves.items():
        l0 = [r["l0"] for r in rows]
        left.plot(l0, [r["fvu"] for r in rows], marker="o", markersize=3, label=label)
        right.plot(l0, [r["cknna_recon"] for r in rows], marker="o", markersize=3, linestyle="--", label=label)
    for ax, name in ((left, "FVU"), (right, "CKNNA(inputs, reconstructions)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("L0 (k)")
        ax.set_ylabel(name)
    left.legend(fontsize=8)
    fig.suptitle(title)
    return plots.to_svg(fig)


def _figures(ctx: EvalContext, metrics: dict[str, Any]) -> list[tuple[str, str]]:
    return [("one model at many k: FVU and CKNNA against L0", curve_figure({ctx.model.arch: metrics["curve"]}))]


@evaluator("over_k", figures=_figures)
def over_k(ctx: EvalContext) -> dict[str, Any]:
    model = ctx.model
    if not getattr(model, "supports_k", False):
        raise Skip(f"the {model.arch} family does not take k at inference")
    if "ks" in ctx.options:
        ks = parse_ks(ctx.options["ks"], model.n_latents)
    elif hasattr(model, "nesting"):
        ks = sorted(set(model.nesting()) | set(doubling_ks(model.n_latents)))
    else:
        raise Skip("not a nested-over-k family: give -o ks=16,32,... to read it at several k")
    rows = evaluate_over_k(model, ctx.x, ks)
    flat = {f"{name}@{row['k']}": row[name] for row in rows for name in METRICS}
    return {"ks": ks, **flat, "curve": rows}
