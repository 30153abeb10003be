"""Token rows with their SAE codes in one compressed-sparse-row block, the unit the examples pass works on.

Whatever `encode` returns (a dense tensor, fixed-width or ragged `SparseCodes`), the pass only needs
the active entries (value != 0, so signed codes keep both signs) of each row, next to the row's global
number, token id, document and position. Blocks concatenate and slice by rows, which is how the pass
keeps a few rows of context on either side of the rows it is examining.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hsae.models.codes import Codes, as_sparse


@dataclass
class RowBlock:
    rows: Tensor  # (m,) int64: each row's number in the pass
    token_ids: Tensor  # (m,) int64
    doc_ids: Tensor  # (m,) int64
    positions: Tensor  # (m,) int64
    offsets: Tensor  # (m + 1,) int64: row i's entries are [offsets[i], offsets[i + 1])
    latents: Tensor  # (nnz,) int64
    values: Tensor  # (nnz,) float32, all != 0

    def __len__(self) -> int:
        return int(self.rows.numel())

    def entry_rows(self) -> Tensor:
        """The (local) row of each entry, (nnz,)."""
        return torch.repeat_interleave(torch.arange(len(self)), self.offsets.diff())

    def slice(self, start: int, stop: int) -> RowBlock:
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        return RowBlock(
            self.rows[start:stop],
            self.token_ids[start:stop],
            self.doc_ids[start:stop],
            self.positions[start:stop],
            self.offsets[start : stop + 1] - lo,
            self.latents[lo:hi],
            self.values[lo:hi],
        )

    @staticmethod
    def cat(blocks: list[RowBlock]) -> RowBlock:
        blocks = [b for b in blocks if len(b)] or blocks[:1]
        shifts = torch.tensor([0] + [int(b.offsets[-1]) for b in blocks]).cumsum(0)
        offsets = torch.cat([blocks[0].offsets[:1]] + [b.offsets[1:] + shifts[i] for i, b in enumerate(blocks)])
        return RowBlock(
            torch.cat([b.rows for b in blocks]),
            torch.cat([b.token_ids for b in blocks]),
            torch.cat([b.doc_ids for b in blocks]),
            torch.cat([b.positions for b in blocks]),
            offsets,
            torch.cat([b.latents for b in blocks]),
            torch.cat([b.values for b in blocks]),
        )

    @staticmethod
    def empty() -> RowBlock:
        none = torch.zeros(0, dtype=torch.long)
        return RowBlock(none, none, none, none, torch.zeros(1, dtype=torch.long), none, torch.zeros(0))

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        """The block as named tensors (for a checkpoint)."""
        return {f"{prefix}.{name}": getattr(self, name).contiguous() for name in _FIELDS}

    @staticmethod
    def from_tensors(tensors: dict[str, Tensor], prefix: str) -> RowBlock:
        return RowBlock(*(tensors[f"{prefix}.{name}"] for name in _FIELDS))


_FIELDS = ("rows", "token_ids", "doc_ids", "positions", "offsets", "latents", "values")


def codes_to_csr(codes: Codes) -> tuple[Tensor, Tensor, Tensor]:
    """(offsets (n + 1,), latents (nnz,), values (nnz,)) of the active entries of `codes`, row by row."""
    csr = as_sparse(codes).csr()
    assert csr.offsets is not None
    return csr.offsets.cpu(), csr.indices.long().cpu(), csr.values.detach().float().cpu()
