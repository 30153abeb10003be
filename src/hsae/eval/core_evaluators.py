"""The evaluators every model gets: core metrics, and recovery of ground truth on synthetic data."""

from __future__ import annotations

from typing import Any

from hsae.eval import plots
from hsae.eval.core import CoreAccumulator
from hsae.eval.groundtruth import best_match_cosines
from hsae.eval.run import EvalContext, Skip, evaluator


def _core_figures(ctx: EvalContext, metrics: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("feature density: how often each latent fires", plots.density_histogram(metrics["density"])),
        ("active latents per token", plots.l0_histogram(metrics["l0_histogram"])),
    ]


@evaluator("core", figures=_core_figures)
def core(ctx: EvalContext) -> dict[str, Any]:
    codes, x_hat = ctx.codes_and_recon()
    acc = CoreAccumulator(ctx.model.n_latents)
    acc.update(ctx.x, x_hat, codes)
    result = {"heldout": ctx.heldout, **acc.result()}
    ctx.cache["core"] = result
    return result


@evaluator("ground_truth")
def ground_truth(ctx: EvalContext) -> dict[str, Any]:
    forest = getattr(ctx.source, "forest", None)
    if forest is None:
        raise Skip("the data has no known features (only synthetic sources do)")
    best, _ = best_match_cosines(ctx.model.W_dec, forest.directions)
    return {
        "true_features": int(forest.n_features),
        "recovered_fraction": float((best >= 0.9).float().mean()),
        "mean_best_cosine": float(best.mean()),
    }
