"""Sparse kernels: decoding through the active latents only.

`sparse_decode` computes sum_j values[r, j] * W_dec[indices[r, j]] with `embedding_bag`, whose backward
pass writes gradients only into the W_dec rows that were used and into `values`. It never builds the
dense (n, n_latents) code. tests/test_kernels.py checks values and gradients against the dense product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor, offsets: Tensor | None = None) -> Tensor:
    """(n, k) or CSR (nnz,)+(n+1,) codes times W_dec (n_latents, d) -> (n, d), without a dense code."""
    values = values.to(W_dec.dtype)
    if offsets is None:
        return F.embedding_bag(indices, W_dec, mode="sum", per_sample_weights=values)
    # embedding_bag takes bag starts (n,), with include_last_offset the full (n + 1,) CSR pointer.
    return F.embedding_bag(
        indices, W_dec, offsets, mode="sum", per_sample_weights=values, include_last_offset=True
    )
