"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Codes keep the k largest pre-activations of each token (ReLU'd), as sparse (indices, values). The
AuxK loss revives dead latents: the k_aux largest pre-activations among latents dead for the trainer's
window reconstruct the main reconstruction's residual, weighted by `aux_coef` (1/32 in the paper).
Decoding goes through `embedding_bag` over the k active latents, never a dense code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hsae.config import SAEConfig
from hsae.errors import HsaeError
from hsae.models import register
from hsae.models.base import SAE, StepContext
from hsae.models.codes import Codes, SparseCodes
from hsae.models.kernels import sparse_decode


@dataclass
class TopKConfig(SAEConfig):
    k: int | None = 32
    # Latents used by the AuxK loss; None means d_in // 2 (as in sparsify), capped by the dead count.
    aux_k: int | None = None
    aux_coef: float = 1 / 32

    def validate(self) -> None:
        if self.k is None:
            raise HsaeError(f"the {self.arch} family needs --k (active latents per token)")
        super().validate()
        if self.aux_coef < 0:
            raise HsaeError("aux_coef must be >= 0")


def topk_codes(pre: Tensor, k: int) -> SparseCodes:
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return SparseCodes(indices, values.relu(), pre.shape[-1])


def auxk_loss(model: SAE, xn: Tensor, pre: Tensor, xn_hat: Tensor, ctx: StepContext | None, aux_k: int) -> dict[str, Tensor]:
    """Gao et al.'s AuxK term: dead latents reconstruct the residual of the live ones."""
    cfg = model.config
    if ctx is None or ctx.dead_mask is None or cfg.aux_coef == 0:  # type: ignore[attr-defined]
        return {}
    n_dead = int(ctx.dead_mask.sum())
    if n_dead == 0:
        return {}
    k_aux = min(aux_k, n_dead)
    residual = (xn - xn_hat).detach()
    masked = pre.masked_fill(~ctx.dead_mask, float("-inf"))
    values, indices = masked.topk(k_aux, dim=-1, sorted=False)
    values = torch.where(torch.isfinite(values), values.relu(), torch.zeros_like(values))
    residual_hat = sparse_decode(indices, values, model.W_dec)
    loss = (residual_hat - residual).pow(2).sum(-1).mean()
    return {"auxk": cfg.aux_coef * torch.nan_to_num(loss)}  # type: ignore[attr-defined]


@register("topk")
class TopKSAE(SAE):
    config_class = TopKConfig
    supports_k = True

    def activate(self, pre: Tensor, k: int | None = None) -> Codes:
        k = k or self.config.k
        if not 0 < k <= self.n_latents:
            raise HsaeError(f"k must be between 1 and {self.n_latents}, got {k}")
        return topk_codes(pre, k)

    def aux_k(self) -> int:
        return self.config.aux_k or max(1, self.d_in // 2)  # type: ignore[attr-defined]

    def extra_losses(self, xn, pre, codes, xn_hat, ctx):
        return auxk_loss(self, xn, pre, xn_hat, ctx, self.aux_k())
