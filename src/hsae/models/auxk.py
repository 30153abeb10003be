"""Gao et al.'s AuxK loss: latents dead for the trainer's window reconstruct the residual of the live
ones from their k_aux largest pre-activations, weighted by `aux_coef` (the family's; 1/32 in the paper,
on a variance-normalised loss).

`aux_plan` decides which latents take part in a step (shared by the dense formulation here and the
fused steps of hsae.models.sparse.steps); `auxk_loss` is the dense formulation that a family's
`forward` adds to its losses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from hsae.models.base import StepContext
from hsae.models.sparse.ops import sparse_decode


def aux_plan(model: Any, ctx: StepContext | None) -> tuple[Tensor | None, int]:
    """(dead latent ids, k_aux) when the AuxK term applies this step, else (None, 0). `model` has
    `config.aux_coef` and `aux_k()` (the TopK-style families)."""
    if ctx is None or ctx.dead_mask is None or model.config.aux_coef == 0:
        return None, 0
    dead_cols = ctx.dead_mask.nonzero().squeeze(1).to(model.W_enc.device)
    if dead_cols.numel() == 0:
        return None, 0
    return dead_cols, min(model.aux_k(), dead_cols.numel())


def auxk_term(W_dec: Tensor, aux_coef: float, xn: Tensor, xn_hat: Tensor, values: Tensor, indices: Tensor) -> Tensor:
    """Weighted AuxK loss of the dead latents' codes (values, indices) on the live residual."""
    residual = (xn - xn_hat).detach()
    residual_hat = sparse_decode(indices, values, W_dec)
    return aux_coef * torch.nan_to_num((residual_hat - residual).pow(2).sum(-1).mean())


def auxk_loss(
    model: Any, xn: Tensor, pre: Tensor, xn_hat: Tensor, ctx: StepContext | None, scores: Tensor | None = None
) -> dict[str, Tensor]:
    """{"auxk": ...} of the dense formulation (gradients flow through `pre`), or {} when it does not
    apply this step. `scores`, if given, choose the dead latents' entries (values still from `pre`)."""
    dead_cols, k_aux = aux_plan(model, ctx)
    if dead_cols is None:
        return {}
    chooser = pre if scores is None else scores
    pos = chooser.index_select(1, dead_cols).topk(k_aux, dim=-1, sorted=False).indices
    values = pre.index_select(1, dead_cols).gather(1, pos)
    return {"auxk": auxk_term(model.W_dec, model.config.aux_coef, xn, xn_hat, values.relu(), dead_cols[pos])}
