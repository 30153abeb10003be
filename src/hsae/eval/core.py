"""Core metrics (SAEBench definitions where one exists), computed one way for every caller.

- MSE: mean over tokens and dimensions of (x - x_hat)^2.
- FVU: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the evaluated tokens (1 - explained variance).
- Cosine: mean over tokens of cos(x, x_hat).
- L0: active latents (code != 0) per token — mean and histogram.
- Dead latents: never fired over the evaluated tokens. Dense latents: fire on more than 10% of them.
- Feature density: each latent's firing frequency.

`CoreAccumulator` streams batches (float64 sums), so any number of tokens fits in memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from hsae.models.codes import Codes, fire_counts, l0_per_row

DENSE_THRESHOLD = 0.1


def fvu(x: Tensor, x_hat: Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    total = (x - x.mean(0)).pow(2).sum()
    return float((x - x_hat).pow(2).sum() / total) if total > 0 else float("nan")


def mse(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens and dimensions of the squared error."""
    return float((x.double() - x_hat.double()).pow(2).mean())


def mean_cosine(x: Tensor, x_hat: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x.double(), x_hat.double(), dim=-1).mean())


def mean_l0(codes: Codes) -> float:
    return float(l0_per_row(codes).mean())


def dead_fraction_of(fire_count: Tensor) -> float:
    return float((fire_count == 0).float().mean())


def dense_fraction_of(fire_count: Tensor, n_tokens: int, threshold: float = DENSE_THRESHOLD) -> float:
    return float((fire_count.float() / max(1, n_tokens) > threshold).float().mean())


class CoreAccumulator:
    """Streams (x, x_hat, codes) batches and reports the core metrics over all of them."""

    def __init__(self, n_latents: int):
        self.n_latents = n_latents
        self.n = 0
        self.sq_err = 0.0
        self.sum_sq = 0.0
        self.sum_x: Tensor | None = None
        self.cos_sum = 0.0
        self.fires = torch.zeros(n_latents, dtype=torch.long)
        self.l0_counts = torch.zeros(1, dtype=torch.long)

    def update(self, x: Tensor, x_hat: Tensor, codes: Codes) -> None:
        x, x_hat = x.double().cpu(), x_hat.double().cpu()
        self.n += x.shape[0]
        self.sq_err += float((x - x_hat).pow(2).sum())
        self.sum_sq += float(x.pow(2).sum())
        s = x.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.cos_sum += float(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1).sum())
        self.fires += fire_counts(codes).cpu()
        l0 = torch.bincount(l0_per_row(codes).round().long().cpu())
        if l0.numel() > self.l0_counts.numel():
            l0[: self.l0_counts.numel()] += self.l0_counts
            self.l0_counts = l0
        else:
            self.l0_counts[: l0.numel()] += l0

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            raise ValueError("no tokens were evaluated")
        assert self.sum_x is not None
        total_var = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.n
        d = self.sum_x.numel()
        density = self.fires.double() / self.n
        l0_values = torch.arange(self.l0_counts.numel(), dtype=torch.float64)
        return {
            "tokens": self.n,
            "mse": self.sq_err / (self.n * d),
            "fvu": self.sq_err / total_var if total_var > 0 else float("nan"),
            "explained_variance": 1 - self.sq_err / total_var if total_var > 0 else float("nan"),
            "cosine": self.cos_sum / self.n,
            "l0": float((self.l0_counts.double() * l0_values).sum() / self.n),
            "dead_fraction": dead_fraction_of(self.fires),
            "dense_fraction": dense_fraction_of(self.fires, self.n),
            "dead_latents": int((self.fires == 0).sum()),
            "dense_latents": int((density > DENSE_THRESHOLD).sum()),
            "l0_histogram": self.l0_counts.tolist(),
            "density": density.tolist(),
        }


@torch.no_grad()
def evaluate_core(model, batches: Iterable[Tensor]) -> dict[str, Any]:
    """Core metrics of `model` over every batch of raw activations in `batches`."""
    acc = CoreAccumulator(model.n_latents)
    for x in batches:
        codes = model.encode(x)
        acc.update(x, model.decode(codes), codes)
    return acc.result()
