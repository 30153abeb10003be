"""Decoder-cosine neighbours: the latents whose decoder directions point most nearly the same way."""

from __future__ import annotations

import torch
from torch import Tensor


class DecoderNeighbours:
    def __init__(self, w_dec: Tensor):
        w = w_dec.detach().float().cpu()
        self.unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def of(self, latent: int, k: int = 10) -> list[tuple[int, float]]:
        """The k nearest other latents to `latent`, as (latent, cosine), nearest first."""
        cos = self.unit @ self.unit[latent]
        cos[latent] = -torch.inf
        best = cos.topk(min(k, cos.numel() - 1))
        return [(int(i), round(float(c), 4)) for i, c in zip(best.indices, best.values, strict=True)]
