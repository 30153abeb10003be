"""Core metrics (SAEBench definitions where one exists).

- FVU: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the evaluated tokens.
- L0: active latents (code != 0) per token.
- Dead: latents that never fired over the evaluated tokens; dense: fire on more than 10% of tokens.
"""

from __future__ import annotations

from torch import Tensor

from hsae.models.codes import Codes, fire_counts, l0_per_row


def fvu(x: Tensor, x_hat: Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    total = (x - x.mean(0)).pow(2).sum()
    return float((x - x_hat).pow(2).sum() / total) if total > 0 else float("nan")


def mse(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens and dimensions of the squared error."""
    return float((x.double() - x_hat.double()).pow(2).mean())


def mean_l0(codes: Codes) -> float:
    return float(l0_per_row(codes).mean())


def dead_fraction_of(fire_count: Tensor) -> float:
    return float((fire_count == 0).float().mean())


def dense_fraction_of(fire_count: Tensor, n_tokens: int, threshold: float = 0.1) -> float:
    return float((fire_count.float() / max(1, n_tokens) > threshold).float().mean())


def latent_fire_counts(codes: Codes) -> Tensor:
    return fire_counts(codes)
