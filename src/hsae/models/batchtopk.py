"""BatchTopK SAE (Bussmann, Leask & Nanda 2024).

While training, the batch keeps its k * batch_size largest (ReLU'd) pre-activations over all tokens
together, so tokens get a variable number of latents; codes are ragged (CSR). At inference, a learned
global threshold replaces the batch: a latent is active where its pre-activation exceeds it. The
threshold is the running mean (EMA, `threshold_momentum`) of the smallest activation kept in each
training batch. `encode(x, k=...)` gives per-token TopK codes instead, on request. AuxK as in TopK.

Training takes TopK's sparse path (kernels.py) without ever holding the batch's (n, n_latents)
pre-activations: they are computed in row chunks and each chunk offers only its candidates (positive
entries above a running lower bound of the (k n)-th largest value, and above a hint, 0.9 times the
previous batch's smallest kept value) to `BatchTopKCollector`, which takes the exact top k n among
them at the end. A hint that proves too high (fewer than k n entries pass it) is detected and the
chunks are recomputed without it (`hint_misses` counts these); the result never depends on the hint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hsae.models import register
from hsae.models.codes import Codes, SparseCodes
from hsae.models.kernels import (
    TopKSelection,
    batch_topk_select,
    encode_batch_topk_chunked,
    encoder_matmul,
    masked_topk_select,
)
from hsae.models.topk import _SPARSE_ACTIVATES, TopKConfig, TopKSAE, topk_codes


@dataclass
class BatchTopKConfig(TopKConfig):
    threshold_momentum: float = 0.01


def batch_topk_codes(pre: Tensor, k: int) -> SparseCodes:
    """The k * n largest positive pre-activations of the whole batch, as CSR codes (rows sorted).
    Differentiable w.r.t. `pre` (the values are gathered from it)."""
    _, idx, offsets = batch_topk_select(pre.detach(), k)
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(offsets.diff(), output_size=idx.numel())
    return SparseCodes(idx, pre[rows, idx], pre.shape[1], offsets)


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    config_class = BatchTopKConfig

    def __init__(self, config: BatchTopKConfig):
        super().__init__(config)
        # -1 until the first training batch sets it.
        self.register_buffer("threshold", torch.tensor(-1.0))

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
        if self.training:
            codes = batch_topk_codes(pre, self.config.k)
            self._update_threshold(codes.values.detach())
            return codes
        if self.threshold < 0:
            return topk_codes(pre, self.config.k)  # never trained: behave as TopK
        return SparseCodes.from_dense(pre * (pre > self.threshold))

    def _select_train(self, xc, dead_cols, k_aux):
        with torch.no_grad():
            pre = encoder_matmul(xc, self.W_enc.detach(), self.b_enc.detach(), self._compute_dtype)
            values, indices, offsets = batch_topk_select(pre, self.config.k)
            self._update_threshold(values)
            aux = None if dead_cols is None else masked_topk_select(pre, dead_cols, k_aux)
        return SparseCodes(indices, values, self.n_latents, offsets), aux

    # The hint for the next batch's selection: this fraction of the smallest value kept in the last
    # one (below it, so that it rarely proves too high; a wrong hint only costs a recomputation).
    hint_fraction = 0.9

    def _select_sparse(self, x: Tensor, dead_cols: Tensor | None, k_aux: int) -> TopKSelection:
        """Batch-wide top-(k n) of the chunked pre-activations (`encode_batch_topk_chunked`); exact
        whatever the hint, which is the last batch's smallest kept value times `hint_fraction`."""
        last = getattr(self, "_last_kept_min", None)
        sel = encode_batch_topk_chunked(
            x,
            self.W_enc.detach(),
            self.b_enc.detach(),
            self.config.k,
            dead_cols=dead_cols,
            k_aux=k_aux,
            compute_dtype=self._compute_dtype,
            chunk_rows=self.train_chunk_rows,
            scale=self.config.input_scale,
            b_dec=self.b_dec.detach(),
            hint=None if last is None or last <= 0 else last * self.hint_fraction,
        )
        self.hint_misses = getattr(self, "hint_misses", 0) + int(sel.recomputed)
        with torch.no_grad():
            self._update_threshold(sel.values)
        self._last_kept_min = float(sel.values.min()) if sel.values.numel() else None
        return sel


_SPARSE_ACTIVATES.add(BatchTopKSAE.activate)
