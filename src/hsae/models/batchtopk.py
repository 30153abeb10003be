"""BatchTopK SAE (Bussmann, Leask & Nanda 2024).

While training, the batch keeps its k * batch_size largest (ReLU'd) pre-activations over all tokens
together, so tokens get a variable number of latents; codes are ragged (CSR). At inference, a learned
global threshold replaces the batch: a latent is active where its pre-activation exceeds it. The
threshold is the running mean (EMA, `threshold_momentum`) of the smallest activation kept in each
training batch. `encode(x, k=...)` gives per-token TopK codes instead, on request. AuxK as in TopK.

Training takes the fused sparse step with the batch-wide selection (`FusedTopKStep(selection=
BatchTopK())`, hsae.models.sparse) without ever holding the batch's (n, n_latents) pre-activations:
they are computed in row chunks and each chunk offers only its candidates (positive entries above a
running lower bound of the (k n)-th largest value, and above a hint, 0.9 times the previous batch's
smallest kept value) to `BatchTopKCollector`, which takes the exact top k n among them at the end. A
hint that proves too high (fewer than k n entries pass it) is detected and the chunks are recomputed
without it (`hint_misses` counts these); the result never depends on the hint, so the hint is not
checkpointed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from hsae.errors import HsaeError
from hsae.models.codes import Codes, SparseCodes
from hsae.models.registry import register
from hsae.models.sparse.selection import TopKSelection, batch_topk_select
from hsae.models.sparse.steps import BatchTopK, FusedTopKStep
from hsae.models.topk import TopKConfig, TopKSAE, topk_codes


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_momentum: float = 0.01

    def validate(self) -> None:
        super().validate()
        if not 0 < self.threshold_momentum <= 1:
            raise HsaeError(f"threshold_momentum must be in (0, 1], got {self.threshold_momentum}")


def batch_topk_codes(pre: Tensor, k: int) -> SparseCodes:
    """The k * n largest positive pre-activations of the whole batch, as CSR codes (rows sorted).
    Differentiable w.r.t. `pre` (the values are gathered from it)."""
    _, idx, offsets = batch_topk_select(pre.detach(), k)
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(offsets.diff(), output_size=idx.numel())
    return SparseCodes(idx, pre[rows, idx], pre.shape[1], offsets)


BC = TypeVar("BC", bound=BatchTopKConfig)


@register("batchtopk")
class BatchTopKSAE(TopKSAE[BC]):
    config_class = BatchTopKConfig
    train_step = FusedTopKStep(selection=BatchTopK())
    # The hint for the next batch's selection: this fraction of the smallest value kept in the last
    # one (below it, so that it rarely proves too high; a wrong hint only costs a recomputation).
    hint_fraction = 0.9
    threshold: Tensor

    def __init__(self, config: BC):
        super().__init__(config)
        # -1 until the first training batch sets it.
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.last_kept_min: float | None = None
        self.hint_misses = 0

    @torch.no_grad()
    def _update_threshold(self, values: Tensor) -> None:
        smallest = values.min() if values.numel() else values.new_tensor(0.0)
        if self.threshold < 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.lerp_(smallest.to(self.threshold.dtype), self.config.threshold_momentum)

    def activate(self, pre: Tensor, k: int | None = None) -> Codes:
        if k is not None:
            return topk_codes(pre, k)
        assert self.config.k is not None  # validated
        if self.training:
            codes = batch_topk_codes(pre, self.config.k)
            self._update_threshold(codes.values.detach())
            return codes
        if self.threshold < 0:
            return topk_codes(pre, self.config.k)  # never trained: behave as TopK
        return SparseCodes.from_dense(pre * (pre > self.threshold))

    # ----- what the fused step's BatchTopK selection asks of the model --------------------------
    def selection_hint(self) -> float | None:
        """A guess just below the (k n)-th largest pre-activation of the next batch."""
        last = self.last_kept_min
        return None if last is None or last <= 0 else last * self.hint_fraction

    def record_selection(self, selection: TopKSelection) -> None:
        """After each training batch's selection: the inference threshold and the next hint."""
        self.hint_misses += int(selection.recomputed)
        with torch.no_grad():
            self._update_threshold(selection.values)
        self.last_kept_min = float(selection.values.min()) if selection.values.numel() else None


__all__ = ["BatchTopKConfig", "BatchTopKSAE", "batch_topk_codes"]
