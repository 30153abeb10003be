"""BatchTopK SAE (Bussmann, Leask & Nanda 2024).

While training, the batch keeps its k * batch_size largest (ReLU'd) pre-activations over all tokens
together, so tokens get a variable number of latents; codes are ragged (CSR). At inference, a learned
global threshold replaces the batch: a latent is active where its pre-activation exceeds it. The
threshold is the running mean (EMA, `threshold_momentum`) of the smallest activation kept in each
training batch. `encode(x, k=...)` gives per-token TopK codes instead, on request. AuxK as in TopK.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hsae.models import register
from hsae.models.codes import Codes, SparseCodes
from hsae.models.topk import TopKConfig, TopKSAE, topk_codes


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_momentum: float = 0.01


def batch_topk_codes(pre: Tensor, k: int) -> SparseCodes:
    """The k * n largest positive pre-activations of the whole batch, as CSR codes (rows sorted)."""
    n, m = pre.shape
    values, flat = pre.reshape(-1).topk(min(k * n, n * m), sorted=False)
    keep = values > 0
    values, flat = values[keep], flat[keep]
    flat, order = flat.sort()  # row-major order groups the entries by token
    values = values[order]
    rows = torch.div(flat, m, rounding_mode="floor")
    offsets = torch.zeros(n + 1, dtype=torch.long, device=pre.device)
    offsets[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    return SparseCodes(flat - rows * m, values, m, offsets)


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    config_class = BatchTopKConfig

    def __init__(self, config: BatchTopKConfig):
        super().__init__(config)
        # -1 until the first training batch sets it.
        self.register_buffer("threshold", torch.tensor(-1.0))

    def activate(self, pre: Tensor, k: int | None = None) -> Codes:
        if k is not None:
            return topk_codes(pre, k)
        if self.training:
            codes = batch_topk_codes(pre, self.config.k)
            with torch.no_grad():
                smallest = codes.values.min() if codes.values.numel() else pre.new_tensor(0.0)
                if self.threshold < 0:
                    self.threshold.copy_(smallest)
                else:
                    self.threshold.lerp_(smallest.to(self.threshold.dtype), self.config.threshold_momentum)
            return codes
        if self.threshold < 0:
            return topk_codes(pre, self.config.k)  # never trained: behave as TopK
        return SparseCodes.from_dense(pre * (pre > self.threshold))
