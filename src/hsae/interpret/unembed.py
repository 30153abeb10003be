"""The tokens a feature's decoder direction promotes and suppresses through a causal LM's unembedding.

The direct logit effect (decoder row times the unembedding matrix, as Neuronpedia and SAEDashboard
show it): read straight off the weights, without the final layer norm, so it is exact only up to that
norm's per-token scale, which does not change the ranking of tokens for one feature.
"""

from __future__ import annotations

import torch
from torch import Tensor


def unembedding(loaded, d_in: int) -> Tensor | None:
    """(vocab, d_in) output embedding of a causal LM whose hidden width is d_in, else None (encoders
    have none; a hook of another width, such as attention heads, is not in the residual stream)."""
    get = getattr(loaded.model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None or getattr(head, "weight", None) is None or head.weight.shape[1] != d_in:
        return None
    return head.weight.detach()


@torch.no_grad()
def logit_effects(
    w_dec: Tensor, w_u: Tensor, top: int = 10, block: int = 1024
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(promoted ids, their logit effects, suppressed ids, their effects), each (n_latents, top), for
    unit decoder rows, a block of latents at a time (a full n_latents x vocab matrix would not fit)."""
    w_u = w_u.float()
    top = min(top, w_u.shape[0])
    parts: list[tuple[Tensor, ...]] = []
    for start in range(0, w_dec.shape[0], block):
        rows = w_dec[start : start + block].float().to(w_u.device)
        logits = (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ w_u.T
        up, down = logits.topk(top, dim=1), logits.topk(top, dim=1, largest=False)
        parts.append((up.indices.cpu(), up.values.cpu(), down.indices.cpu(), down.values.cpu()))
    promoted, promoted_by, suppressed, suppressed_by = (torch.cat(p) for p in zip(*parts, strict=True))
    return promoted, promoted_by, suppressed, suppressed_by
