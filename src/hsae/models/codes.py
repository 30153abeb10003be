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

    def csr(self) -> SparseCodes:
        """The same codes as CSR rows holding only the active entries (value != 0)."""
        values, indices = self.values.reshape(-1), self.indices.reshape(-1)
        keep = values != 0
        counts = torch.bincount(self.row_ids()[keep], minlength=self.n_rows)
        offsets = torch.zeros(self.n_rows + 1, dtype=torch.long, device=values.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        return SparseCodes(indices[keep], values[keep], self.n_latents, offsets)

    @staticmethod
    def cat(parts: list[SparseCodes]) -> SparseCodes:
        """Rows of several codes, one after the other, as CSR (active entries only)."""
        if not parts:
            raise ValueError("no codes to concatenate")
        csr = [p.csr() for p in parts]
        offsets: list[Tensor] = []
        end = 0
        for part in csr:
            assert part.offsets is not None
            offsets.append(part.offsets[(1 if offsets else 0) :] + end)
            end += part.indices.numel()
        indices, values = torch.cat([p.indices for p in csr]), torch.cat([p.values for p in csr])
        return SparseCodes(indices, values, parts[0].n_latents, torch.cat(offsets))

    def select_rows(self, rows: Tensor) -> SparseCodes:
        """The codes of the given rows (indices or a bool mask), in that order, as CSR."""
        csr = self.csr()
        assert csr.offsets is not None
        if rows.dtype == torch.bool:
            rows = rows.nonzero().squeeze(1)
        starts, counts = csr.offsets[rows], csr.offsets.diff()[rows]
        offsets = torch.zeros(rows.numel() + 1, dtype=torch.long, device=rows.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        within = torch.arange(int(offsets[-1]), device=rows.device) - offsets[:-1].repeat_interleave(counts)
        take = starts.repeat_interleave(counts) + within
        return SparseCodes(csr.indices[take], csr.values[take], self.n_latents, offsets)

    def columns(self, latents: Tensor) -> Tensor:
        """Dense (n_rows, len(latents)) values of the given latents only."""
        latents = torch.as_tensor(latents, dtype=torch.long, device=self.indices.device)
        slot = torch.full((self.n_latents,), -1, dtype=torch.long, device=latents.device)
        slot[latents] = torch.arange(latents.numel(), device=latents.device)
        flat_idx, flat_val = self.indices.reshape(-1), self.values.reshape(-1)
        rows, where = self.row_ids(), slot[flat_idx]
        keep = (where >= 0) & (flat_val != 0)
        out = self.values.new_zeros(self.n_rows, latents.numel())
        out.index_put_((rows[keep], where[keep]), flat_val[keep], accumulate=True)
        return out[:, slot[latents]]  # a latent asked for twice gets its values in every copy

    def contains(self, rows: Tensor, latents: Tensor) -> Tensor:
        """Whether latent latents[e] is active in row rows[e], for each pair e (bool, like rows)."""
        csr = self.csr()
        keys = (csr.row_ids() * self.n_latents + csr.indices).sort().values
        query = rows.long() * self.n_latents + latents.long()
        if keys.numel() == 0:
            return torch.zeros_like(query, dtype=torch.bool)
        pos = torch.searchsorted(keys, query).clamp_max(keys.numel() - 1)
        return keys[pos] == query

    def to_torch_sparse(self) -> Tensor:
        """A torch COO tensor (n_rows, n_latents) of the active entries."""
        csr = self.csr()
        index = torch.stack([csr.row_ids(), csr.indices])
        shape = (self.n_rows, self.n_latents)
        return torch.sparse_coo_tensor(index, csr.values, shape, check_invariants=False).coalesce()

    @staticmethod
    def from_dense(dense: Tensor) -> SparseCodes:
        """CSR codes holding the nonzeros of a dense (n, m) code."""
        rows, cols = dense.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=dense.shape[0])
        offsets = torch.zeros(dense.shape[0] + 1, dtype=torch.long, device=dense.device)
        offsets[1:] = counts.cumsum(0)
        return SparseCodes(cols, dense[rows, cols], dense.shape[1], offsets)


Codes = Tensor | SparseCodes


def as_sparse(codes: Codes) -> SparseCodes:
    """Codes as SparseCodes: a dense (n, n_latents) code (values, or a bool activity mask) becomes CSR."""
    if isinstance(codes, SparseCodes):
        return codes
    return SparseCodes.from_dense(codes.float() if codes.dtype == torch.bool else codes)


@torch.no_grad()
def encode_rows(sae, x: Tensor, batch_size: int = 8192) -> SparseCodes:
    """The codes of raw activations x (n, d_in) in batches, as one CSR SparseCodes on the CPU: a dense
    (n, n_latents) tensor never exists (dense-code families hold one batch at a time)."""
    parts = [as_sparse(sae.encode(x[s : s + batch_size])).to("cpu") for s in range(0, x.shape[0], batch_size)]
    if not parts:
        return SparseCodes(
            torch.empty(0, dtype=torch.long), torch.empty(0), sae.n_latents, torch.zeros(1, dtype=torch.long)
        )
    return SparseCodes.cat(parts)


def to_dense(codes: Codes) -> Tensor:
    return codes.dense() if isinstance(codes, SparseCodes) else codes


def l0_per_row(codes: Codes) -> Tensor:
    return codes.l0() if isinstance(codes, SparseCodes) else (codes != 0).float().sum(-1)


def fire_counts(codes: Codes) -> Tensor:
    if isinstance(codes, SparseCodes):
        return codes.fire_counts()
    return (codes != 0).sum(0)
