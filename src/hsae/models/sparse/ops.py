"""Sparse primitives: sums and products over (token, latent) entries without dense codes.

- `sparse_decode` computes sum_j values[r, j] * W_dec[indices[r, j]] with `embedding_bag`; its custom
  backward writes grad W_dec as one more `embedding_bag` over the entries grouped by latent (a
  segment sum, no (nnz, d) temporary) and grad values as a sampled dot product. It never builds the
  dense (n, n_latents) code.
- `segment_sum`, `segment_sum_transposed`, `bag_sum`, `sampled_dot`, `group_by_latent`, `row_ids`,
  `sort_entries_by_latent`, `value_grads_`, `latent_sums_`, `segment_sum_into`, `ids_dtype_for`,
  `small_ids_dtype_for`: the building blocks
  of the fused training steps (hsae.models.sparse.topk_step, prefix_step).
- `encoder_matmul` (optionally in bf16), `remove_parallel_component_` (the unit-norm decoder rule,
  in place, in blocks).

tests/test_kernels.py checks them against the dense computation.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from hsae.models.sparse import cpu_select

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
def row_ids(indices: Tensor, offsets: Tensor | None) -> Tensor:
    """Row (token) of each flat entry."""
    if offsets is None:
        n, k = indices.shape
        return torch.arange(n, device=indices.device).repeat_interleave(k)
    n = offsets.numel() - 1
    return torch.arange(n, device=indices.device).repeat_interleave(offsets.diff(), output_size=indices.numel())


def group_by_latent(cols: Tensor, n_latents: int) -> tuple[Tensor, Tensor]:
    """Permutation sorting flat entries by latent, and the (n_latents + 1,) CSR pointer of the groups."""
    # int32 keys sort about twice as fast as int64 ones on CPU.
    order = torch.argsort(cols.to(torch.int32) if n_latents < 2**31 else cols)
    ptr = torch.zeros(n_latents + 1, dtype=torch.long, device=cols.device)
    torch.cumsum(torch.bincount(cols, minlength=n_latents), 0, out=ptr[1:])
    return order, ptr


def ids_dtype_for(bound: int) -> torch.dtype:
    """int32 for ids and offsets below `bound` where they fit (half of int64's memory), else int64."""
    return torch.int32 if bound < 2**31 else torch.long


def small_ids_dtype_for(bound: int, device: torch.device, otherwise: torch.dtype) -> torch.dtype:
    """int16 for ids below `bound` on the CPU where they fit (the ops here widen them block by block
    where read), else `otherwise`."""
    return torch.int16 if device.type == "cpu" and bound < 2**15 else otherwise


def csr_blocks(ptr: Tensor, lo: int, hi: int, step: int) -> Iterator[tuple[int, int, int, int]]:
    """(s0, s1, p0, p1) for the segments lo..hi-1 of CSR pointer `ptr` taken `step` at a time: the
    block's segments s0..s1-1 and its entries p0..p1-1 (one host read of the pointer for all blocks)."""
    cuts = ptr[lo : hi + 1 : step].tolist() + ([int(ptr[hi])] if (hi - lo) % step else [])
    for blk, s0 in enumerate(range(lo, hi, step)):
        yield s0, min(hi, s0 + step), cuts[blk], cuts[blk + 1]


def _bag_block(rows: Tensor, weights: Tensor, table: Tensor, ptr: Tensor, s0: int, s1: int, p0: int, p1: int) -> Tensor:
    """The sums of segments s0..s1-1 (entries p0..p1-1) of CSR pointer `ptr`: (s1 - s0, d). Rows
    narrower than ptr (int16) are widened block by block (embedding_bag takes ptr's dtype)."""
    return F.embedding_bag(
        rows[p0:p1].to(ptr.dtype), table, ptr[s0 : s1 + 1] - p0, mode="sum", per_sample_weights=weights[p0:p1],
        include_last_offset=True,
    )  # fmt: skip


def sort_entries_by_latent(
    entries: list[Tensor], bag_offsets: Tensor, n_latents: int, dtype: torch.dtype, bag_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(bags, values, ptr) of CSR entries [cols, vals] (bags `bag_offsets`) sorted by latent, the
    entries of a latent in their original order, with the (n_latents + 1,) CSR pointer of the
    latents (which gives each sorted entry's latent); ptr in `dtype` (int32 where it fits), bags in
    `bag_dtype` (default `dtype`; int16 where the bag ids fit, widened block by block where used).
    `entries` is emptied, so the caller's unsorted arrays are freed once used. On the CPU one compiled
    pass (cpu_select.scatter_by_latent) writes the sorted arrays without an int64 permutation;
    elsewhere a stable sort of the latent ids."""
    cols, vals = entries
    entries.clear()
    bag_dtype = dtype if bag_dtype is None else bag_dtype
    ptr = torch.zeros(n_latents + 1, dtype=dtype, device=cols.device)
    torch.cumsum(torch.bincount(cols, minlength=n_latents), 0, out=ptr[1:])
    if cols.device.type == "cpu" and cpu_select.enabled() and cols.is_contiguous() and vals.is_contiguous():
        try:
            bags_s, vals_s = cpu_select.scatter_by_latent(cols, vals, bag_offsets, ptr, bag_dtype)
        except cpu_select.CompileError as err:  # go on with the torch ops below
            cpu_select.disable(err)
        else:
            return bags_s, vals_s, ptr
    cols_n = cols.to(dtype)
    del cols
    order = cols_n.sort(stable=True).indices
    del cols_n
    bags_s = (
        torch.arange(bag_offsets.numel() - 1, device=order.device, dtype=bag_dtype)
        .repeat_interleave(bag_offsets.diff(), output_size=order.numel())
        .index_select(0, order)
    )
    vals_s = vals.index_select(0, order)
    return bags_s, vals_s, ptr


# Latents per block of `value_grads_` (its per-block latent ids and gradients stay small).
VALUE_GRAD_BLOCK = 128


def value_grads_(
    vals: Tensor,
    G: Tensor,
    W_dec: Tensor,
    bags: Tensor,
    bag_offsets: Tensor,
    ptr: Tensor,
    lo: int = 0,
    hi: int | None = None,
    gb: Tensor | None = None,
) -> None:
    """Overwrite the values of entries sorted by latent (CSR pointer `ptr`, bags `bags` of the
    pointer `bag_offsets`) of latents lo..hi-1 (default all) with their gradients
    G[bag] . W_dec[latent], passed where the value is > 0 (ReLU); adds their sums per latent into
    gb[lo:hi] when given (index_add_, in entry order). On the CPU `VALUE_GRAD_BLOCK` latents at a
    time, each block's latent ids made from `ptr`, so no per-entry latent or gradient array exists
    besides `vals` (a GPU takes them all at once)."""
    hi = ptr.numel() - 1 if hi is None else hi
    if hi <= lo:
        return
    step = max(1, hi - lo if vals.device.type != "cpu" else VALUE_GRAD_BLOCK)
    offsets = bag_offsets[:-1].to(ptr.dtype)  # embedding_bag's ids and offsets share one dtype
    for j0, j1, p0, p1 in csr_blocks(ptr, lo, hi, step):
        if p1 == p0:
            continue
        local = torch.repeat_interleave(ptr[j0 : j1 + 1].diff(), output_size=p1 - p0)  # latent - j0
        g = torch.ops.aten._embedding_bag_per_sample_weights_backward(
            G, W_dec, local.add_(j0), offsets, bags[p0:p1].to(local.dtype), 0, -1
        )
        v = vals[p0:p1]
        g.mul_(v > 0)  # ReLU: no gradient where the value was clipped to 0
        v.copy_(g)
        if gb is not None:
            gb[j0:j1].index_add_(0, local.sub_(j0), g)


def latent_sums_(out: Tensor, vals: Tensor, ptr: Tensor) -> None:
    """out[j] += each value of latent j's entries (sorted by latent, CSR pointer `ptr`), added one
    at a time in entry order (index_add_), as `value_grads_` adds them into gb: entries split into two
    sets give the same sums when the second set's are added after the first's. `VALUE_GRAD_BLOCK`
    latents at a time on the CPU (small latent ids)."""
    m = ptr.numel() - 1
    step = max(1, m if vals.device.type != "cpu" else VALUE_GRAD_BLOCK)
    for j0, j1, p0, p1 in csr_blocks(ptr, 0, m, step):
        if p1 > p0:
            out[j0:j1].index_add_(0, torch.repeat_interleave(ptr[j0 : j1 + 1].diff(), output_size=p1 - p0), vals[p0:p1])


def segment_sum(rows: Tensor, weights: Tensor, table: Tensor, order: Tensor, ptr: Tensor) -> Tensor:
    """out[j] = sum over entries e of latent j of weights[e] * table[rows[e]]  -> (n_latents, d)."""
    return F.embedding_bag(
        rows.index_select(0, order),
        table,
        ptr,
        mode="sum",
        per_sample_weights=weights.index_select(0, order).to(table.dtype),
        include_last_offset=True,
    )


def bag_sum(indices: Tensor, weights: Tensor, table: Tensor, offsets: Tensor | None) -> Tensor:
    """out[r] = sum_j weights[r, j] * table[indices[r, j]] (fixed width or CSR rows)."""
    weights = weights.to(table.dtype)
    if offsets is None:
        return F.embedding_bag(indices, table, mode="sum", per_sample_weights=weights)
    # embedding_bag takes bag starts (n,), with include_last_offset the full (n + 1,) CSR pointer.
    return F.embedding_bag(indices, table, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True)


def sampled_dot(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, offsets: Tensor | None) -> Tensor:
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
    def forward(ctx, indices: Tensor, values: Tensor, W_dec: Tensor, offsets: Tensor | None) -> Tensor:
        ctx.save_for_backward(indices, values, W_dec, offsets)
        return bag_sum(indices, values, W_dec, offsets)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        indices, values, W_dec, offsets = ctx.saved_tensors
        need_values, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_values = grad_w = None
        if not (need_values or need_w):
            return None, None, None, None
        grad_out = grad_out.contiguous()
        cols = indices.reshape(-1)
        rows = row_ids(indices, offsets)
        if need_w:
            order, ptr = group_by_latent(cols, W_dec.shape[0])
            grad_w = segment_sum(rows, values.reshape(-1), grad_out, order, ptr)
        if need_values:
            grad_values = sampled_dot(grad_out, W_dec, rows, cols, offsets).view_as(values).to(values.dtype)
        return None, grad_values, grad_w, None


def sparse_decode(indices: Tensor, values: Tensor, W_dec: Tensor, offsets: Tensor | None = None) -> Tensor:
    """(n, k) or CSR (nnz,)+(n+1,) codes times W_dec (n_latents, d) -> (n, d), without a dense code.
    Gradients flow to `values` and `W_dec` through the active entries only."""
    values = values.to(W_dec.dtype)
    if not torch.is_grad_enabled() or not (values.requires_grad or W_dec.requires_grad):
        return bag_sum(indices, values, W_dec, offsets)
    return _SparseDecode.apply(indices, values, W_dec, offsets)


def segment_sum_into(
    out: Tensor,
    lo: int,
    hi: int,
    rows: Tensor,
    weights: Tensor,
    table: Tensor,
    ptr: Tensor,
    block: int = 512,
    accumulate: bool = False,
) -> None:
    """out[j] = sum over entries e of latent j of weights[e] * table[rows[e]] (`accumulate`: added to
    out[j]), for latents lo..hi-1, entries sorted by latent with CSR pointer `ptr` (n_latents + 1,);
    on the CPU `block` latents at a time, so embedding_bag's per-entry temporaries stay small (a GPU
    takes them all at once)."""
    if hi <= lo:
        return
    step = hi - lo if out.device.type != "cpu" else block
    for j0, j1, p0, p1 in csr_blocks(ptr, lo, hi, step):
        if accumulate:
            out[j0:j1].add_(_bag_block(rows, weights, table, ptr, j0, j1, p0, p1))
        else:
            out[j0:j1] = _bag_block(rows, weights, table, ptr, j0, j1, p0, p1)


# Entries per embedding_bag call of `bag_sum_blocks` (its per-entry temporaries stay this small).
BAG_BLOCK_ENTRIES = 1 << 18


def bag_sum_blocks(indices: Tensor, weights: Tensor, table: Tensor, offsets: Tensor) -> Tensor:
    """out[b] = sum over the entries e of CSR bag b of weights[e] * table[indices[e]], (n_bags, d); on
    the CPU in blocks of bags holding about BAG_BLOCK_ENTRIES entries, so embedding_bag's per-entry
    temporaries stay small when there are many entries (the AuxK entries of many dead latents); a GPU
    takes them all at once. Each bag's sum is the same either way."""
    n_bags = offsets.numel() - 1
    block = max(1, -(-n_bags * BAG_BLOCK_ENTRIES // max(1, indices.numel())))
    if table.device.type != "cpu" or n_bags <= block:
        return F.embedding_bag(
            indices, table, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True
        )
    out = torch.empty(n_bags, table.shape[1], dtype=table.dtype, device=table.device)
    for b0, b1, p0, p1 in csr_blocks(offsets, 0, n_bags, block):
        out[b0:b1] = _bag_block(indices, weights, table, offsets, b0, b1, p0, p1)
    return out


# ----- encoder gradients -----------------------------------------------------------------------------
# Latents per block of the grad-W_enc segment sum (its (block, d_in) result is transposed in cache).
_WENC_BLOCK = 256


def segment_sum_transposed(
    rows: Tensor,
    weights: Tensor,
    table: Tensor,
    ptr: Tensor,
    scale: float,
    b_dec: Tensor,
    colsum: Tensor,
    more: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Tensor:
    """(d, m) matrix whose column j is scale * sum_{e in latent j} weights[e] * table[rows[e]]
    - b_dec * colsum[j], for entries sorted by latent with CSR pointer `ptr`, built block by block
    (no (m, d) intermediate). `more`, a second set of entries (rows, weights, ptr) sorted by latent:
    each latent's sum over it is added to its sum over the first."""
    m, d = ptr.numel() - 1, table.shape[1]
    weights = weights.to(table.dtype)
    if table.device.type != "cpu":
        # On a GPU the cache-sized blocks would only multiply kernel launches (and their bounds
        # need a host sync).
        return _segment_sum_transposed_whole(rows, weights, table, ptr, scale, b_dec, colsum, more)
    out = torch.empty(d, m, dtype=table.dtype, device=table.device)
    extra = None if more is None else csr_blocks(more[2], 0, m, _WENC_BLOCK)
    for j0, j1, p0, p1 in csr_blocks(ptr, 0, m, _WENC_BLOCK):
        part = _bag_block(rows, weights, table, ptr, j0, j1, p0, p1)
        if more is not None and extra is not None:
            _, _, q0, q1 = next(extra)
            part.add_(_bag_block(more[0], more[1].to(table.dtype), table, more[2], j0, j1, q0, q1))
        # scale * part^T - b_dec (x) colsum, written into the block's columns in one pass
        torch.addr(part.t(), b_dec, colsum[j0:j1], beta=scale, alpha=-1, out=out[:, j0:j1])
    return out


def _segment_sum_transposed_whole(rows, weights, table, ptr, scale, b_dec, colsum, more=None) -> Tensor:
    """`segment_sum_transposed` as one segment sum (per entry set), then transposed (what a GPU runs)."""
    m = ptr.numel() - 1
    part = _bag_block(rows, weights, table, ptr, 0, m, 0, rows.numel())
    if more is not None:
        part.add_(_bag_block(more[0], more[1].to(table.dtype), table, more[2], 0, m, 0, more[0].numel()))
    out = torch.empty(table.shape[1], m, dtype=table.dtype, device=table.device)
    return torch.addr(part.t(), b_dec, colsum, beta=scale, alpha=-1, out=out)


@torch.no_grad()
def remove_parallel_component_(g: Tensor, w: Tensor, block_rows: int = 512) -> None:
    """g[i] -= (g[i] . w[i]) w[i] in place, in row blocks on the CPU (no (m, d) temporaries; a GPU
    takes all rows in one go)."""
    if g.device.type != "cpu":
        block_rows = max(1, g.shape[0])
    for s in range(0, g.shape[0], block_rows):
        gb, wb = g[s : s + block_rows], w[s : s + block_rows]
        gb.addcmul_((gb * wb).sum(-1, keepdim=True), wb, value=-1)
