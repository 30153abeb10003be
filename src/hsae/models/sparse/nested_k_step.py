"""The fused MSAE training step: one top-k selection at the largest k serves every nested k.

A token's top-k_i latents are the k_i largest of its top-K (K the largest nested k), so the step
selects the top K once without autograd (the TopK step's chunked selection), sorts each row's K
entries by value, descending, and cuts the ranks into bands [0, k_1), [k_1, k_2), ..., [k_{L-1}, K).
With R_b the decoded band b (normalised units) and E_i = b_dec + R_0 + ... + R_i - xn the error at
k_i, the losses are (w_i the normalised level weights)

    mse = w_L |E_L|^2 / n,   nested_mse = sum_{i < L} w_i |E_i|^2 / n,   auxk as in the TopK step.

Forward: E_0 .. E_L are built one band at a time (each band one fixed-width `embedding_bag`) and
kept, stacked, in one (L n, d) buffer G (plus n rows for the AuxK error when AuxK comes as entries).

Backward: d loss / d R_b = sum_{i >= b} c_i E_i (c_i = 2 w_i g_i / n) =: S_b, a suffix sum, turned
in place into S_b by walking G from the last level to the first. An entry of rank j in band b is
then bag b n + r of G (its token r's S_b), AuxK entries bag L n + r: one grouping of all entries by
latent gives grad W_dec as one segment sum over G, the value gradients as sampled dot products, and
the encoder gradients exactly as in the TopK step (`topk_step.encoder_grads`). grad b_dec is the
column sum of S_0. AuxK over few dead latents comes as a dense block over their columns instead
(`topk_step.dense_aux_forward/backward`). Memory: G is (levels + 1) x (n, d_in) floats; no
(n, n_latents) tensor enters autograd.

tests/test_msae.py checks losses, codes and all gradients against the family's dense `forward` and
against a plain dense per-k reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hsae.models.auxk import aux_plan
from hsae.models.base import SAEOutput, StepContext
from hsae.models.codes import SparseCodes
from hsae.models.sparse.ops import group_by_latent, sampled_dot, segment_sum
from hsae.models.sparse.selection import DEFAULT_CHUNK_ROWS, TopKSelection
from hsae.models.sparse.steps import DENSE_AUXK_MAX_ELEMENTS, PerTokenTopK
from hsae.models.sparse.topk_step import dense_aux_codes, dense_aux_forward, encoder_grads, take_dense_aux_grads


def sorted_by_value(sel: TopKSelection) -> tuple[Tensor, Tensor]:
    """(indices, values) of a fixed-width selection with each row's entries by value, descending:
    the first k of a row are then its top k for every k up to the selection's width."""
    values, order = sel.values.sort(dim=1, descending=True)
    return sel.indices.gather(1, order), values


class _NestedKStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, W_enc, b_enc, W_dec, b_dec, x, scale, idx, vals, ks, weights, aux_idx, aux_vals, aux_coef,
                dead_cols, aux_z):  # fmt: skip
        n, d = x.shape
        levels = len(ks)
        sparse_aux = aux_idx is not None
        G = torch.empty((levels + int(sparse_aux)) * n, d, dtype=x.dtype, device=x.device)
        W = W_dec.detach()  # this function has its own backward
        torch.mul(x, -scale, out=G[:n]).add_(b_dec)  # the error of the empty code: b_dec - xn
        level_losses = []
        lo = 0
        for i, k in enumerate(ks):
            E = G[i * n : (i + 1) * n]
            if i:
                E.copy_(G[(i - 1) * n : i * n])
            if k > lo:
                E.add_(F.embedding_bag(idx[:, lo:k], W, mode="sum", per_sample_weights=vals[:, lo:k]))
            flat = E.reshape(-1)
            level_losses.append(torch.dot(flat, flat) / max(1, n))
            lo = k
        E_last = G[(levels - 1) * n : levels * n]
        mse = level_losses[-1] * weights[-1]
        nested = sum((w * loss for w, loss in zip(weights[:-1], level_losses[:-1], strict=True)), torch.zeros_like(mse))
        x_hat = torch.add(x, E_last, alpha=1 / scale)
        ctx.dense_A = None
        if aux_z is not None:  # AuxK as a dense block over the dead latents' columns
            ctx.dense_A, aux = dense_aux_forward(E_last, aux_z, W_dec, dead_cols, aux_coef)
        elif sparse_aux:
            A = G[levels * n :]
            torch.add(F.embedding_bag(aux_idx, W, mode="sum", per_sample_weights=aux_vals), E_last, out=A)
            flat = A.reshape(-1)  # the dead latents' reconstruction minus the live residual xn - xn_hat = -E
            aux = torch.nan_to_num(torch.dot(flat, flat).mul_(aux_coef / max(1, n)))
        else:
            aux = torch.zeros((), dtype=x.dtype, device=x.device)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(W_enc, W_dec, b_dec, x, idx, vals, aux_idx, aux_vals, dead_cols)
        ctx.G = G  # not saved: the backward turns it into the S_b in place
        ctx.aux_z = aux_z  # (no autograd history) freed as soon as the backward is done with it
        ctx.scale, ctx.aux_coef, ctx.ks, ctx.weights = scale, aux_coef, ks, weights
        return x_hat, mse, nested, aux

    @staticmethod
    def backward(ctx, g_xhat, g_mse, g_nested, g_aux):
        G = ctx.G
        if G is None:
            raise RuntimeError("the sparse MSAE step cannot be backpropagated twice (retain_graph is not supported)")
        ctx.G = None
        W_enc, W_dec, b_dec, x, idx, vals, aux_idx, aux_vals, dead_cols = ctx.saved_tensors
        dense, grad_wd_dead = take_dense_aux_grads(ctx, g_aux, W_dec, dead_cols, x)
        need_we, need_be, need_wd, need_bd = ctx.needs_input_grad[:4]
        n = x.shape[0]
        ks, weights, s = ctx.ks, ctx.weights, ctx.scale
        levels = len(ks)
        for b in reversed(range(levels)):  # G[b] := S_b = c_b E_b + S_{b+1}
            S = G[b * n : (b + 1) * n]
            g = g_mse if b == levels - 1 else g_nested
            if g is None:
                S.zero_()
            else:
                S.mul_(g * (2 * weights[b] / max(1, n)))
            if b == levels - 1 and g_xhat is not None:
                S.add_(g_xhat, alpha=1 / s)
            if b < levels - 1:
                S.add_(G[(b + 1) * n : (b + 2) * n])
        if aux_idx is not None:
            if g_aux is None:
                G[levels * n :].zero_()
            else:
                G[levels * n :].mul_(g_aux * (2 * ctx.aux_coef / max(1, n)))
        grad_bd = G[:n].sum(0) if need_bd else None

        # Bags: entry (r, j) of band b reads row b n + r of G, AuxK entry (r, .) row L n + r.
        K = idx.shape[1]
        bounds = torch.tensor(ks[:-1], dtype=torch.long, device=idx.device)
        band = torch.bucketize(torch.arange(K, device=idx.device), bounds, right=True)
        tokens = torch.arange(n, device=idx.device)
        bags = (band.unsqueeze(0) * n + tokens.unsqueeze(1)).reshape(-1)
        cols, entry_vals = idx.reshape(-1), vals.reshape(-1)
        if aux_idx is not None:
            bags = torch.cat([bags, (tokens + levels * n).repeat_interleave(aux_idx.shape[1])])
            cols, entry_vals = torch.cat([cols, aux_idx.reshape(-1)]), torch.cat([entry_vals, aux_vals.reshape(-1)])
        order, ptr = group_by_latent(cols, W_dec.shape[0])
        grad_wd = None
        if need_wd:
            grad_wd = segment_sum(bags, entry_vals, G, order, ptr)
            if grad_wd_dead is not None:
                grad_wd.index_add_(0, dead_cols, grad_wd_dead)
        del grad_wd_dead
        if not (need_we or need_be or need_bd):
            return None, None, grad_wd, grad_bd, *([None] * 11)
        gv = sampled_dot(G, W_dec, bags, cols, None)
        del G
        gv.mul_(entry_vals > 0)  # ReLU: no gradient where the value was clipped to 0
        grad_we, grad_be = encoder_grads(
            W_enc,
            x,
            s,
            b_dec,
            cols.index_select(0, order),
            gv.index_select(0, order),
            bags.index_select(0, order),
            ptr,
            n,
            grad_bd,
            need_we,
            need_be,
            dense,
            dead_cols,
        )
        return grad_we, grad_be, grad_wd, grad_bd, *([None] * 11)


def sparse_nested_k_step(
    x: Tensor,
    scale: float,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    sel: TopKSelection,
    ks: list[int],
    weights: list[float],
    aux_coef: float = 0.0,
    dense_aux: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, SparseCodes]:
    """(x_hat in raw units, mse, nested_mse, auxk or None, codes at the largest k) of the top-K
    selection `sel` of x (raw, (n, d)) with xn = scale * x, for nested ks (ascending, the last = K)
    weighted by `weights` (normalised); see the module docstring. All four parameters get their
    gradients through the selected entries only."""
    idx, vals = sorted_by_value(sel)
    vals = vals.to(W_dec.dtype)
    aux_idx = aux_vals = None
    if sel.aux_values is not None and dense_aux is None:
        aux_idx, aux_vals = sel.aux_indices, sel.aux_values.to(W_dec.dtype)
    dead_cols, aux_z = dense_aux if dense_aux is not None else (None, None)
    x_hat, mse, nested, aux = _NestedKStep.apply(
        W_enc,
        b_enc,
        W_dec,
        b_dec,
        x,
        float(scale),
        idx,
        vals,
        [int(k) for k in ks],
        [float(w) for w in weights],
        aux_idx,
        aux_vals,
        float(aux_coef),
        dead_cols,
        aux_z,
    )
    has_aux = sel.aux_values is not None or dense_aux is not None
    codes = SparseCodes(idx, vals.detach(), W_dec.shape[0])
    return x_hat, mse, nested, (aux if has_aux else None), codes


@dataclass(frozen=True)
class NestedKStep:
    """The fused training step of nested-over-k families (MSAE): one PerTokenTopK selection at the
    largest k (`model.config.k`), the nested losses from `model.nesting()` and
    `model.level_weights()`. The model offers what `FusedTopKStep` needs of a TopK family."""

    # Rows of pre-activations computed at once (memory: chunk_rows x n_latents floats).
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    # AuxK as a dense block while n x n_dead stays at most this (0: always sparse entries).
    dense_auxk_max_elements: int = DENSE_AUXK_MAX_ELEMENTS

    def __call__(self, model: Any, x: Tensor, ctx: StepContext) -> SAEOutput:
        if x.dim() != 2 or x.shape[-1] != model.d_in:
            model.scale_in(x)  # raises the shape error
        x = x.to(dtype=model.W_enc.dtype, device=model.W_enc.device)
        cfg = model.config
        dead_cols, k_aux = aux_plan(model, ctx)
        dense = dead_cols is not None and x.shape[0] * dead_cols.numel() <= self.dense_auxk_max_elements
        selection = PerTokenTopK()(model, x, None if dense else dead_cols, k_aux, self.chunk_rows)
        dense_aux = None
        if dense:
            assert dead_cols is not None
            z = dense_aux_codes(
                x, cfg.input_scale, model.W_enc.detach(), model.b_enc.detach(), model.b_dec.detach(), dead_cols, k_aux
            )
            dense_aux = (dead_cols, z)
        ks = model.nesting()
        x_hat, mse, nested, auxk, codes = sparse_nested_k_step(
            x,
            cfg.input_scale,
            model.W_enc,
            model.b_enc,
            model.W_dec,
            model.b_dec,
            selection,
            ks,
            model.level_weights(),
            cfg.aux_coef,
            dense_aux,
        )
        losses = {"mse": mse}
        if len(ks) > 1:
            losses["nested_mse"] = nested
        if auxk is not None:
            losses["auxk"] = auxk
        return SAEOutput(x_hat=x_hat, codes=codes, losses=losses)
