"""The fused TopK training step: decoder, reconstruction loss and AuxK loss of selected codes in one
autograd function whose backward writes all four parameter gradients through the active entries.

`sparse_topk_step` takes a `TopKSelection` (hsae.models.sparse.selection: the codes and AuxK
entries, chosen without autograd from chunked pre-activations) and returns (x_hat, mse, auxk). Its
backward groups all entries (codes and AuxK together) by latent once, writes grad W_dec as a segment
sum, the value gradients as sampled dot products, and grad W_enc block by block in its own
(d_in, n_latents) layout from the raw batch (`encoder_grads`), freeing its (n, d_in) buffers as soon
as they are used (peak memory). AuxK over few dead latents comes as a dense (n, n_dead) block instead
of entries (`dense_aux_codes`, `dense_aux_forward/backward`): small matmuls beat per-entry gathers
when k_aux is near the dead count. No (n, n_latents) tensor exists at any point.

tests/test_kernels.py checks losses and gradients against the dense formulation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hsae.models.sparse.ops import (
    bag_sum_blocks,
    encoder_matmul,
    ids_dtype_for,
    segment_sum_into,
    segment_sum_transposed,
    small_ids_dtype_for,
    sort_entries_by_latent,
    value_grads_,
)
from hsae.models.sparse.selection import TopKSelection

# Rows per block of the dense AuxK block's ReLU mask (`dense_aux_backward`).
_MASK_ROWS = 256
# Latents per block of the grad-W_dec segment sum (its per-block output stays small: peak memory).
WDEC_BLOCK = 128


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
    grad_z = A @ W_dead.t()
    for r0 in range(0, grad_z.shape[0], _MASK_ROWS):  # row blocks: the mask's temporaries stay small
        grad_z[r0 : r0 + _MASK_ROWS].mul_(aux_z[r0 : r0 + _MASK_ROWS] > 0)
    return grad_z, grad_w_dead


def take_dense_aux_grads(
    ctx, g_aux: Tensor | None, W_dec: Tensor, dead_cols: Tensor | None, x: Tensor
) -> tuple[tuple[Tensor, Tensor | None] | None, Tensor | None]:
    """`dense_aux_backward` of the block a fused step's forward left on ctx (`dense_A`, `aux_z`),
    releasing both: (the encoder's share of its value gradients grad_z, (grad_z.sum(0),
    ctx.scale * x^T grad_z or None when W_enc needs no gradient) for `encoder_grads`; its share of
    grad W_dec[dead]). The steps call it first in their backward, so the block's (n, d) error and
    (n, n_dead) codes and value gradients are gone before any (n_latents, d) gradient exists (peak
    memory)."""
    if dead_cols is None or ctx.dense_A is None:
        ctx.dense_A = ctx.aux_z = None
        return None, None
    grad_z, grad_wd_dead = dense_aux_backward(ctx.dense_A, g_aux, ctx.aux_coef, W_dec, dead_cols, ctx.aux_z)
    ctx.dense_A = ctx.aux_z = None
    if grad_z is None:
        return None, grad_wd_dead
    xz = (x.t() @ grad_z).mul_(ctx.scale) if ctx.needs_input_grad[0] else None
    return (grad_z.sum(0), xz), grad_wd_dead


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
    def forward(ctx, W_enc, b_enc, W_dec, b_dec, x, scale, cols, vals, bag_offsets, aux_coef, dead_cols, aux_z):
        n = x.shape[0]
        n_bags = bag_offsets.numel() - 1
        # W_dec.detach(): embedding_bag of a weight that requires grad also builds what its own backward
        # would need (bag ids, sizes), ~15% of the call; this function has its own backward.
        out = bag_sum_blocks(cols, vals, W_dec.detach(), bag_offsets)
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
        ctx.save_for_backward(W_enc, W_dec, b_dec, x, bag_offsets, dead_cols)
        # The entries are kept on ctx rather than saved, so the backward can drop them once it has
        # them in latent order (with many dead latents they are the step's largest arrays).
        ctx.entries = (cols, vals)
        ctx.out = out  # not saved: the backward overwrites it in place and frees it early
        ctx.aux_z = aux_z  # (no autograd history) likewise freed as soon as the backward is done with it
        ctx.scale, ctx.aux_coef = scale, aux_coef
        return x_hat, mse, aux

    @staticmethod
    def backward(ctx, g_xhat, g_mse, g_aux):
        G = ctx.out
        if G is None:
            raise RuntimeError("the sparse TopK step cannot be backpropagated twice (retain_graph is not supported)")
        ctx.out = None
        W_enc, W_dec, b_dec, x, bag_offsets, dead_cols = ctx.saved_tensors
        cols, vals = ctx.entries
        ctx.entries = None
        dense, grad_wd_dead = take_dense_aux_grads(ctx, g_aux, W_dec, dead_cols, x)
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
        # From here on every per-entry array is in latent order, and each unsorted one is released
        # as soon as it is not needed: with many dead latents the AuxK entries outnumber the codes'
        # several times and these arrays are the step's peak (issue 18).
        # Latent order without an int64 permutation on the CPU (sort_entries_by_latent), bag ids int32
        # where they fit, with AuxK entries int16 on the CPU where they fit (widened block by block
        # where read); the sorted entries' latents are not stored (ptr gives them); the value
        # gradients overwrite the values (value_grads_).
        narrow = ids_dtype_for(max(cols.numel(), n_bags, m))
        bag_dtype = small_ids_dtype_for(n_bags, x.device, narrow) if n_bags > n else narrow
        entries = [cols, vals]
        del cols, vals
        bags_sorted, vals_sorted, ptr = sort_entries_by_latent(entries, bag_offsets, m, narrow, bag_dtype)
        if need_wd:
            grad_wd = torch.empty_like(W_dec)
            segment_sum_into(grad_wd, 0, m, bags_sorted, vals_sorted, G, ptr, WDEC_BLOCK)
            if grad_wd_dead is not None:
                grad_wd.index_add_(0, dead_cols, grad_wd_dead)
        del grad_wd_dead
        if not (need_we or need_be or need_bd):
            return None, None, grad_wd, grad_bd, *([None] * 8)
        # the value gradients G[bag] . W_dec[latent] (ReLU'd), in place of the values, and their sum
        # per latent (grad b_enc's share of the entries)
        g_sorted = vals_sorted
        del vals_sorted
        gb = torch.zeros(m, dtype=W_dec.dtype, device=W_dec.device)
        value_grads_(g_sorted, G, W_dec, bags_sorted, bag_offsets, ptr, gb=gb)
        del G
        grad_we, grad_be = encoder_grads(
            W_enc, x, s, b_dec, None, g_sorted, bags_sorted, ptr, n, grad_bd, need_we, need_be, dense,
            dead_cols, gb,
        )  # fmt: skip
        return grad_we, grad_be, grad_wd, grad_bd, *([None] * 8)


def encoder_grads(
    W_enc: Tensor,
    x: Tensor,
    scale: float,
    b_dec: Tensor,
    cols: Tensor | None,
    g: Tensor,
    bags: Tensor,
    ptr: Tensor,
    n: int,
    grad_bd: Tensor | None,
    need_we: bool,
    need_be: bool,
    dense: tuple[Tensor, Tensor | None] | None = None,
    dead_cols: Tensor | None = None,
    gb: Tensor | None = None,
    more: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """(grad W_enc, grad b_enc) from the gradients g of the selected pre-activations, entries sorted
    by latent (cols, bags with CSR pointer ptr; bags >= n are AuxK bags of token bag - n), plus a dense
    AuxK block's shares `dense` over `dead_cols` (`take_dense_aux_grads`); grad_bd gets the encoder's
    share, -W_enc colsum, in place. grad W_enc[:, j] = sum of g * (scale * x[token] - b_dec). `gb`, if
    given, is the entries' sum of g per latent already (`cols` is then not read) and gets the dense
    block's share in place. `more`: a second set of entries (token ids, g, ptr) sorted by latent,
    whose sums of g are in `gb` too (`segment_sum_transposed`)."""
    if gb is None:
        assert cols is not None
        gb = torch.zeros(W_enc.shape[1], dtype=W_enc.dtype, device=W_enc.device).index_add_(0, cols, g)
    if dense is not None and dead_cols is not None:
        gb.index_add_(0, dead_cols, dense[0])
    if grad_bd is not None:
        grad_bd.addmv_(W_enc, gb, alpha=-1)
    grad_we = None
    if need_we:
        bags.remainder_(n)  # AuxK bags n + r read token r
        grad_we = segment_sum_transposed(bags, g, x, ptr, scale, b_dec, gb, more)
        if dense is not None and dense[1] is not None and dead_cols is not None:  # b_dec's part is in gb
            grad_we.index_add_(1, dead_cols, dense[1])
    return grad_we, (gb if need_be else None)


def code_entries(sel: TopKSelection, index_dtype: torch.dtype = torch.long) -> tuple[Tensor, Tensor, Tensor]:
    """CSR (cols, vals, bag_offsets) of a selection's codes (bag r: token r): cols and vals as
    selected (flat views, no copy), bag_offsets in `index_dtype`."""
    if sel.offsets is None:
        n, k = sel.indices.shape
        cols, vals = sel.indices.reshape(-1), sel.values.reshape(-1)
        offsets = torch.arange(0, n * k + 1, max(1, k), device=cols.device, dtype=index_dtype)[: n + 1]
        return cols, vals, offsets
    return sel.indices, sel.values, sel.offsets.to(index_dtype)


def aux_entries(sel: TopKSelection, index_dtype: torch.dtype = torch.long) -> tuple[Tensor, Tensor, Tensor] | None:
    """CSR (cols, vals, bag_offsets) of a selection's AuxK entries with a value > 0 (bag r: token r;
    the others contribute nothing), None without AuxK entries: cols in the selection's dtype (flat
    views where every entry is > 0), bag_offsets in `index_dtype`."""
    if sel.aux_values is None:
        return None
    assert sel.aux_indices is not None
    live = sel.aux_values > 0
    aux_off = torch.zeros(live.shape[0] + 1, dtype=index_dtype, device=live.device)
    torch.cumsum(live.sum(1), 0, out=aux_off[1:])
    aux_cols, aux_vals = sel.aux_indices.reshape(-1), sel.aux_values.reshape(-1)
    if not bool(live.all()):  # flat positions of the live entries, found once for both arrays
        keep = live.reshape(-1).nonzero().squeeze(1)
        aux_cols, aux_vals = aux_cols.index_select(0, keep), aux_vals.index_select(0, keep)
    return aux_cols, aux_vals, aux_off


def selection_entries(sel: TopKSelection, index_dtype: torch.dtype = torch.long) -> tuple[Tensor, Tensor, Tensor]:
    """CSR (cols, vals, bag_offsets) of a selection's codes (bags 0..n-1) and, if any, its AuxK
    entries with a value > 0 (bags n..2n-1; `aux_entries`); cols and bag_offsets in `index_dtype`
    (embedding_bag takes int32 or int64 ids, both of one dtype)."""
    cols, vals, offsets = code_entries(sel, index_dtype)
    aux = aux_entries(sel, index_dtype)
    if aux is None:
        return cols.to(index_dtype), vals, offsets
    aux_cols, aux_vals, aux_off = aux
    del aux
    n_code = cols.numel()
    all_cols = torch.empty(n_code + aux_cols.numel(), dtype=index_dtype, device=cols.device)
    all_cols[:n_code] = cols
    all_cols[n_code:] = aux_cols
    del aux_cols
    return (
        all_cols,
        torch.cat([vals, aux_vals]),
        torch.cat([offsets, aux_off[1:].add_(n_code)]),
    )


@torch.no_grad()
def dense_aux_codes(
    x: Tensor,
    scale: float,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    dead_cols: Tensor,
    k_aux: int,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """The AuxK codes as a dense (n, n_dead) block over the dead latents' columns: their
    pre-activations (scale * x - b_dec) @ W_enc[:, dead] + b_enc[dead], the k_aux largest of each
    row kept (ReLU'd), the rest 0 (no autograd). With `compute_dtype` (screened selection) a matmul
    in that dtype chooses the k_aux entries and the exact pre-activations give their values."""
    xc = x * scale - b_dec
    W_dead, b_dead = W_enc.index_select(1, dead_cols), b_enc.index_select(0, dead_cols)
    pre = torch.addmm(b_dead, xc, W_dead)
    chooser = pre if compute_dtype is None else encoder_matmul(xc, W_dead, b_dead, compute_dtype)
    pos = chooser.topk(k_aux, dim=1, sorted=False).indices
    return torch.zeros_like(pre).scatter_(1, pos, pre.gather(1, pos).relu_())


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
    `hsae.models.auxk.auxk_term` (aux_coef times the AuxK reconstruction error of the live residual), from the
    selection's sparse AuxK entries or from `dense_aux` = (dead latent ids, `dense_aux_codes`). Both
    backpropagate to W_enc, b_enc, W_dec and b_dec through the selected entries only
    (`_SparseTopKStep`)."""
    # With AuxK entries the concatenated ids are a new array: int32 where they fit (half the memory);
    # the codes alone pass as they are (no copy).
    index_dtype = torch.long
    if sel.aux_indices is not None:
        index_dtype = ids_dtype_for(sel.indices.numel() + sel.aux_indices.numel() + 2 * x.shape[0])
    cols, vals, offsets = selection_entries(sel, index_dtype)
    has_aux = sel.aux_values is not None
    # The AuxK entries now live in (cols, vals): drop the selection's copies before the decoder runs.
    sel.aux_values = sel.aux_indices = None
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
    return x_hat, mse, (aux if has_aux or dense_aux is not None else None)
