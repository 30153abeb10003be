"""Fused training steps a TopK-style family declares instead of the generic autograd step.

    class TopKSAE(SAE[TopKConfig]):
        train_step = FusedTopKStep(selection=PerTokenTopK())

    class MatryoshkaSAE(BatchTopKSAE[MatryoshkaConfig]):
        train_step = FusedTopKStep(selection=BatchTopK(), groups=group_bounds)

A step selects the codes without autograd from chunked pre-activations (`selection`), plans the
AuxK term (hsae.models.auxk.aux_plan: as sparse entries, or as a dense block over the dead latents'
columns when that block is small), then runs one fused autograd function: the TopK step
(topk_step.sparse_topk_step), or with `groups` the nested-prefix Matryoshka step
(prefix_step.sparse_prefix_step). No (tokens x latents) tensor enters autograd.

What the model must offer: `W_enc`, `b_enc`, `W_dec`, `b_dec`, `config.k`, `config.input_scale`,
`config.aux_coef`, `aux_k()`, `compute_dtype` (the encoder matmul's dtype, None for the weights'
own), `n_latents`, `d_in`, `scale_in` (the shape check); `BatchTopK` also calls
`model.selection_hint()` and `model.record_selection(selection)` (the inference threshold); with
`groups`, `config.prefix_weight` (the weight of the strict prefixes' losses).

The step must compute what the family's `forward` computes (its reference formulation);
tests/test_kernels.py and tests/test_prefix_step.py check it for every family that declares one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from hsae.models.auxk import aux_plan
from hsae.models.base import SAEOutput, StepContext
from hsae.models.codes import SparseCodes
from hsae.models.sparse.ops import small_ids_dtype_for
from hsae.models.sparse.prefix_step import sparse_prefix_step
from hsae.models.sparse.selection import (
    DEFAULT_CHUNK_ROWS,
    TopKSelection,
    encode_batch_topk_chunked,
    encode_topk_chunked,
)
from hsae.models.sparse.topk_step import dense_aux_codes, sparse_topk_step

# The AuxK term over few dead latents is cheaper as a dense block on their columns than as sparse
# entries: with k_aux near the dead count the entries are a dense block anyway, and small matmuls
# run many times faster per entry than gathers. Used while the (n, n_dead) block stays under this
# many elements; above it the sparse entries keep memory flat.
DENSE_AUXK_MAX_ELEMENTS = 2**21


class Selection(Protocol):
    """Chooses a batch's codes (and AuxK entries among `dead_cols`, if given) without autograd."""

    def __call__(
        self, model: Any, x: Tensor, dead_cols: Tensor | None, k_aux: int, chunk_rows: int
    ) -> TopKSelection: ...


@dataclass(frozen=True)
class PerTokenTopK:
    """Each token keeps its k largest pre-activations, ReLU'd (TopK)."""

    def __call__(self, model: Any, x: Tensor, dead_cols: Tensor | None, k_aux: int, chunk_rows: int) -> TopKSelection:
        return encode_topk_chunked(
            x,
            model.W_enc.detach(),
            model.b_enc.detach(),
            model.config.k,
            dead_cols=dead_cols,
            k_aux=k_aux,
            compute_dtype=model.compute_dtype,
            chunk_rows=chunk_rows,
            scale=model.config.input_scale,
            b_dec=model.b_dec.detach(),
        )


@dataclass(frozen=True)
class BatchTopK:
    """The batch keeps its k * n largest positive pre-activations over all tokens (BatchTopK): exact
    whatever the hint the model gives (its last batch's smallest kept value times a fraction; a
    wrong hint only costs a recomputation); the model records each selection (its threshold)."""

    def __call__(self, model: Any, x: Tensor, dead_cols: Tensor | None, k_aux: int, chunk_rows: int) -> TopKSelection:
        selection = encode_batch_topk_chunked(
            x,
            model.W_enc.detach(),
            model.b_enc.detach(),
            model.config.k,
            dead_cols=dead_cols,
            k_aux=k_aux,
            compute_dtype=model.compute_dtype,
            chunk_rows=chunk_rows,
            scale=model.config.input_scale,
            b_dec=model.b_dec.detach(),
            hint=model.selection_hint(),
        )
        model.record_selection(selection)
        return selection


@dataclass(frozen=True)
class FusedTopKStep:
    """The fused sparse training step of TopK-style families (see the module docstring)."""

    selection: Selection = field(default_factory=PerTokenTopK)
    # The latent groups of nested-prefix losses, [0, m_1, ..., n_latents], from the model (Matryoshka);
    # None: one reconstruction loss.
    groups: Callable[[Any], list[int]] | None = None
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
        # The AuxK entries' latent ids come in dead_cols' dtype: int16 on the CPU where they fit, else
        # int32, keeps the (n, k_aux) ids small.
        sel_dead = None
        if not dense and dead_cols is not None:
            sel_dead = dead_cols.to(small_ids_dtype_for(model.n_latents, x.device, torch.int32))
        selection = self.selection(model, x, sel_dead, k_aux, self.chunk_rows)
        dense_aux = None
        if dense:
            assert dead_cols is not None
            z = dense_aux_codes(
                x,
                cfg.input_scale,
                model.W_enc.detach(),
                model.b_enc.detach(),
                model.b_dec.detach(),
                dead_cols,
                k_aux,
                model.compute_dtype,
            )
            dense_aux = (dead_cols, z)
        weights = (model.W_enc, model.b_enc, model.W_dec, model.b_dec)
        if self.groups is None:
            x_hat, mse, auxk = sparse_topk_step(x, cfg.input_scale, *weights, selection, cfg.aux_coef, dense_aux)
            losses = {"mse": mse}
        else:
            bounds = self.groups(model)
            x_hat, mse, prefix_mse, auxk = sparse_prefix_step(
                x, cfg.input_scale, *weights, selection, bounds, cfg.aux_coef, dense_aux
            )
            losses = {"mse": mse}
            if len(bounds) > 2:
                losses["prefix_mse"] = cfg.prefix_weight * prefix_mse
        if auxk is not None:
            losses["auxk"] = auxk
        codes = SparseCodes(selection.indices, selection.values, model.n_latents, selection.offsets)
        return SAEOutput(x_hat=x_hat, codes=codes, losses=losses)
