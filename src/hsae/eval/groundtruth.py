"""Recovery of known features (synthetic data): how many true directions the decoder found.

A true feature counts as recovered when some decoder row has cosine >= `threshold` (0.9) with it.
"""

from __future__ import annotations

from torch import Tensor


def best_match_cosines(W_dec: Tensor, true_directions: Tensor) -> tuple[Tensor, Tensor]:
    """For each true feature: the best decoder cosine and the index of that latent."""
    dec = W_dec.detach().float()
    dec = dec / dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    true = true_directions.float()
    true = true / true.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = true @ dec.T  # (n_true, n_latents)
    best, idx = cos.max(dim=1)
    return best, idx


def recovered_fraction(W_dec: Tensor, true_directions: Tensor, threshold: float = 0.9) -> float:
    best, _ = best_match_cosines(W_dec, true_directions)
    return float((best >= threshold).float().mean())


def mean_best_cosine(W_dec: Tensor, true_directions: Tensor) -> float:
    best, _ = best_match_cosines(W_dec, true_directions)
    return float(best.mean())


__all__ = ["best_match_cosines", "recovered_fraction", "mean_best_cosine"]
