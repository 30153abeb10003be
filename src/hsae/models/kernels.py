"""Sparse kernels: training TopK-style SAEs through the active latents only.

The cost of a TopK training step should be the encoder's forward matmul plus O(k) work per token.
Everything after that matmul touches only the selected (token, latent) entries:

- `sparse_decode` computes sum_j values[r, j] * W_dec[indices[r, j]] with `embedding_bag`; its custom
  backward writes grad W_dec as one more `embedding_bag` over the entries grouped by latent (a
  segment sum, no (nnz, d) temporary) and grad values as a sampled dot product. It never builds the
  dense (n, n_latents) code.
- `sparse_encoder_values` re-attaches code values, selected without autograd from the pre-activations
  `(xn - b_dec) @ W_enc + b_enc`, to W_enc, b_enc and b_dec (and xn if it needs a gradient). Since the
  loss depends on the pre-activations only through the selected entries, its backward forms
  grad W_enc = (xn - b_dec)^T G with G sparse as a segment sum over latents (`embedding_bag`), grad
  b_enc = colsum G, grad b_dec = -W_enc colsum G. Nothing of size (n, n_latents) is built and no
  gradient w.r.t. the data is computed unless asked for.
- `topk_select`, `batch_topk_select` and `masked_topk_select`: selection without autograd. BatchTopK
  finds its threshold from block maxima (a lower bound of the k*n-th largest value) so that the exact
  top k*n is taken among few candidates instead of a top-k over all n * n_latents entries.
- `encode_topk_chunked`: pre-activations, TopK and AuxK selection in row chunks, so the full (n,
  n_latents) pre-activation tensor never exists while training (peak memory) and each chunk stays in
  cache while it is selected from.

tests/test_kernels.py checks values and gradients of all of this against the dense computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows of pre-activations handled at once by `encode_topk_chunked` (memory: chunk x n_latents floats).
DEFAULT_CHUNK_ROWS = 256

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compute_dtype_of(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"compute_dtype must be one of {', '.join(_DTYPES)}, got {name!r}") from None


def encoder_matmul(xc: Tensor, W_enc: Tensor, b_enc: Tensor, compute_dtype: torch.dtype | None = None) -> Tensor:
    """b_enc + xc @ W_enc, with the matmul in `compute_dtype` (None: the weights' dtype); the result
    is in the weights' dtype."""
    if compute_dtype is None or compute_dtype == W_enc.dtype:
        return torch.addmm(b_enc, xc, W_enc)
    return torch.mm(xc.to(compute_dtype), W_enc.to(compute_dtype)).to(W_enc.dtype).add_(b_enc)


# ----- bookkeeping of sparse entries ---------------------------------------------------------------
def _row_ids(indices: Tensor, offsets: Tensor | None) -> Tensor:
    """Row (token) of each flat entry."""
    if offsets is None:
        n, k = indices.shape
        return torch.arange(n, device=indices.device).repeat_interleave(k)
    n = offsets.numel() - 1
    return torch.arange(n, device=indices.device).repeat_interleave(offsets.diff(), output_size=indices.numel())


# The decoder's backward and then the encoder's both group the same entries by latent: keep the last
# few groupings, keyed by the index tensor itself (held, so its identity cannot be reused) and its
# version counter (so an in-place change invalidates it).
_GROUPS: list[tuple[Tensor, int, int, Tensor, Tensor]] = []
_GROUPS_KEPT = 2


def _group_by_latent(cols: Tensor, n_latents: int, key: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Permutation sorting flat entries by latent, and the (n_latents + 1,) CSR pointer of the groups."""
    if key is not None:
        for held, version, m, order, ptr in _GROUPS:
            if held is key and version == key._version and m == n_latents:
                return order, ptr
    order = torch.argsort(cols)
    ptr = torch.zeros(n_latents + 1, dtype=torch.long, device=cols.device)
    torch.cumsum(torch.bincount(cols, minlength=n_latents), 0, out=ptr[1:])
    if key is not None:
        _GROUPS.insert(0, (key, key._version, n_latents, order, ptr))
        del _GROUPS[_GROUPS_KEPT:]
    return order, ptr


def clear_cache() -> None:
    """Drop the cached latent groupings (they hold a step's index tensors)."""
    _GROUPS.clear()


def _segment_sum(rows: Tensor, weights: Tensor, table: Tensor, order: Tensor, ptr: Tensor) -> Tensor:
    """out[j] = sum over entries e of latent j of weights[e] * table[rows[e]]  -> (n_latents, d)."""
    return F.embedding_bag(
        rows[order], table, ptr, mode="sum", per_sample_weights=weights[order].to(table.dtype),
        include_last_offset=True,
    )


def _bag_sum(indices: Tensor, weights: Tensor, table: Tensor, offsets: Tensor | None) -> Tensor:
    """out[r] = sum_j weights[r, j] * table[indices[r, j]] (fixed width or CSR rows)."""
    weights = weights.to(table.dtype)
    if offsets is None:
        return F.embedding_bag(indices, table, mode="sum", per_sample_weights=weights)
    # embedding_bag takes bag starts (n,), with include_last_offset the full (n + 1,) CSR pointer.
    return F.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True)


def _sampled_dot(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, offsets: Tensor | None) -> Tensor:
    """(a[rows[e]] * b[cols[e]]).sum() for each entry e, for a (n, d) and b (m, d): the gradient of
    `embedding_bag`'s per-sample weights, one dot product per entry without gathering rows."""
    n = a.shape[0]
    if offsets is None:
        starts = torch.arange(0, cols.numel(), max(1, cols.numel() // max(1, n)), device=cols.device)[:n]
    else:
        starts = offsets[:-1]
    try:
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(a, b, cols, starts, rows, 0, -1)
    except (AttributeError, RuntimeError):  # a torch without the op: gather in chunks
        out = torch.empty(rows.numel(), dtype=a.dtype, device=a.device)
        for s in range(0, rows.numel(), 4096):
            r, c = rows[s : s + 4096], cols[s : s + 4096]
            out[s : s + 4096] = (b[c] * a[r]).sum(-1)
        return out


# ----- decoder ---------------------------------------------------------------------------------------
class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices: Tensor, values: Tensor, W_dec: Tensor, offsets: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(indices, values, W_dec, offsets)
        return _bag_sum(indices, values, W_dec, offsets)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        indices, values, W_dec, offsets = ctx.saved_tensors
        need_values, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_values = grad_w = None
        if not (need_values or need_w):
            return None, None, None, None
        grad_out = grad_out.contiguous()
        cols = indices.reshape(-1)
        rows = _row_ids(indices, offsets)
        if need_w:
            order, ptr = _group_by_latent(cols, W_dec.shape[0], key=indices)
            grad_w = _segment_sum(rows, values.reshape(-1), grad_out, order, ptr)
        if need_values:
            grad_values = _sampled_dot(grad_out, W_dec, rows, cols, offsets).view_as(values).to(values.dtype)
        return None, grad_values, grad_w, None


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor, offsets: Tensor | None = None) -> Tensor:
    """(n, k) or CSR (nnz,)+(n+1,) codes times W_dec (n_latents, d) -> (n, d), without a dense code.
    Gradients flow to `values` and `W_dec` through the active entries only."""
    values = values.to(W_dec.dtype)
    if not torch.is_grad_enabled() or not (values.requires_grad or W_dec.requires_grad):
        return _bag_sum(indices, values, W_dec, offsets)
    return _SparseDecode.apply(indices, values, W_dec, offsets)


# ----- encoder ---------------------------------------------------------------------------------------
class _SparseEncoderValues(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, xc, xn, W_enc, b_enc, b_dec, indices, offsets):  # type: ignore[override]
        ctx.save_for_backward(values, xc, W_enc, indices, offsets)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        values, xc, W_enc, indices, offsets = ctx.saved_tensors
        need_x, need_w, need_be, need_bd = ctx.needs_input_grad[2:6]
        grad_x = grad_w = grad_be = grad_bd = None
        # The values are ReLU'd pre-activations: the gradient passes where they are > 0.
        g = torch.where(values > 0, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)).reshape(-1)
        cols = indices.reshape(-1)
        m = W_enc.shape[1]
        if need_w:
            rows = _row_ids(indices, offsets)
            order, ptr = _group_by_latent(cols, m, key=indices)
            grad_w = _segment_sum(rows, g, xc, order, ptr).t()
        if need_be or need_bd:
            gb = torch.zeros(m, dtype=W_enc.dtype, device=W_enc.device).index_add_(0, cols, g.to(W_enc.dtype))
            grad_be = gb if need_be else None
            grad_bd = -(W_enc @ gb) if need_bd else None
        if need_x:
            grad_x = _bag_sum(indices, g.view_as(indices) if offsets is None else g, W_enc.t().contiguous(), offsets)
        return None, None, grad_x, grad_w, grad_be, grad_bd, None, None


def sparse_encoder_values(
    values: Tensor, xn: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, indices: Tensor,
    offsets: Tensor | None = None, xc: Tensor | None = None,
) -> Tensor:
    """`values` (ReLU'd pre-activations at `indices`, selected without autograd) as a function of the
    encoder: pre = (xn - b_dec) @ W_enc + b_enc. The forward returns the values unchanged; the
    backward is sparse (see the module docstring). `xc` = xn - b_dec if already at hand."""
    if xc is None:
        xc = xn.detach() - b_dec.detach()
    return _SparseEncoderValues.apply(values.detach(), xc.detach(), xn, W_enc, b_enc, b_dec, indices, offsets)


# ----- selection (no autograd) ---------------------------------------------------------------------
def _block_size(m: int, k: int) -> int:
    """Size of the strided blocks of `topk_select` (0: plain torch.topk)."""
    for size in (16, 8):
        if m % size == 0 and m // size >= 2 * k:
            return size
    return 0


@torch.no_grad()
def topk_select(pre: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(values ReLU'd, indices) of the k largest entries of each row, in no particular order.

    Two-stage selection, exact: each row is split into `nb` strided blocks of B entries (entry b * nb
    + j is in block j); the k blocks with the largest maxima hold every one of the row's top k entries
    (each of those is <= its block's maximum, and at most k blocks have a maximum >= the k-th largest
    entry), so the top k of those k * B candidates is the row's top k. That is a fast vectorised max,
    a top-k over nb block maxima and one over k * B candidates instead of one over all m entries (ties
    may pick a different but equal-valued entry, as torch.topk's own order is unspecified)."""
    n, m = pre.shape
    size = _block_size(m, k)
    if size == 0 or pre.device.type != "cpu":
        values, indices = pre.topk(k, dim=-1, sorted=False)
        return values.relu_(), indices
    nb = m // size
    blocks = pre.view(n, size, nb)
    _, top_blocks = blocks.amax(1).topk(k, dim=-1, sorted=False)
    cand = blocks.gather(2, top_blocks.unsqueeze(1).expand(n, size, k)).view(n, size * k)
    values, pos = cand.topk(k, dim=-1, sorted=False)
    indices = torch.div(pos, k, rounding_mode="floor").mul_(nb).add_(top_blocks.gather(1, pos.remainder(k)))
    return values.relu_(), indices


@torch.no_grad()
def masked_topk_select(pre: Tensor, cols: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of each row among the columns `cols` (e.g. the dead latents), ReLU'd; indices are
    latent ids. Equals pre.masked_fill(~mask, -inf).topk(k) with mask the columns, for k <= len(cols)."""
    sub = pre.index_select(1, cols)
    values, pos = sub.topk(k, dim=-1, sorted=False)
    return values.relu_(), cols[pos]


def _block_maxima(pre: Tensor, min_blocks: int) -> Tensor:
    """Maxima of disjoint groups of entries of each row (strided groups, a fast reduction), with at
    least `min_blocks` groups per row. Any of them is an entry of its row."""
    n, m = pre.shape
    for size in (16, 8, 4, 2):
        if m % size == 0 and m // size >= min_blocks:
            return pre.view(n, size, m // size).amax(1)
    return pre


@torch.no_grad()
def batch_topk_select(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The k * n largest positive entries of the whole batch as CSR (values, indices, offsets), rows
    in order and entries in latent order within a row — the same set as
    `pre.reshape(-1).topk(k * n)` filtered to > 0 (up to ties at the threshold).

    The (k n)-th largest block maximum is a lower bound of the (k n)-th largest entry (the block maxima
    are k n or more distinct entries), so every entry of the batch's top k n is >= it: the exact top
    k n is taken among the entries above that bound only."""
    n, m = pre.shape
    total = min(k * n, n * m)
    flat_pre = pre.reshape(-1)
    bm = _block_maxima(pre, min_blocks=k).reshape(-1)
    if total < bm.numel():
        bound = bm.kthvalue(bm.numel() - total + 1).values
        cand = (flat_pre >= bound).logical_and_(flat_pre > 0).nonzero().squeeze(1)
    else:
        cand = (flat_pre > 0).nonzero().squeeze(1)
    vals = flat_pre[cand]
    if vals.numel() > total:
        vals, pos = vals.topk(total, sorted=False)
        cand, order = cand[pos].sort()
        vals = vals[order]
    rows = torch.div(cand, m, rounding_mode="floor")
    offsets = torch.zeros(n + 1, dtype=torch.long, device=pre.device)
    torch.cumsum(torch.bincount(rows, minlength=n), 0, out=offsets[1:])
    return vals, cand - rows * m, offsets


@dataclass
class TopKSelection:
    """What `encode_topk_chunked` selects (no autograd): the TopK codes and the AuxK entries."""

    values: Tensor  # (n, k), ReLU'd
    indices: Tensor  # (n, k)
    aux_values: Tensor | None = None  # (n, k_aux) among the dead latents
    aux_indices: Tensor | None = None


@torch.no_grad()
def encode_topk_chunked(
    xc: Tensor, W_enc: Tensor, b_enc: Tensor, k: int, *, dead_cols: Tensor | None = None, k_aux: int = 0,
    compute_dtype: torch.dtype | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> TopKSelection:
    """TopK codes (and AuxK entries among `dead_cols`) of xc = xn - b_dec, computing the
    pre-activations `chunk_rows` rows at a time."""
    n = xc.shape[0]
    values = torch.empty(n, k, dtype=W_enc.dtype, device=xc.device)
    indices = torch.empty(n, k, dtype=torch.long, device=xc.device)
    aux = dead_cols is not None and k_aux > 0
    if aux:
        aux_values = torch.empty(n, k_aux, dtype=W_enc.dtype, device=xc.device)
        aux_indices = torch.empty(n, k_aux, dtype=torch.long, device=xc.device)
    if compute_dtype is not None and compute_dtype != W_enc.dtype:
        # Cast once per batch, not per chunk; the result is accumulated back in the weights' dtype.
        xc_c, W_c = xc.to(compute_dtype), W_enc.to(compute_dtype)
    else:
        xc_c, W_c = xc, W_enc
    for s in range(0, n, chunk_rows):
        e = min(n, s + chunk_rows)
        if W_c is W_enc:
            pre = torch.addmm(b_enc, xc[s:e], W_enc)
        else:
            pre = torch.mm(xc_c[s:e], W_c).to(W_enc.dtype).add_(b_enc)
        values[s:e], indices[s:e] = topk_select(pre, k)
        if aux:
            aux_values[s:e], aux_indices[s:e] = masked_topk_select(pre, dead_cols, k_aux)
        del pre
    if aux:
        return TopKSelection(values, indices, aux_values, aux_indices)
    return TopKSelection(values, indices)
