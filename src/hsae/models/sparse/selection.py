"""Selection without autograd: which (token, latent) entries a TopK-style code keeps.

- `topk_select` (per-token top k), `masked_topk_select` (top k among given columns, AuxK's dead
  latents), `batch_topk_select` (the batch-wide top k * n, BatchTopK).
- `BatchTopKCollector` selects the batch-wide top k * n from row chunks of pre-activations, keeping
  only candidates above a running lower bound (and an optional hint, verified), exactly.
- `encode_topk_chunked` / `encode_batch_topk_chunked`: pre-activations, TopK or BatchTopK and AuxK
  selection in row chunks (`iter_pre_chunks`), so the full (n, n_latents) pre-activation tensor
  never exists while training and each chunk stays in cache while it is selected from.

On the CPU the per-row top-k and the candidate filter run compiled (hsae.models.sparse.cpu_select,
numba); tests/test_kernels.py checks every selection against torch.topk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hsae.models.sparse import cpu_select
from hsae.models.sparse.ops import ids_dtype_for

# Rows of pre-activations handled at once by `encode_topk_chunked` (memory: chunk x n_latents floats).
# Every op runs with all intra-op threads: 512 rows keep the per-chunk selection ops (top-k, gather,
# block maxima) large enough for that to pay on 2 threads (256 rows: ~5% slower there), while the
# 12 MiB chunk stays below the step's backward peak (1024 rows raise the peak memory).
DEFAULT_CHUNK_ROWS = 512


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
    `hsae.models.sparse.cpu_select` (numba; `compiled=False` or HSAE_NUMBA=0 switch it off), else by a
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


# Rows per block of `masked_topk_into` (its (rows, len(cols)) gather and top-k temporaries stay small).
_MASKED_ROWS = 64


@torch.no_grad()
def masked_topk_into(pre: Tensor, cols: Tensor, k: int, values: Tensor, indices: Tensor) -> None:
    """`masked_topk_select` written into `values` / `indices` ((n, k); latent ids in indices' dtype),
    `_MASKED_ROWS` rows at a time (each row's selection is the same; the temporaries stay small).
    `cols` may be int16 (widened here once: index_select takes int32 or int64 ids)."""
    wide = cols.int() if cols.dtype == torch.int16 else cols
    for r0 in range(0, pre.shape[0], _MASKED_ROWS):
        r1 = min(pre.shape[0], r0 + _MASKED_ROWS)
        values[r0:r1], indices[r0:r1] = masked_topk_select(pre[r0:r1], wide, k)


def _block_maxima(pre: Tensor, min_blocks: int) -> Tensor:
    """Maxima of disjoint groups of entries of each row (strided groups, a fast reduction), with at
    least `min_blocks` groups per row. Any of them is an entry of its row."""
    n, m = pre.shape
    for size in (16, 8, 4, 2):
        if m % size == 0 and m // size >= min_blocks:
            return pre.view(n, size, m // size).amax(1)
    return pre


def _entries_at_least(pre: Tensor, thr: float, pos_dtype: torch.dtype = torch.long) -> tuple[Tensor, Tensor]:
    """(flat row-major positions in `pos_dtype`, values) of the entries of `pre` (c, m) that are > 0
    and >= thr, in no particular order. Looks at the strided blocks whose maximum passes first, so
    that only a small part of the chunk is compared entry by entry when the threshold is high."""
    c, m = pre.shape
    size = next((s for s in (16, 8, 4) if m % s == 0 and m // s >= 2), 0)
    if size and cpu_select.enabled() and pre.device.type == "cpu" and pre.dtype in (torch.float32, torch.float64):
        try:
            return cpu_select.entries_at_least(pre.detach().contiguous(), thr, size, pos_dtype)  # compiled
        except cpu_select.CompileError as err:  # go on with the torch ops below
            cpu_select.disable(err)
    pos, vals = _entries_at_least_torch(pre, thr, size)
    return pos.to(pos_dtype), vals


def _entries_at_least_torch(pre: Tensor, thr: float, size: int) -> tuple[Tensor, Tensor]:
    """`_entries_at_least` in torch ops (int64 positions)."""
    c, m = pre.shape

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
        # candidate positions in int32 where the batch's flat positions fit (a third less memory)
        self.pos_dtype = ids_dtype_for(n * m)
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
        pos, vals = _entries_at_least(pre, self.threshold(), self.pos_dtype)
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
                torch.empty(0, dtype=self.pos_dtype, device=self.device),
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
        # The positions are int32 where they fit (pos_dtype): such keys sort about twice as fast as
        # int64 ones on CPU.
        pos, order = pos.sort()
        pos = pos.long()
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
def exact_values(xc: Tensor, W_enc_t: Tensor, b_enc: Tensor, indices: Tensor) -> Tensor:
    """ReLU'd pre-activations xc[r] . W_enc[:, j] + b_enc[j] at the selected entries (r, indices[r, i])
    only, in the weights' dtype: k dot products per row (W_enc_t is W_enc transposed, contiguous)."""
    rows = W_enc_t.index_select(0, indices.reshape(-1)).view(*indices.shape, -1)  # (c, k, d)
    values = torch.bmm(rows, xc.to(W_enc_t.dtype).unsqueeze(2)).squeeze(2)
    return values.add_(b_enc[indices]).relu_()


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
    (by default xc is already xn - b_dec), computing the pre-activations `chunk_rows` rows at a time.
    With a `compute_dtype` other than the weights' (bf16), that matmul only *chooses* the entries:
    their values are then computed exactly in the weights' dtype (`exact_values`), so codes, losses
    and gradients are those of the full-precision model at the chosen entries."""
    n = xc.shape[0]
    screened = compute_dtype is not None and compute_dtype != W_enc.dtype
    W_enc_t = W_enc.t().contiguous() if screened else W_enc
    values = torch.empty(n, k, dtype=W_enc.dtype, device=xc.device)
    indices = torch.empty(n, k, dtype=torch.long, device=xc.device)
    aux = dead_cols is not None and k_aux > 0
    if aux:
        aux_values = torch.empty(n, k_aux, dtype=W_enc.dtype, device=xc.device)
        aux_indices = torch.empty(n, k_aux, dtype=dead_cols.dtype, device=xc.device)  # type: ignore[union-attr]
    for s, pre in iter_pre_chunks(
        xc, W_enc, b_enc, scale=scale, b_dec=b_dec, compute_dtype=compute_dtype, chunk_rows=chunk_rows
    ):
        e = s + pre.shape[0]
        topk_select(pre, k, values[s:e], indices[s:e])
        if dead_cols is not None and aux:
            masked_topk_into(pre, dead_cols, k_aux, aux_values[s:e], aux_indices[s:e])
        if screened:
            rows = xc[s:e] * scale if scale != 1.0 else xc[s:e]
            rows = rows - b_dec if b_dec is not None else rows
            values[s:e] = exact_values(rows, W_enc_t, b_enc, indices[s:e])
            if dead_cols is not None and aux:
                aux_values[s:e] = exact_values(rows, W_enc_t, b_enc, aux_indices[s:e])
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
        aux_indices = torch.empty(n, k_aux, dtype=dead_cols.dtype, device=x.device)  # type: ignore[union-attr]
    kw: dict[str, Any] = dict(scale=scale, b_dec=b_dec, compute_dtype=compute_dtype, chunk_rows=chunk_rows)
    col = BatchTopKCollector(n, m, k, hint=hint, device=x.device, dtype=W_enc.dtype)
    for s, pre in iter_pre_chunks(x, W_enc, b_enc, **kw):
        col.add(pre, s)
        if dead_cols is not None and aux:
            e = s + pre.shape[0]
            masked_topk_into(pre, dead_cols, k_aux, aux_values[s:e], aux_indices[s:e])
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
