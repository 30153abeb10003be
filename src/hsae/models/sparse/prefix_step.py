"""The sparse Matryoshka training step: nested-prefix reconstruction losses through the active
latents only, in one autograd function.

Latents are split into groups [b_0, b_1), [b_1, b_2), ... by `bounds`. With R_g the reconstruction of
group g's active entries (normalised units) and E_i = b_dec + R_0 + ... + R_i - xn the error of
prefix i, the losses are

    mse = |E_last|^2 / n,   prefix_mse = sum_{i < last} |E_i|^2 / n,   auxk as in the TopK step.

Forward: the code entries are put in group-major order once (a stable sort by group keeps rows in
order inside a group), each group is decoded with one `embedding_bag` and added to the running error
E, whose squared norm is that prefix's loss. Only E, the reconstruction and the AuxK buffer are
(n, d)-sized; the per-group reconstructions are not kept.

Backward: d loss / d R_g = sum_{i >= g} w_i 2 E_i / n (w_i the incoming gradient of the loss that
holds prefix i), a suffix sum, so the groups are walked from the last to the first, accumulating S
and recovering E_{g-1} = E_g - R_g by decoding group g again (one more sparse decode in all). The
codes are sorted by latent once; because a group is a contiguous range of latents, group g's entries
are a contiguous slice of that order, so its rows of grad W_dec (a segment sum) and its entries'
value gradients (sampled dot products) are taken against the current S in one slice. Sparse AuxK
entries, sorted by latent apart from the codes, are done first, against their own error A, which is
then freed: A, E, S and grad W_dec are never live together (peak memory with many dead latents,
issue 18). They give grad W_dec its AuxK rows, to which the walk adds the codes' (a latent with
both gets the sum of two segment sums: one sum over all its entries up to float rounding), and
their value gradients, summed into grad b_enc after the codes' (entry order, as one pass). AuxK over
few dead latents comes instead as a dense block over their columns
(`topk_step.dense_aux_forward/backward`, as the TopK step). The encoder gradients then follow as in
the TopK step (`topk_step.encoder_grads`: grad W_enc block by block in its own layout, from the raw
batch, the AuxK entries as a second entry set).

tests/test_prefix_step.py checks losses and all gradients against the dense formulation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hsae.models.sparse.ops import (
    csr_blocks,
    ids_dtype_for,
    latent_sums_,
    segment_sum_into,
    small_ids_dtype_for,
    sort_entries_by_latent,
    value_grads_,
)
from hsae.models.sparse.selection import TopKSelection
from hsae.models.sparse.topk_step import (
    aux_entries,
    code_entries,
    dense_aux_forward,
    encoder_grads,
    take_dense_aux_grads,
)


def _bag(cols: Tensor, vals: Tensor, W_dec: Tensor, offsets: Tensor, p0: int) -> Tensor:
    """Rows of sum_e vals[e] * W_dec[cols[e]] for the CSR bags `offsets` over entries starting at p0
    (ids narrower than offsets, the int16 AuxK ids, widened: embedding_bag takes one dtype)."""
    # detached: the caller has its own backward, and embedding_bag of a weight that requires grad
    # also builds what autograd would need
    return F.embedding_bag(
        cols.to(offsets.dtype), W_dec.detach(), offsets - p0, mode="sum", per_sample_weights=vals,
        include_last_offset=True,
    )  # fmt: skip


# Rows decoded at once when a group's reconstruction is added to the running error: the temporary
# stays small instead of (n, d) (peak memory of the backward, where E, S and grad W_dec are live).
ADD_ROWS = 512


def _add_group_(E: Tensor, cols: Tensor, vals: Tensor, W_dec: Tensor, offsets: Tensor, alpha: float | None) -> None:
    """E += alpha * (decoded bags) (alpha None: E = decoded bags), bags given by the CSR pointer
    `offsets` (n + 1,) into cols/vals, in row blocks."""
    n = E.shape[0]
    if E.device.type != "cpu" or n <= ADD_ROWS:
        p0 = int(offsets[0])
        part = _bag(cols[p0 : int(offsets[-1])], vals[p0 : int(offsets[-1])], W_dec, offsets, p0)
        E.copy_(part) if alpha is None else E.add_(part, alpha=alpha)
        return
    for r0, r1, p0, p1 in csr_blocks(offsets, 0, n, ADD_ROWS):
        if alpha is None:
            E[r0:r1] = _bag(cols[p0:p1], vals[p0:p1], W_dec, offsets[r0 : r1 + 1], p0)
        elif p1 > p0:
            E[r0:r1].add_(_bag(cols[p0:p1], vals[p0:p1], W_dec, offsets[r0 : r1 + 1], p0), alpha=alpha)


# Latents per block when a group's rows of grad W_dec are written: the segment sum's (block, d)
# result is a small temporary instead of one as large as the group (the loop is the step's peak).
WDEC_BLOCK = 128


class _SparsePrefixStep(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        x,
        scale,
        cols,
        vals,
        offsets,
        aux_cols,
        aux_vals,
        aux_offsets,
        bounds,
        aux_coef,
        dead_cols,
        aux_z,
    ):
        n, d = x.shape
        m = W_dec.shape[0]
        n_groups = len(bounds) - 1
        device = x.device
        n_code = cols.numel()
        # Group-major order of the codes (rows stay in order within a group): offsets int32 where they
        # fit; with sparse AuxK entries (the step's peak memory) latent ids int16 where they fit on the
        # CPU (`_bag` widens them block by block).
        offsets_dtype = ids_dtype_for(max(n_code, m))
        id_dtype = offsets_dtype if aux_cols is None else small_ids_dtype_for(m, device, offsets_dtype)
        rows = torch.arange(n, device=device).repeat_interleave(offsets.diff(), output_size=n_code)
        inner = torch.tensor(bounds[1:-1], dtype=cols.dtype, device=device)
        gid = torch.bucketize(cols, inner, right=True)
        perm = torch.sort(gid.to(torch.int32), stable=True).indices
        group_cols, group_vals = cols.to(id_dtype).index_select(0, perm), vals.index_select(0, perm)
        goff = torch.zeros(n_groups * n + 1, dtype=offsets_dtype, device=device)  # embedding_bag: ids' dtype
        torch.cumsum(torch.bincount(gid * n + rows, minlength=n_groups * n), 0, out=goff[1:])
        del rows, gid, perm
        starts = goff[::n].tolist()  # entry position where each group begins (and the end)

        E = torch.mul(x, -scale).add_(b_dec)  # the error of the empty prefix: b_dec - xn
        losses = []
        for g in range(n_groups):
            if starts[g + 1] > starts[g]:
                _add_group_(E, group_cols, group_vals, W_dec, goff[g * n : (g + 1) * n + 1], 1.0)
            flat = E.reshape(-1)
            losses.append(torch.dot(flat, flat) / max(1, n))
        mse = losses[-1]
        prefix = torch.stack(losses[:-1]).sum() if n_groups > 1 else torch.zeros((), dtype=E.dtype, device=device)
        x_hat = torch.add(x, E, alpha=1 / scale)

        ctx.dense_A = ctx.A = None
        if aux_z is not None:  # AuxK as a dense block over the dead latents' columns
            ctx.dense_A, aux = dense_aux_forward(E, aux_z, W_dec, dead_cols, aux_coef)
        elif aux_cols is not None:
            # The AuxK error in a buffer of its own: the backward is done with it before its loop over
            # the groups (peak memory).
            A = torch.empty_like(E)
            _add_group_(A, aux_cols, aux_vals, W_dec, aux_offsets, None)  # in row blocks (no (n, d) temporary)
            A.add_(E)  # the dead latents' reconstruction minus the live residual xn - xn_hat = -E
            flat = A.reshape(-1)
            aux = torch.nan_to_num(torch.dot(flat, flat).mul_(aux_coef / max(1, n)))
            ctx.A = A
        else:
            aux = torch.zeros((), dtype=E.dtype, device=device)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(W_enc, W_dec, b_dec, x, group_cols, group_vals, goff, dead_cols)
        # The entries are kept on ctx rather than saved, so the backward can drop them once it has
        # them in latent order (with many dead latents the AuxK ones are the step's largest arrays).
        ctx.codes = (cols, vals, offsets)
        ctx.aux_entries = None if aux_cols is None else (aux_cols, aux_vals, aux_offsets)
        ctx.aux_z = aux_z  # (no autograd history) freed as soon as the backward is done with it
        ctx.E = E  # not saved: the backward overwrites it in place
        ctx.scale, ctx.aux_coef, ctx.bounds, ctx.starts = scale, aux_coef, bounds, starts
        return x_hat, mse, prefix, aux

    @staticmethod
    def backward(ctx, g_xhat, g_mse, g_prefix, g_aux):
        E, A = ctx.E, ctx.A
        if E is None:
            raise RuntimeError(
                "the sparse Matryoshka step cannot be backpropagated twice (retain_graph is not supported)"
            )
        ctx.E = ctx.A = None
        W_enc, W_dec, b_dec, x, group_cols, group_vals, goff, dead_cols = ctx.saved_tensors
        cols, vals, offsets = ctx.codes
        aux_entries = ctx.aux_entries
        ctx.codes = ctx.aux_entries = None
        dense, grad_wd_dead = take_dense_aux_grads(ctx, g_aux, W_dec, dead_cols, x)
        need_we, need_be, need_wd, need_bd = ctx.needs_input_grad[:4]
        need_vals = need_we or need_be or need_bd
        n, d = x.shape
        m = W_dec.shape[0]
        s, bounds, starts = ctx.scale, ctx.bounds, ctx.starts
        n_groups = len(bounds) - 1
        # Latent order (sort_entries_by_latent: no int64 permutation on the CPU, the latents given by
        # ptr); with sparse AuxK entries token ids int16 where they fit on the CPU (widened block by
        # block where read).
        n_entries = cols.numel() + (0 if aux_entries is None else aux_entries[0].numel())
        narrow = ids_dtype_for(max(n_entries, m))
        bag_dtype = narrow if A is None else small_ids_dtype_for(n, x.device, narrow)
        gb = torch.zeros(m, dtype=W_dec.dtype, device=W_dec.device)
        aux = None
        if A is not None:
            assert aux_entries is not None
            aux_offsets = aux_entries[2]
            if g_aux is None:
                A.zero_()
            else:
                A.mul_(g_aux * (2 * ctx.aux_coef / max(1, n)))
            entries = [aux_entries[0], aux_entries[1]]
            aux_entries = None
            aux = sort_entries_by_latent(entries, aux_offsets, m, narrow, bag_dtype)
        grad_wd = torch.empty_like(W_dec) if need_wd else None  # after the AuxK sort (peak memory)
        if aux is not None:
            # The AuxK entries first, while their error A lives: their rows of grad W_dec (a latent's
            # codes add theirs in the loop below) and their value gradients, in place of their values.
            if grad_wd is not None:
                segment_sum_into(grad_wd, 0, m, aux[0], aux[1], A, aux[2], WDEC_BLOCK)
            if need_vals:
                value_grads_(aux[1], A, W_dec, aux[0], aux_offsets, aux[2])
        del A
        S = torch.empty_like(E)
        if g_xhat is None:
            S.zero_()
        else:
            torch.mul(g_xhat, 1 / s, out=S)
        # The codes in latent order; the value gradients overwrite the values group by group.
        entries = [cols, vals]
        del cols, vals
        bags_s, vals_s, ptr = sort_entries_by_latent(entries, offsets, m, narrow, bag_dtype)
        cut = ptr[torch.tensor(bounds, device=ptr.device)].tolist()  # where each group's latents begin
        two_over_n = 2.0 / max(1, n)
        for g in reversed(range(n_groups)):
            w = g_mse if g == n_groups - 1 else g_prefix
            if w is not None:
                S.addcmul_(E, w * two_over_n)
            if g == 0:
                del E  # E_0 is in S now
            lo, hi, p0, p1 = bounds[g], bounds[g + 1], cut[g], cut[g + 1]
            if grad_wd is not None:
                segment_sum_into(grad_wd, lo, hi, bags_s, vals_s, S, ptr, WDEC_BLOCK, accumulate=aux is not None)
            if p1 > p0 and need_vals:
                value_grads_(vals_s, S, W_dec, bags_s, offsets, ptr, lo, hi, gb)
            if g > 0 and starts[g + 1] > starts[g]:
                _add_group_(E, group_cols, group_vals, W_dec, goff[g * n : (g + 1) * n + 1], -1.0)
        if aux is not None and need_vals:
            latent_sums_(gb, aux[1], aux[2])  # after the codes' sums: each latent's in entry order
        grad_bd = S.sum(0) if need_bd else None
        del S
        if grad_wd is not None and grad_wd_dead is not None:
            grad_wd.index_add_(0, dead_cols, grad_wd_dead)
        del grad_wd_dead
        if not need_vals:
            return None, None, grad_wd, grad_bd, *([None] * 12)
        grad_we, grad_be = encoder_grads(
            W_enc, x, s, b_dec, None, vals_s, bags_s, ptr, n, grad_bd, need_we, need_be, dense, dead_cols, gb, aux
        )
        return grad_we, grad_be, grad_wd, grad_bd, *([None] * 12)


def sparse_prefix_step(
    x: Tensor,
    scale: float,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    sel: TopKSelection,
    bounds: list[int],
    aux_coef: float = 0.0,
    dense_aux: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(x_hat in raw units, mse, prefix_mse, auxk or None) of the codes selected from x (raw, (n, d))
    with xn = scale * x and latent groups cut at `bounds` ([0, ..., n_latents]); see the module
    docstring; AuxK from the selection's sparse entries or from `dense_aux` (as
    `topk_step.sparse_topk_step`). All four parameters get their gradients through the selected entries
    only."""
    # The codes as selected (no copy) and the AuxK entries apart from them (no concatenated copy).
    cols, vals, offsets = code_entries(sel)
    index_dtype = torch.long if sel.aux_indices is None else ids_dtype_for(sel.aux_indices.numel())
    aux = aux_entries(sel, index_dtype)
    # The AuxK entries now live in `aux`: drop the selection's references before the decoder runs.
    sel.aux_values = sel.aux_indices = None
    aux_cols, aux_vals, aux_offsets = aux if aux is not None else (None, None, None)
    del aux
    dead_cols, aux_z = dense_aux if dense_aux is not None else (None, None)
    x_hat, mse, prefix, auxk = _SparsePrefixStep.apply(
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        x,
        float(scale),
        cols,
        vals.to(W_dec.dtype),
        offsets,
        aux_cols,
        None if aux_vals is None else aux_vals.to(W_dec.dtype),
        aux_offsets,
        [int(b) for b in bounds],
        float(aux_coef),
        dead_cols,
        aux_z,
    )
    return x_hat, mse, prefix, (auxk if aux_cols is not None or dense_aux is not None else None)


__all__ = ["sparse_prefix_step"]
