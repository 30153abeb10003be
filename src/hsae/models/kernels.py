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
- `sparse_topk_step` (`_SparseTopKStep`): what the TopK-style families train through — decoder,
  reconstruction loss and AuxK loss in one autograd function whose backward writes all four
  parameter gradients from the active entries (codes and AuxK entries together, one grouping by
  latent), grad W_enc block by block in its own (d_in, n_latents) layout from the raw batch, freeing
  its (n, d_in) buffers as soon as they are used (peak memory). AuxK over few dead latents comes as a
  dense (n, n_dead) block instead of entries (`dense_aux_codes`, `dense_aux_forward/backward`): small
  matmuls beat per-entry gathers when k_aux is near the dead count.
- `topk_select`, `batch_topk_select` and `masked_topk_select`: selection without autograd.
  `BatchTopKCollector` selects the batch-wide top k*n from row chunks of pre-activations, keeping
  only candidates above a running lower bound (and an optional hint, verified), exactly. On the
  CPU the per-row top-k and the candidate filter run compiled (`hsae.models.cpu_select`, numba).
- `encode_topk_chunked` / `encode_batch_topk_chunked`: pre-activations, TopK or BatchTopK and AuxK
  selection in row chunks, so the full (n, n_latents) pre-activation tensor never exists while
  training (peak memory) and each chunk stays in cache while it is selected from.

tests/test_kernels.py checks values and gradients of all of this against the dense computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hsae.models import cpu_select

# Rows of pre-activations handled at once by `encode_topk_chunked` (memory: chunk x n_latents floats).
# Every op runs with all intra-op threads: 512 rows keep the per-chunk selection ops (top-k, gather,
# block maxima) large enough for that to pay on 2 threads (256 rows: ~5% slower there), while the
# 12 MiB chunk stays below the step's backward peak (1024 rows raise the peak memory).
DEFAULT_CHUNK_ROWS = 512

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
    # int32 keys sort about twice as fast as int64 ones on CPU.
    order = torch.argsort(cols.to(torch.int32) if n_latents < 2**31 else cols)
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
        rows.index_select(0, order),
        table,
        ptr,
        mode="sum",
        per_sample_weights=weights.index_select(0, order).to(table.dtype),
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
    values: Tensor,
    xn: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    indices: Tensor,
    offsets: Tensor | None = None,
    xc: Tensor | None = None,
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
def topk_select(
    pre: Tensor, k: int, values: Tensor | None = None, indices: Tensor | None = None, *, compiled: bool | None = None
) -> tuple[Tensor, Tensor]:
    """(values ReLU'd, indices) of the k largest entries of each row, in no particular order
    (written into `values` / `indices`, contiguous (n, k) tensors, when given).

    On the CPU, exact and without a full per-row sort: by the compiled kernel of
    `hsae.models.cpu_select` (numba; `compiled=False` or HSAE_NUMBA=0 switch it off), else by a
    two-stage selection in torch ops: each row is split into `nb` strided blocks of B entries (entry
    b * nb + j is in block j); the k blocks with the largest maxima hold every one of the row's top k
    entries (each of those is <= its block's maximum, and at most k blocks have a maximum >= the k-th
    largest entry), so the top k of those k * B candidates is the row's top k. That is a fast
    vectorised max, a top-k over nb block maxima and one over k * B candidates instead of one over all
    m entries. Ties may pick a different but equal-valued entry, as torch.topk's own order is
    unspecified."""
    n, m = pre.shape
    size = _block_size(m, k)
    if size == 0 or pre.device.type != "cpu":
        v, i = pre.topk(k, dim=-1, sorted=False)
        return _into(v.relu_(), i, values, indices)
    use = cpu_select.enabled() if compiled is None else (compiled and cpu_select.available())
    if use and k > 0 and pre.dtype in (torch.float32, torch.float64):
        ok_out = all(
            t is None or (t.is_contiguous() and t.shape == (n, k) and t.dtype == dt)
            for t, dt in ((values, pre.dtype), (indices, torch.long))
        )
        try:
            v, i = cpu_select.select_topk(
                pre.detach().contiguous(), k, size, *((values, indices) if ok_out else (None, None))
            )
        except cpu_select.CompileError as err:  # go on with the torch ops below
            cpu_select.disable(err)
        else:
            return (v, i) if ok_out else _into(v, i, values, indices)
    nb = m // size
    blocks = pre.view(n, size, nb)
    _, top_blocks = blocks.amax(1).topk(k, dim=-1, sorted=False)
    cand = blocks.gather(2, top_blocks.unsqueeze(1).expand(n, size, k)).view(n, size * k)
    v, pos = cand.topk(k, dim=-1, sorted=False)
    i = torch.div(pos, k, rounding_mode="floor").mul_(nb).add_(top_blocks.gather(1, pos.remainder(k)))
    return _into(v.relu_(), i, values, indices)


def _into(v: Tensor, i: Tensor, values: Tensor | None, indices: Tensor | None) -> tuple[Tensor, Tensor]:
    """(v, i), copied into the given output tensors."""
    if values is not None:
        values.copy_(v)
        v = values
    if indices is not None:
        indices.copy_(i)
        i = indices
    return v, i


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


def _entries_at_least(pre: Tensor, thr: float) -> tuple[Tensor, Tensor]:
    """(flat row-major positions, values) of the entries of `pre` (c, m) that are > 0 and >= thr, in
    no particular order. Looks at the strided blocks whose maximum passes first, so that only a
    small part of the chunk is compared entry by entry when the threshold is high."""
    c, m = pre.shape
    size = next((s for s in (16, 8, 4) if m % s == 0 and m // s >= 2), 0)
    if size and cpu_select.enabled() and pre.device.type == "cpu" and pre.dtype in (torch.float32, torch.float64):
        try:
            return cpu_select.entries_at_least(pre.detach().contiguous(), thr, size)  # the same, compiled
        except cpu_select.CompileError as err:  # go on with the torch ops below
            cpu_select.disable(err)

    def passes(t: Tensor) -> Tensor:
        # both tests when thr > 0: a threshold below the dtype's resolution rounds to 0 in the compare
        return t > 0 if thr <= 0 else (t >= thr) & (t > 0)

    if size == 0:
        mask = passes(pre)
        return mask.reshape(-1).nonzero().squeeze(1), pre[mask]
    nb = m // size
    blocks = pre.view(c, size, nb)
    bm = blocks.amax(1)
    bm.masked_fill_(bm.isnan(), math.inf)  # a NaN entry must not hide its block's other entries
    hit = passes(bm).nonzero()
    r, b = hit[:, 0], hit[:, 1]
    cand = blocks[r, :, b]  # (hits, size): entry i of block (r, b) is latent i * nb + b of row r
    mask = passes(cand)
    pos = mask.nonzero()
    h, i = pos[:, 0], pos[:, 1]
    flat = r[h].mul_(m).add_(i.mul_(nb)).add_(b[h])
    return flat, cand[mask]


class BatchTopKCollector:
    """Exact batch-wide top-(k n) selection fed one row chunk of pre-activations at a time, so the
    full (n, n_latents) pre-activation tensor never exists.

    Only candidates are kept: positive entries >= the current threshold, which is the larger of
    - `bound`, a valid lower bound of the (k n)-th largest entry of the batch: given by the caller,
      and raised to the (k n)-th largest candidate kept so far whenever the candidates are pruned
      (the batch's (k n)-th largest entry is >= that of any subset of it), and
    - `hint`, a guess (e.g. the previous batch's threshold), that need not be a bound: if it is
      above the true (k n)-th largest entry, fewer than k n entries pass and `finish` returns None
      (the caller then recomputes without the hint). Otherwise every excluded entry is below k n
      kept ones and the selection is exact.
    `finish` takes the exact top k n among the candidates (ties at the threshold: the first ones
    met), rows in order and latents in order within each row, as CSR (values, indices, offsets)."""

    def __init__(
        self,
        n: int,
        m: int,
        k: int,
        *,
        hint: float | None = None,
        bound: float | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.n, self.m = n, m
        self.total = min(k * n, n * m)
        self.bound = -math.inf if bound is None else float(bound)
        self.hint = None if hint is None else float(hint)
        self.device, self.dtype = device, dtype
        self._pos: list[Tensor] = []
        self._vals: list[Tensor] = []
        self.count = 0
        self.pruned = 0

    def threshold(self) -> float:
        return self.bound if self.hint is None else max(self.bound, self.hint)

    @torch.no_grad()
    def add(self, pre: Tensor, row0: int) -> None:
        """Offer rows row0 .. row0 + len(pre) of the batch's pre-activations."""
        if self.total == 0:
            return
        pos, vals = _entries_at_least(pre, self.threshold())
        if row0:
            pos.add_(row0 * self.m)
        self._pos.append(pos)
        self._vals.append(vals)
        self.count += pos.numel()
        if self.count >= 2 * self.total + 4096:
            self._prune()

    def _cat(self) -> tuple[Tensor, Tensor]:
        if not self._pos:
            return (
                torch.empty(0, dtype=torch.long, device=self.device),
                torch.empty(0, dtype=self.dtype, device=self.device),
            )
        if len(self._pos) > 1:
            self._pos, self._vals = [torch.cat(self._pos)], [torch.cat(self._vals)]
        return self._pos[0], self._vals[0]

    def _prune(self) -> None:
        pos, vals = self._cat()
        kth = vals.kthvalue(vals.numel() - self.total + 1).values  # the total-th largest candidate
        keep = vals >= kth
        self._pos, self._vals = [pos[keep]], [vals[keep]]
        self.count = self._pos[0].numel()
        self.bound = max(self.bound, float(kth))
        self.pruned += 1

    @torch.no_grad()
    def finish(self) -> tuple[Tensor, Tensor, Tensor] | None:
        pos, vals = self._cat()
        if vals.numel() < self.total and self.hint is not None and self.hint > max(self.bound, 0.0):
            return None  # the hint was above the (k n)-th largest entry: positives below it are missing
        if vals.numel() > self.total:
            kth = vals.kthvalue(vals.numel() - self.total + 1).values
            keep = vals > kth
            short = self.total - int(keep.sum())
            if short > 0:  # ties at the threshold: take the first `short` of them
                keep[(vals == kth).nonzero().squeeze(1)[:short]] = True
            pos, vals = pos[keep], vals[keep]
        # int32 keys sort about twice as fast as int64 ones on CPU.
        if self.n * self.m < 2**31:
            key, order = pos.to(torch.int32).sort()
            pos = key.long()
        else:
            pos, order = pos.sort()
        vals = vals.index_select(0, order)
        rows = torch.div(pos, self.m, rounding_mode="floor")
        offsets = torch.zeros(self.n + 1, dtype=torch.long, device=pos.device)
        torch.cumsum(torch.bincount(rows, minlength=self.n), 0, out=offsets[1:])
        return vals, pos - rows * self.m, offsets


@torch.no_grad()
def batch_topk_select(pre: Tensor, k: int, chunk_rows: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The k * n largest positive entries of the whole batch as CSR (values, indices, offsets), rows
    in order and entries in latent order within a row — the same set as
    `pre.reshape(-1).topk(k * n)` filtered to > 0 (up to ties at the threshold).

    The (k n)-th largest block maximum is a lower bound of the (k n)-th largest entry (the block maxima
    are k n or more distinct entries), so every entry of the batch's top k n is >= it: the exact top
    k n is taken among the entries above that bound only (`BatchTopKCollector`, row chunks of
    `chunk_rows`, default all rows)."""
    n, m = pre.shape
    total = min(k * n, n * m)
    bound = None
    bm = _block_maxima(pre, min_blocks=k).reshape(-1)
    if 0 < total < bm.numel():
        bound = float(bm.kthvalue(bm.numel() - total + 1).values)
    col = BatchTopKCollector(n, m, k, bound=bound, device=pre.device, dtype=pre.dtype)
    step = chunk_rows or max(1, n)
    for s in range(0, n, step):
        col.add(pre[s : s + step], s)
    out = col.finish()
    assert out is not None  # no hint: always exact
    return out


@dataclass
class TopKSelection:
    """What `encode_topk_chunked` selects (no autograd): the TopK codes and the AuxK entries."""

    values: Tensor  # (n, k), ReLU'd; or (nnz,) with `offsets` (BatchTopK)
    indices: Tensor  # (n, k), or (nnz,)
    aux_values: Tensor | None = None  # (n, k_aux) among the dead latents
    aux_indices: Tensor | None = None
    offsets: Tensor | None = None  # (n + 1,) CSR pointer of ragged codes
    # BatchTopK: the hint was too high and the pre-activations were computed a second time.
    recomputed: bool = False


def iter_pre_chunks(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    *,
    scale: float = 1.0,
    b_dec: Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
):
    """Yield (row0, pre) for row chunks of pre = (scale * x - b_dec) @ W_enc + b_enc (no autograd).
    The chunk's buffer is reused: `pre` is valid until the next chunk is produced."""
    n, d = x.shape
    rows = max(1, min(chunk_rows, n))
    cast = compute_dtype is not None and compute_dtype != W_enc.dtype
    W_c = W_enc.to(compute_dtype) if cast else W_enc
    buf = torch.empty(rows, W_enc.shape[1], dtype=W_enc.dtype, device=x.device)
    # On the CPU the bias rides in the matmul (a ones column on the input, b_enc as an extra row of
    # the weights): addmm would first copy the broadcast bias into every chunk's output, a full
    # extra pass over it (~5% of a 1-thread TopK step). GPUs fuse the bias into the matmul anyway.
    fold = not cast and x.device.type == "cpu"
    with torch.no_grad():
        if fold:
            W_aug = torch.cat([W_enc, b_enc[None]], 0)
            x_aug = torch.empty(rows, d + 1, dtype=W_enc.dtype, device=x.device)
            x_aug[:, d] = 1
        for s in range(0, n, rows):
            e = min(n, s + rows)
            out = buf[: e - s]
            if fold:
                xc = x_aug[: e - s]
                if scale != 1.0:
                    torch.mul(x[s:e], scale, out=xc[:, :d])
                else:
                    xc[:, :d].copy_(x[s:e])
                if b_dec is not None:
                    xc[:, :d].sub_(b_dec)
                torch.mm(xc, W_aug, out=out)
                yield s, out
                continue
            xc = x[s:e]
            if scale != 1.0 or b_dec is not None:
                xc = xc * scale if scale != 1.0 else xc.clone()
                if b_dec is not None:
                    xc.sub_(b_dec)
            if cast:
                out.copy_(torch.mm(xc.to(compute_dtype), W_c)).add_(b_enc)
            else:
                torch.addmm(b_enc, xc, W_enc, out=out)
            yield s, out


@torch.no_grad()
def encode_topk_chunked(
    xc: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    dead_cols: Tensor | None = None,
    k_aux: int = 0,
    compute_dtype: torch.dtype | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    scale: float = 1.0,
    b_dec: Tensor | None = None,
) -> TopKSelection:
    """TopK codes (and AuxK entries among `dead_cols`) of pre = (scale * xc - b_dec) @ W_enc + b_enc
    (by default xc is already xn - b_dec), computing the pre-activations `chunk_rows` rows at a time."""
    n = xc.shape[0]
    values = torch.empty(n, k, dtype=W_enc.dtype, device=xc.device)
    indices = torch.empty(n, k, dtype=torch.long, device=xc.device)
    aux = dead_cols is not None and k_aux > 0
    if aux:
        aux_values = torch.empty(n, k_aux, dtype=W_enc.dtype, device=xc.device)
        aux_indices = torch.empty(n, k_aux, dtype=torch.long, device=xc.device)
    for s, pre in iter_pre_chunks(
        xc, W_enc, b_enc, scale=scale, b_dec=b_dec, compute_dtype=compute_dtype, chunk_rows=chunk_rows
    ):
        e = s + pre.shape[0]
        topk_select(pre, k, values[s:e], indices[s:e])
        if aux:
            aux_values[s:e], aux_indices[s:e] = masked_topk_select(pre, dead_cols, k_aux)
    if aux:
        return TopKSelection(values, indices, aux_values, aux_indices)
    return TopKSelection(values, indices)


@torch.no_grad()
def encode_batch_topk_chunked(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    k: int,
    *,
    dead_cols: Tensor | None = None,
    k_aux: int = 0,
    compute_dtype: torch.dtype | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    scale: float = 1.0,
    b_dec: Tensor | None = None,
    hint: float | None = None,
) -> TopKSelection:
    """BatchTopK codes (CSR: the k n largest positive pre-activations of the batch) and AuxK entries
    of pre = (scale * x - b_dec) @ W_enc + b_enc, in row chunks (`BatchTopKCollector`). `hint`, a
    guess of the (k n)-th largest entry, makes the selection faster when close below it; when it
    proves too high the pre-activations are computed once more without it (`recomputed`)."""
    n, m = x.shape[0], W_enc.shape[1]
    aux = dead_cols is not None and k_aux > 0
    if aux:
        aux_values = torch.empty(n, k_aux, dtype=W_enc.dtype, device=x.device)
        aux_indices = torch.empty(n, k_aux, dtype=torch.long, device=x.device)
    kw = dict(scale=scale, b_dec=b_dec, compute_dtype=compute_dtype, chunk_rows=chunk_rows)
    col = BatchTopKCollector(n, m, k, hint=hint, device=x.device, dtype=W_enc.dtype)
    for s, pre in iter_pre_chunks(x, W_enc, b_enc, **kw):
        col.add(pre, s)
        if aux:
            e = s + pre.shape[0]
            aux_values[s:e], aux_indices[s:e] = masked_topk_select(pre, dead_cols, k_aux)
    out = col.finish()
    recomputed = out is None
    if out is None:
        col = BatchTopKCollector(n, m, k, device=x.device, dtype=W_enc.dtype)
        for s, pre in iter_pre_chunks(x, W_enc, b_enc, **kw):
            col.add(pre, s)
        out = col.finish()
        assert out is not None
    values, indices, offsets = out
    if aux:
        return TopKSelection(values, indices, aux_values, aux_indices, offsets=offsets, recomputed=recomputed)
    return TopKSelection(values, indices, offsets=offsets, recomputed=recomputed)


# ----- the whole sparse step -----------------------------------------------------------------------
def dense_aux_forward(
    E: Tensor, aux_z: Tensor, W_dec: Tensor, dead_cols: Tensor, aux_coef: float, beta: float = 1.0
) -> tuple[Tensor, Tensor]:
    """A dense AuxK block's error A = aux_z @ W_dec[dead] + beta * E (the dead latents' reconstruction
    minus the live residual xn - xn_hat = -beta * E) and its loss aux_coef |A|^2 / n."""
    A = torch.addmm(E, aux_z, W_dec.index_select(0, dead_cols), beta=beta)
    flat = A.reshape(-1)
    return A, torch.nan_to_num(torch.dot(flat, flat).mul_(aux_coef / max(1, E.shape[0])))


def dense_aux_backward(
    A: Tensor | None, g_aux: Tensor | None, aux_coef: float, W_dec: Tensor, dead_cols: Tensor, aux_z: Tensor
) -> tuple[Tensor | None, Tensor | None]:
    """Backward of `dense_aux_forward` (A is overwritten): dA = 2 coef g / n * A; returns the gradient
    of the block's values, dA W_dec[dead]^T where z > 0, and the block's share of grad W_dec[dead],
    z^T dA ((None, None) without an AuxK block or gradient). Callers run it first in their backward
    (`take_dense_aux_grads`) and add the encoder's share: colsum into grad b_enc's buffer (gb) and
    scale * x^T grad_z into grad W_enc's dead columns (`encoder_grads`)."""
    if A is None or g_aux is None:
        return None, None
    A.mul_(g_aux * (2 * aux_coef / max(1, A.shape[0])))
    W_dead = W_dec.index_select(0, dead_cols)
    grad_w_dead = aux_z.t() @ A
    grad_z = (A @ W_dead.t()).mul_(aux_z > 0)
    return grad_z, grad_w_dead


def take_dense_aux_grads(
    ctx, g_aux: Tensor | None, W_dec: Tensor, dead_cols: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """`dense_aux_backward` of the block a fused step's forward left on ctx (`dense_A`, `aux_z`),
    releasing both: the steps call it first in their backward, so the block's (n, d) error and
    (n, n_dead) codes are gone before any (n_latents, d) gradient exists (peak memory)."""
    grads = dense_aux_backward(ctx.dense_A, g_aux, ctx.aux_coef, W_dec, dead_cols, ctx.aux_z)
    ctx.dense_A = ctx.aux_z = None
    return grads


class _SparseTopKStep(torch.autograd.Function):
    """Decoder, reconstruction loss and AuxK loss of selected codes, with one sparse backward for all
    four parameters. Entries are CSR over bags: bag r < n is token r's code, bag n + r its AuxK code.

    Forward (normalised units xn = scale * x): out = embedding_bag(entries, W_dec) (bags, d);
    x_hat = (out[:n] + b_dec) / scale; D = x_hat - x (raw units, kept in out[:n]); mse = scale^2 |D|^2 / n;
    AuxK: A = out[n:] + scale * D (the dead latents' reconstruction minus the live residual
    xn - xn_hat = -scale * D), auxk = coef |A|^2 / n. Only `out` and `x_hat` are (n, d)-sized.

    Backward: G = d loss / d out (in place in `out`); grad W_dec = segment sum over latents of
    value * G[bag]; grad value = G[bag] . W_dec[latent], passed where the value is > 0 (ReLU) as g;
    grad b_enc = colsum g; grad W_enc[:, j] = sum over j's entries of g * xc[token] with
    xc = scale * x - b_dec, i.e. scale * (segment sum of g * x) - b_dec (x) grad b_enc, written block
    by block in W_enc's own (d_in, n_latents) layout; grad b_dec = colsum G[:n] - W_enc grad b_enc."""

    @staticmethod
    def forward(ctx, W_enc, b_enc, W_dec, b_dec, x, scale, cols, vals, bag_offsets, aux_coef, dead_cols, aux_z):  # type: ignore[override]
        n = x.shape[0]
        n_bags = bag_offsets.numel() - 1
        # W_dec.detach(): embedding_bag of a weight that requires grad also builds what its own backward
        # would need (bag ids, sizes), ~15% of the call; this function has its own backward.
        out = F.embedding_bag(
            cols, W_dec.detach(), bag_offsets, mode="sum", per_sample_weights=vals, include_last_offset=True
        )
        x_hat = out[:n].add(b_dec)
        if scale != 1.0:
            x_hat.div_(scale)
        D = out[:n]
        torch.sub(x_hat, x, out=D)
        flat = D.reshape(-1)
        mse = torch.dot(flat, flat).mul_(scale * scale / max(1, n))
        ctx.dense_A = None
        if aux_z is not None:  # AuxK as a dense block over the dead latents' columns
            ctx.dense_A, aux = dense_aux_forward(D, aux_z, W_dec, dead_cols, aux_coef, scale)
        elif n_bags > n:
            A = out[n:]
            A.add_(D, alpha=scale)
            flat = A.reshape(-1)
            aux = torch.nan_to_num(torch.dot(flat, flat).mul_(aux_coef / max(1, n)))
        else:
            aux = torch.zeros((), dtype=out.dtype, device=out.device)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(W_enc, W_dec, b_dec, x, cols, vals, bag_offsets, dead_cols)
        ctx.out = out  # not saved: the backward overwrites it in place and frees it early
        ctx.aux_z = aux_z  # (no autograd history) likewise freed as soon as the backward is done with it
        ctx.scale, ctx.aux_coef = scale, aux_coef
        return x_hat, mse, aux

    @staticmethod
    def backward(ctx, g_xhat, g_mse, g_aux):  # type: ignore[override]
        G = ctx.out
        if G is None:
            raise RuntimeError("the sparse TopK step cannot be backpropagated twice (retain_graph is not supported)")
        ctx.out = None
        W_enc, W_dec, b_dec, x, cols, vals, bag_offsets, dead_cols = ctx.saved_tensors
        grad_z, grad_wd_dead = take_dense_aux_grads(ctx, g_aux, W_dec, dead_cols)
        need_we, need_be, need_wd, need_bd = ctx.needs_input_grad[:4]
        n, d = x.shape
        m = W_dec.shape[0]
        n_bags = bag_offsets.numel() - 1
        s = ctx.scale
        Gm = G[:n]
        if g_mse is None:
            Gm.zero_()
        else:
            Gm.mul_(g_mse * (2 * s / max(1, n)))
        if g_xhat is not None:
            Gm.add_(g_xhat, alpha=1 / s)
        if n_bags > n:
            if g_aux is None:
                G[n:].zero_()
            else:
                G[n:].mul_(g_aux * (2 * ctx.aux_coef / max(1, n)))
        grad_we = grad_be = grad_wd = grad_bd = None
        if need_bd:
            grad_bd = Gm.sum(0)
        del Gm
        bags = torch.arange(n_bags, device=cols.device).repeat_interleave(bag_offsets.diff(), output_size=cols.numel())
        order, ptr = _group_by_latent(cols, m)
        bags_sorted = bags.index_select(0, order)
        if need_wd:
            grad_wd = F.embedding_bag(
                bags_sorted,
                G,
                ptr,
                mode="sum",
                per_sample_weights=vals.index_select(0, order),
                include_last_offset=True,
            )
            if grad_wd_dead is not None:
                grad_wd.index_add_(0, dead_cols, grad_wd_dead)
        del grad_wd_dead
        if not (need_we or need_be or need_bd):
            return None, None, grad_wd, grad_bd, *([None] * 8)
        g = torch.ops.aten._embedding_bag_per_sample_weights_backward(G, W_dec, cols, bag_offsets[:-1], bags, 0, -1)
        del G, bags
        g.mul_(vals > 0)  # ReLU: no gradient where the value was clipped to 0
        g_sorted = g.index_select(0, order)
        del g
        grad_we, grad_be = encoder_grads(
            W_enc,
            x,
            s,
            b_dec,
            cols.index_select(0, order),
            g_sorted,
            bags_sorted,
            ptr,
            n,
            grad_bd,
            need_we,
            need_be,
            grad_z,
            dead_cols,
        )
        return grad_we, grad_be, grad_wd, grad_bd, *([None] * 8)


def encoder_grads(
    W_enc: Tensor,
    x: Tensor,
    scale: float,
    b_dec: Tensor,
    cols: Tensor,
    g: Tensor,
    bags: Tensor,
    ptr: Tensor,
    n: int,
    grad_bd: Tensor | None,
    need_we: bool,
    need_be: bool,
    grad_z: Tensor | None = None,
    dead_cols: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """(grad W_enc, grad b_enc) from the gradients g of the selected pre-activations, entries sorted
    by latent (cols, bags with CSR pointer ptr; bags >= n are AuxK bags of token bag - n), plus a dense
    AuxK block's value gradients grad_z over `dead_cols`; grad_bd gets the encoder's share,
    -W_enc colsum, in place. grad W_enc[:, j] = sum of g * (scale * x[token] - b_dec)."""
    gb = torch.zeros(W_enc.shape[1], dtype=W_enc.dtype, device=W_enc.device).index_add_(0, cols, g)
    if grad_z is not None:
        gb.index_add_(0, dead_cols, grad_z.sum(0))
    if grad_bd is not None:
        grad_bd.addmv_(W_enc, gb, alpha=-1)
    grad_we = None
    if need_we:
        bags.remainder_(n)  # AuxK bags n + r read token r
        grad_we = _segment_sum_transposed(bags, g, x, ptr, scale, b_dec, gb)
        if grad_z is not None:  # the b_dec part is in gb already
            grad_we.index_add_(1, dead_cols, (x.t() @ grad_z).mul_(scale))
    return grad_we, (gb if need_be else None)


# Latents per block of the grad-W_enc segment sum (its (block, d_in) result is transposed in cache).
_WENC_BLOCK = 256


def _segment_sum_transposed(
    rows: Tensor, weights: Tensor, table: Tensor, ptr: Tensor, scale: float, b_dec: Tensor, colsum: Tensor
) -> Tensor:
    """(d, m) matrix whose column j is scale * sum_{e in latent j} weights[e] * table[rows[e]]
    - b_dec * colsum[j], for entries sorted by latent with CSR pointer `ptr`, built block by block
    (no (m, d) intermediate)."""
    m, d = ptr.numel() - 1, table.shape[1]
    weights = weights.to(table.dtype)
    if table.device.type != "cpu":
        # On a GPU the cache-sized blocks would only multiply kernel launches (and their bounds
        # need a host sync).
        return _segment_sum_transposed_whole(rows, weights, table, ptr, scale, b_dec, colsum)
    out = torch.empty(d, m, dtype=table.dtype, device=table.device)
    bounds = ptr[::_WENC_BLOCK].tolist() + ([int(ptr[-1])] if m % _WENC_BLOCK else [])
    _fill_transposed_blocks(out, rows, weights, table, ptr, bounds, scale, b_dec, colsum)
    return out


def _segment_sum_transposed_whole(rows, weights, table, ptr, scale, b_dec, colsum) -> Tensor:
    """`_segment_sum_transposed` as one segment sum, then transposed (what a GPU runs)."""
    part = F.embedding_bag(rows, table, ptr, mode="sum", per_sample_weights=weights, include_last_offset=True)
    out = torch.empty(table.shape[1], ptr.numel() - 1, dtype=table.dtype, device=table.device)
    return torch.addr(part.t(), b_dec, colsum, beta=scale, alpha=-1, out=out)


def _fill_transposed_blocks(out, rows, weights, table, ptr, bounds, scale, b_dec, colsum) -> None:
    m = out.shape[1]
    for blk, j0 in enumerate(range(0, m, _WENC_BLOCK)):
        j1 = min(m, j0 + _WENC_BLOCK)
        p0, p1 = bounds[blk], bounds[blk + 1]
        part = F.embedding_bag(
            rows[p0:p1],
            table,
            ptr[j0 : j1 + 1] - p0,
            mode="sum",
            per_sample_weights=weights[p0:p1],
            include_last_offset=True,
        )
        # scale * part^T - b_dec (x) colsum, written into the block's columns in one pass
        torch.addr(part.t(), b_dec, colsum[j0:j1], beta=scale, alpha=-1, out=out[:, j0:j1])


def _selection_entries(sel: TopKSelection) -> tuple[Tensor, Tensor, Tensor]:
    """CSR (cols, vals, bag_offsets) of a selection's codes (bags 0..n-1) and, if any, its AuxK
    entries with a value > 0 (bags n..2n-1; the others contribute nothing)."""
    if sel.offsets is None:
        n, k = sel.indices.shape
        cols, vals = sel.indices.reshape(-1), sel.values.reshape(-1)
        offsets = torch.arange(0, n * k + 1, max(1, k), device=cols.device)[: n + 1]
    else:
        cols, vals, offsets = sel.indices, sel.values, sel.offsets
    if sel.aux_values is None:
        return cols, vals, offsets
    live = sel.aux_values > 0
    aux_off = torch.zeros(live.shape[0], dtype=torch.long, device=cols.device)
    torch.cumsum(live.sum(1), 0, out=aux_off)
    return (
        torch.cat([cols, sel.aux_indices[live]]),
        torch.cat([vals, sel.aux_values[live]]),
        torch.cat([offsets, aux_off.add_(cols.numel())]),
    )


@torch.no_grad()
def dense_aux_codes(
    x: Tensor, scale: float, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, dead_cols: Tensor, k_aux: int
) -> Tensor:
    """The AuxK codes as a dense (n, n_dead) block over the dead latents' columns: their
    pre-activations (scale * x - b_dec) @ W_enc[:, dead] + b_enc[dead], the k_aux largest of each
    row kept (ReLU'd), the rest 0 (no autograd)."""
    pre = torch.addmm(b_enc.index_select(0, dead_cols), x * scale - b_dec, W_enc.index_select(1, dead_cols))
    values, pos = pre.topk(k_aux, dim=1, sorted=False)
    return torch.zeros_like(pre).scatter_(1, pos, values.relu_())


def sparse_topk_step(
    x: Tensor,
    scale: float,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    sel: TopKSelection,
    aux_coef: float = 0.0,
    dense_aux: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(x_hat in raw units, mse, auxk or None) of the codes selected from x (raw, (n, d)) with
    xn = scale * x: mse = |xn_hat - xn|^2 summed over dimensions, averaged over tokens; auxk as
    `topk.auxk_term` (aux_coef times the AuxK reconstruction error of the live residual), from the
    selection's sparse AuxK entries or from `dense_aux` = (dead latent ids, `dense_aux_codes`). Both
    backpropagate to W_enc, b_enc, W_dec and b_dec through the selected entries only
    (`_SparseTopKStep`)."""
    cols, vals, offsets = _selection_entries(sel)
    dead_cols, aux_z = dense_aux if dense_aux is not None else (None, None)
    x_hat, mse, aux = _SparseTopKStep.apply(
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        x,
        float(scale),
        cols,
        vals.to(W_dec.dtype),
        offsets,
        float(aux_coef),
        dead_cols,
        aux_z,
    )
    return x_hat, mse, (aux if sel.aux_values is not None or dense_aux is not None else None)


@torch.no_grad()
def remove_parallel_component_(g: Tensor, w: Tensor, block_rows: int = 512) -> None:
    """g[i] -= (g[i] . w[i]) w[i] in place, in row blocks on the CPU (no (m, d) temporaries; a GPU
    takes all rows in one go)."""
    if g.device.type != "cpu":
        block_rows = max(1, g.shape[0])
    for s in range(0, g.shape[0], block_rows):
        gb, wb = g[s : s + block_rows], w[s : s + block_rows]
        gb.addcmul_((gb * wb).sum(-1, keepdim=True), wb, value=-1)
