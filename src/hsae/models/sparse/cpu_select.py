"""Exact per-row top-k of pre-activations on the CPU, compiled with numba.

After the encoder matmul, choosing each token's k largest pre-activations was the largest remaining
cost of a TopK training step on a CPU (about a sixth of it): `torch.topk`, even in the two-stage form
of `selection.topk_select`, runs a branchy per-row partial sort. This kernel does the same exact
selection with almost no sorting, one row at a time while the row is in cache:

1. block maxima: the row's m entries in `size` strided blocks (entry i * nb + j is in block j, nb =
   m / size), a vectorised max;
2. a lower bound t of the row's k-th largest entry, raised cheaply: the minimum of the maxima of k
   disjoint groups of blocks is one (k distinct entries are >= it), and any t with at least k block
   maxima >= t is one too, so t is raised by bisection between that minimum and the largest block
   maximum, keeping at least k block maxima >= t, until at most k + k / 8 are;
3. candidates: the entries >= t, read only from the blocks whose maximum is >= t (every top-k entry
   is >= t, so it is among them; there are k of them or a few more);
4. the exact top k among the candidates by rank counting (branch-free compares; ties broken by
   candidate order), ReLU'd.

`python benchmarks/topk_select.py --threads 1|2` (a 512 x 6144 chunk, k = 32): 2.0 ms against 4.4 ms
for the two-stage torch ops and 7.0 ms for torch.topk on one thread (1.0 / 2.4 / 3.6 ms on two); a
TopK training step (benchmarks/train_speed.py) takes about 14% longer without it (193 vs 169 ms on
one thread, 102 vs 90 ms on two). `entries_at_least` is BatchTopK's candidate filter (the entries above a
threshold, reading only the blocks whose maximum passes), compiled the same way.

Rows the kernel cannot settle cheaply (NaNs, or more than `MAX_CANDIDATES_PER_K` * k candidates, e.g. a
row of equal values) are flagged and re-selected with `torch.topk`, so the result is always exact.
The kernels are used by `selection.topk_select` and `selection.BatchTopKCollector` when numba imports (it
is a dependency of hsae), `HSAE_NUMBA=0` is not set and the process is not a forked child (GNU OpenMP
cannot start threads in a child of a process that used them); they compile once per machine (a few
seconds, cached on disk).
tests/test_kernels.py checks them against `torch.topk` and the torch ops, with ties, NaNs, infinities,
negative rows and both float dtypes.
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np
import torch
from torch import Tensor

try:  # numba is a dependency; keep hsae usable (on the torch path) where it cannot be imported
    import numba
    from numba import njit, prange

    NUMBA_IMPORTED = True
except Exception:  # pragma: no cover - depends on the environment
    NUMBA_IMPORTED = False

if NUMBA_IMPORTED and not {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ):
    # Prefer OpenMP: it is the runtime torch runs on, so the kernels share torch's threads instead of
    # starting a second pool that would compete with torch's spinning OpenMP threads (numba's own
    # default tries TBB first). The user's NUMBA_THREADING_LAYER* settings win.
    setattr(numba.config, "THREADING_LAYER_PRIORITY", ["omp", "tbb", "workqueue"])  # noqa: B010 (untyped config)

# Candidates per row above which the row goes to torch.topk (rank counting is quadratic in them).
MAX_CANDIDATES_PER_K = 8
# Rows per parallel work item (scratch buffers are allocated once per item).
_ROWS_PER_ITEM = 16
# Fast-math without "no NaNs / no infinities": comparisons with NaN and inf keep their meaning.
_FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


# Why the kernels were switched off in this process (a compilation failure), or None.
_disabled: str | None = None
# Set in a child made by fork(): GNU OpenMP (numba's threading layer here, and torch's) cannot start
# a thread team in a forked child of a process that used one (the child is killed), so children go
# on with torch ops.
_forked = False
# What a failure to compile or run a kernel raises.
CompileError: type[Exception] = numba.core.errors.NumbaError if NUMBA_IMPORTED else RuntimeError
# One call at a time: numba's fallback "workqueue" threading layer aborts on concurrent use.
_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):  # POSIX only; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def available() -> bool:
    """Whether the kernels can run in this process at all (numba imported, not a forked child)."""
    return NUMBA_IMPORTED and not _forked


def enabled() -> bool:
    """Whether the kernels are used: available, not switched off by HSAE_NUMBA=0, and not failed to
    compile in this process."""
    return available() and _disabled is None and os.environ.get("HSAE_NUMBA", "1") != "0"


def disable(err: Exception) -> None:
    """Switch the kernels off for this process after `err` (callers fall back to torch ops), with
    one warning that says why and what it costs."""
    global _disabled
    _disabled = f"{type(err).__name__}: {err}"
    warnings.warn(
        f"hsae: numba could not compile its CPU top-k kernels ({_disabled}); training goes on with "
        "torch ops, about 14% slower per TopK step. Set HSAE_NUMBA=0 to skip the attempt.",
        stacklevel=3,
    )


if NUMBA_IMPORTED:

    @njit(cache=True, fastmath=_FASTMATH, boundscheck=False, nogil=True)
    def _select_row(row, k, size, bm, blocks, block_max, cand_v, cand_i, out_v, out_i):  # pragma: no cover - compiled
        """Top k of one row into out_v/out_i; returns False when the row must go to torch.topk."""
        m = row.shape[0]
        nb = m // size
        # 1. strided block maxima (a NaN entry makes its block's maximum NaN)
        for j in range(nb):
            bm[j] = row[j]
        for i in range(1, size):
            base = i * nb
            for j in range(nb):
                v = row[base + j]
                bm[j] = v if (v > bm[j]) | (v != v) else bm[j]
        # 2. a lower bound of the k-th largest entry: the smallest of k disjoint group maxima
        g = nb // k
        t = bm[0]
        for q in range(k):
            mx = bm[q * g]
            for j in range(q * g + 1, q * g + g):
                mx = bm[j] if bm[j] > mx else mx
            t = mx if (q == 0 or mx < t) else t
        # the blocks whose maximum reaches it, and their maxima (branch-free compaction)
        c = 0
        hi = t
        nans = 0
        for j in range(nb):
            blocks[c] = j
            block_max[c] = bm[j]
            c += bm[j] >= t
            hi = bm[j] if bm[j] > hi else hi
            nans += bm[j] != bm[j]
        if nans > 0 or t != t:  # torch.topk ranks NaN above everything: leave such rows to it
            return False
        # raise it by bisection while at least k block maxima stay >= it
        count = c
        for _ in range(24):
            if count <= k + k // 8:
                break
            mid = t + 0.5 * (hi - t)
            if not (t < mid < hi):
                break
            cnt = 0
            for q in range(c):
                cnt += block_max[q] >= mid
            if cnt >= k:
                t = mid
                count = cnt
            else:
                hi = mid
        # 3. candidates: the entries >= t of the blocks whose maximum is >= t
        e = 0
        limit = MAX_CANDIDATES_PER_K * k
        for q in range(c):
            j = blocks[q]
            if block_max[q] >= t:
                if e > limit:  # cand_v holds limit + size entries
                    return False
                for i in range(size):
                    pos = i * nb + j
                    v = row[pos]
                    cand_v[e] = v
                    cand_i[e] = pos
                    e += v >= t
        if e < k or e > limit:
            return False
        # 4. the exact top k among them by rank (ties: the earlier candidate ranks higher)
        o = 0
        for a in range(e):
            va = cand_v[a]
            rank = 0
            for b in range(e):
                vb = cand_v[b]
                rank += (vb > va) | ((vb == va) & (b < a))
            if rank < k:
                out_v[o] = va if va > 0 else 0.0
                out_i[o] = cand_i[a]
                o += 1
        return o == k

    @njit(parallel=True, cache=True, fastmath=_FASTMATH, boundscheck=False, nogil=True)
    def _select_rows(pre, k, size, out_v, out_i, failed):  # pragma: no cover - compiled
        n, m = pre.shape
        nb = m // size
        width = MAX_CANDIDATES_PER_K * k + size
        items = (n + _ROWS_PER_ITEM - 1) // _ROWS_PER_ITEM
        for it in prange(items):
            bm = np.empty(nb, pre.dtype)
            blocks = np.empty(nb, np.int64)
            block_max = np.empty(nb, pre.dtype)
            cand_v = np.empty(width, pre.dtype)
            cand_i = np.empty(width, np.int64)
            for r in range(it * _ROWS_PER_ITEM, min(n, (it + 1) * _ROWS_PER_ITEM)):
                failed[r] = not _select_row(pre[r], k, size, bm, blocks, block_max, cand_v, cand_i, out_v[r], out_i[r])

    @njit(cache=True, fastmath=_FASTMATH, boundscheck=False, nogil=True)
    def _row_entries(row, thr, size, bm, pos, vals, start, fill):  # pragma: no cover - compiled
        """Count (fill=False) or write at `start` (fill=True) the row's entries that are > 0 and
        >= thr, reading only the strided blocks whose maximum passes."""
        m = row.shape[0]
        nb = m // size
        if not fill:
            for j in range(nb):
                bm[j] = -np.inf
            for i in range(size):
                base = i * nb
                for j in range(nb):
                    v = row[base + j]
                    bm[j] = v if v > bm[j] else bm[j]  # NaN entries never pass
        e = start
        for j in range(nb):
            if bm[j] >= thr and bm[j] > 0:
                for i in range(size):
                    p = i * nb + j
                    v = row[p]
                    if v >= thr and v > 0:
                        if fill:
                            pos[e] = p
                            vals[e] = v
                        e += 1
        return e - start

    @njit(parallel=True, cache=True, fastmath=_FASTMATH, boundscheck=False, nogil=True)
    def _count_entries(pre, thr, size, bm_all, counts):  # pragma: no cover - compiled
        n = pre.shape[0]
        dummy_i = np.empty(0, np.int64)
        dummy_v = np.empty(0, pre.dtype)
        for r in prange(n):
            counts[r] = _row_entries(pre[r], thr, size, bm_all[r], dummy_i, dummy_v, 0, False)

    @njit(parallel=True, cache=True, fastmath=_FASTMATH, boundscheck=False, nogil=True)
    def _fill_entries(pre, thr, size, bm_all, starts, pos, vals):  # pragma: no cover - compiled
        n, m = pre.shape
        for r in prange(n):
            e = _row_entries(pre[r], thr, size, bm_all[r], pos, vals, starts[r], True)
            for q in range(starts[r], starts[r] + e):
                pos[q] += r * m

    @njit(cache=True, boundscheck=False, nogil=True)
    def _scatter_by_latent(cols, vals, bag_offsets, cursor, bags_out, vals_out):  # pragma: no cover - compiled
        """Stable counting sort of CSR entries by latent: entry e of bag b goes to cursor[cols[e]]
        (cursor starts at each latent's CSR start and moves on), with its bag and value."""
        for b in range(bag_offsets.shape[0] - 1):
            for e in range(bag_offsets[b], bag_offsets[b + 1]):
                c = cols[e]
                p = cursor[c]
                cursor[c] = p + 1
                bags_out[p] = b
                vals_out[p] = vals[e]


def entries_at_least(pre: Tensor, thr: float, size: int, pos_dtype: torch.dtype = torch.long) -> tuple[Tensor, Tensor]:
    """(flat row-major positions in `pos_dtype`, values) of the entries of `pre` (n, m) that are > 0
    and >= thr, rows in order (a contiguous float32/float64 CPU tensor, m % size == 0): what the
    candidate filter of `selection.BatchTopKCollector` computes, in two compiled passes (count per
    row, then fill)."""
    n, m = pre.shape
    dtype = pre.numpy().dtype
    thr = dtype.type(thr)  # compared in the tensor's dtype, as torch compares with a Python scalar
    bm = np.empty((n, m // size), dtype=dtype)
    counts = np.empty(n, dtype=np.int64)
    with _torch_threads():
        _count_entries(pre.numpy(), thr, size, bm, counts)
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        total = int(counts.sum())
        pos = torch.empty(total, dtype=pos_dtype)
        vals = torch.empty(total, dtype=pre.dtype)
        _fill_entries(pre.numpy(), thr, size, bm, starts, pos.numpy(), vals.numpy())
    return pos, vals


class _torch_threads:
    """Run compiled parallel loops one call at a time (`_lock`) on torch's intra-op thread count, and
    leave that count unchanged: numba's
    OpenMP layer shares torch's OpenMP runtime (one thread team, no oversubscription), but starting
    it sets the runtime's thread count to numba's default."""

    def __enter__(self):
        _lock.acquire()
        self.threads = torch.get_num_threads()
        want = min(self.threads, numba.config.NUMBA_NUM_THREADS)
        if numba.get_num_threads() != want:
            numba.set_num_threads(want)

    def __exit__(self, *exc):
        try:
            if torch.get_num_threads() != self.threads:
                torch.set_num_threads(self.threads)
        finally:
            _lock.release()


def select_topk(
    pre: Tensor, k: int, size: int, values: Tensor | None = None, indices: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(values ReLU'd, indices) of the k largest entries of each row of `pre` (n, m), a contiguous
    float32/float64 CPU tensor with m % size == 0 and m // size >= 2 k, in no particular order
    (written into `values`/`indices` when given, contiguous (n, k) tensors). Exact: equal to
    `pre.topk(k)` up to which of equal values is picked."""
    n, m = pre.shape
    if values is None:
        values = torch.empty(n, k, dtype=pre.dtype)
    if indices is None:
        indices = torch.empty(n, k, dtype=torch.long)
    failed = torch.zeros(n, dtype=torch.bool)
    with _torch_threads():
        _select_rows(pre.numpy(), k, size, values.numpy(), indices.numpy(), failed.numpy())
    if failed.any():
        rows = failed.nonzero().squeeze(1)
        v, i = pre.index_select(0, rows).topk(k, dim=-1, sorted=False)
        values[rows], indices[rows] = v.relu_(), i
    return values, indices


def scatter_by_latent(
    cols: Tensor, vals: Tensor, bag_offsets: Tensor, ptr: Tensor, bag_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """(bags, values) of CSR entries (cols, vals over bags `bag_offsets`; CPU, contiguous) in latent
    order, the entries of a latent in their original order (what a stable sort by latent gives),
    `ptr` the (n_latents + 1,) CSR pointer of the latents: one pass, no permutation array. Bags come
    in `bag_dtype` (default ptr's dtype)."""
    cursor = ptr[:-1].numpy().astype(np.int64)
    bags_out = torch.empty(cols.numel(), dtype=ptr.dtype if bag_dtype is None else bag_dtype)
    vals_out = torch.empty_like(vals)
    with _lock:
        _scatter_by_latent(cols.numpy(), vals.numpy(), bag_offsets.numpy(), cursor, bags_out.numpy(), vals_out.numpy())
    return bags_out, vals_out
