"""Running evaluations: one registry of evaluators, one report.

An evaluator is a function `(EvalContext) -> dict of metrics`, registered with `@evaluator(name)`.
It raises `Skip("why")` when it cannot apply (no ground truth, no downstream model, too few tokens);
the report then marks that section skipped with the reason. New analyses are new registered
functions; `hsae eval` and `hsae compare` pick them up.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hsae.errors import HsaeError
from hsae.eval.report import Report
from hsae.models.codes import SparseCodes, as_sparse

# Modules whose import registers evaluators (kept explicit: the order is the report's order).
EVALUATOR_MODULES = [
    "hsae.eval.core_evaluators",
    "hsae.eval.hierarchy_evaluators",
    "hsae.eval.downstream",
    "hsae.eval.absorption",
    "hsae.eval.wordnet",
    "hsae.eval.over_k_evaluator",
]


class Skip(Exception):
    """An evaluator cannot apply here; the message says why."""


@dataclass
class EvalContext:
    model: Any  # an hsae SAE
    model_dir: Path | None
    source: Any  # the ActivationSource evaluated on
    x: Tensor  # evaluation activations (raw units)
    options: dict[str, Any] = field(default_factory=dict)
    heldout: bool = False  # whether x was left out of the model's training
    cache: dict[str, Any] = field(default_factory=dict)  # shared results (codes, x_hat, core metrics)

    def codes_and_recon(self, batch_size: int = 8192) -> tuple[SparseCodes, Tensor]:
        """Codes (sparse: CSR rows of active entries, whatever the family) and reconstructions of `x`,
        computed once and shared by evaluators. No (tokens x latents) dense tensor is formed."""
        if "codes" not in self.cache:
            codes, recon = [], []
            with torch.no_grad():
                for start in range(0, self.x.shape[0], batch_size):
                    c = self.model.encode(self.x[start : start + batch_size])
                    recon.append(self.model.decode(c).cpu())
                    codes.append(as_sparse(c).to("cpu"))
            self.cache["codes"] = SparseCodes.cat(codes)
            self.cache["x_hat"] = torch.cat(recon)
        return self.cache["codes"], self.cache["x_hat"]


Evaluator = Callable[[EvalContext], dict[str, Any]]
_EVALUATORS: dict[str, Evaluator] = {}
_FIGURES: dict[str, Callable[[EvalContext, dict[str, Any]], list[tuple[str, str]]]] = {}


def evaluator(name: str, figures: Callable[[EvalContext, dict[str, Any]], list[tuple[str, str]]] | None = None):
    def wrap(fn: Evaluator) -> Evaluator:
        _EVALUATORS[name] = fn
        if figures is not None:
            _FIGURES[name] = figures
        return fn

    return wrap


def evaluators() -> dict[str, Evaluator]:
    for module in EVALUATOR_MODULES:
        importlib.import_module(module)
    return dict(_EVALUATORS)


def gather(source, tokens: int) -> Tensor:
    """Up to `tokens` rows of the source, each at most once (the source's fixed sample: for a store,
    the first rows of its shuffled order, so a split smaller than `tokens` is read whole)."""
    if tokens <= 0:
        raise HsaeError(f"--tokens must be positive, got {tokens}")
    return source.sample(tokens)


def evaluate(
    model,
    source,
    *,
    model_dir: Path | None = None,
    tokens: int = 65536,
    only: list[str] | None = None,
    options: dict[str, Any] | None = None,
    heldout: bool | None = None,
) -> Report:
    """Every registered evaluator (or those in `only`) on up to `tokens` rows of `source`. `heldout`
    says whether those rows were left out of training (default: the source's split says, and a
    synthetic source's evaluation sample is held out by construction); the core section reports it."""
    if tokens <= 0:
        raise HsaeError(f"--tokens must be positive, got {tokens}")
    if model.d_in != source.d_in:
        raise HsaeError(
            f"the model was trained on width {model.d_in} but the data has width {source.d_in}; "
            "evaluate it on activations from the same model and hook"
        )
    truth = None
    if hasattr(source, "sample_with_truth"):  # synthetic: keep the true activations for recovery metrics
        sample = source.sample_with_truth(tokens)
        x, truth = sample.x, sample.true_acts
    else:
        x = gather(source, tokens)
    if heldout is None:
        heldout = truth is not None or source.describe().get("split") == "heldout"
    ctx = EvalContext(
        model=model, model_dir=model_dir, source=source, x=x, options=dict(options or {}), heldout=heldout
    )
    if truth is not None:
        ctx.cache["true_acts"] = truth
    report = Report(
        title=f"hsae evaluation: {model.arch}" + (f" ({model_dir})" if model_dir else ""),
        info={
            "arch": model.arch,
            "d_in": model.d_in,
            "n_latents": model.n_latents,
            "k": model.config.k,
            "tokens": int(x.shape[0]),
            "data": source.describe().get("kind", ""),
        },
    )
    registry = evaluators()
    unknown = sorted(set(only or []) - set(registry))
    if unknown:
        raise HsaeError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(registry)}")
    for name, fn in registry.items():
        if only and name not in only:
            continue
        started = time.perf_counter()
        try:
            metrics = fn(ctx)
        except Skip as why:
            report.add(name, skipped=str(why), seconds=time.perf_counter() - started)
            continue
        report.add(name, metrics, seconds=time.perf_counter() - started)
        if name in _FIGURES:
            report.figures.extend(_FIGURES[name](ctx, metrics))
    return report
