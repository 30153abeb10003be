"""Sparse codes: what `encode` returns for TopK-style families.

Rows are either fixed-width — `indices` and `values` of shape (n, k) — or ragged in CSR form —
flat `indices`/`values` of shape (nnz,) plus `offsets` of shape (n + 1,) — for families whose number
of active latents varies per token (BatchTopK at inference, top-AFA, Feature Choice). A latent is
active where its value is != 0, so signed codes (AbsTopK) need nothing special.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SparseCodes:
    indices: Tensor
    values: Tensor
    n_latents: int
    offsets: Tensor | None = None

    def __post_init__(self) -> None:
        if self.indices.shape != self.values.shape:
            raise ValueError(f"indices {tuple(self.indices.shape)} != values {tuple(self.values.shape)}")
        if self.offsets is None and self.indices.dim() != 2:
            raise ValueError("fixed-width codes need (n, k) indices; pass offsets for ragged rows")

    @property
    def n_rows(self) -> int:
        return self.indices.shape[0] if self.offsets is None else self.offsets.numel() - 1

    @property
    def is_ragged(self) -> bool:
        return self.offsets is not None

    def row_ids(self) -> Tensor:
        """Row of each stored entry, flat (nnz,)."""
        if self.offsets is None:
            n, k = self.indices.shape
            return torch.arange(n, device=self.indices.device).repeat_interleave(k)
        counts = self.offsets.diff()
        return torch.arange(self.n_rows, device=self.indices.device).repeat_interleave(counts)

    def dense(self) -> Tensor:
        out = self.values.new_zeros(self.n_rows, self.n_latents)
        if self.offsets is None:
            return out.scatter_add(1, self.indices, self.values)
        return out.index_put((self.row_ids(), self.indices), self.values, accumulate=True)

    def l0(self) -> Tensor:
        """Active latents per row (values != 0), float (n,)."""
        active = (self.values != 0).float()
        if self.offsets is None:
            return active.sum(-1)
        return torch.zeros(self.n_rows, device=active.device).index_add_(0, self.row_ids(), active)

    def fire_counts(self) -> Tensor:
        """How many rows each latent is active in, (n_latents,)."""
        idx = self.indices.reshape(-1)[self.values.reshape(-1) != 0]
        return torch.bincount(idx, minlength=self.n_latents)

    def detach(self) -> SparseCodes:
        off = None if self.offsets is None else self.offsets
        return SparseCodes(self.indices, self.values.detach(), self.n_latents, off)

    def to(self, device: torch.device | str) -> SparseCodes:
        off = None if self.offsets is None else self.offsets.to(device)
        return SparseCodes(self.indices.to(device), self.values.to(device), self.n_latents, off)

    @staticmethod
    def from_dense(dense: Tensor) -> SparseCodes:
        """CSR codes holding the nonzeros of a dense (n, m) code."""
        rows, cols = dense.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=dense.shape[0])
        offsets = torch.zeros(dense.shape[0] + 1, dtype=torch.long, device=dense.device)
        offsets[1:] = counts.cumsum(0)
        return SparseCodes(cols, dense[rows, cols], dense.shape[1], offsets)


Codes = Tensor | SparseCodes


def to_dense(codes: Codes) -> Tensor:
    return codes.dense() if isinstance(codes, SparseCodes) else codes


def l0_per_row(codes: Codes) -> Tensor:
    return codes.l0() if isinstance(codes, SparseCodes) else (codes != 0).float().sum(-1)


def fire_counts(codes: Codes) -> Tensor:
    if isinstance(codes, SparseCodes):
        return codes.fire_counts()
    return (codes != 0).sum(0)
