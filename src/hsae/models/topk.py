"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Codes keep the k largest pre-activations of each token (ReLU'd), as sparse (indices, values). The
AuxK loss revives dead latents: the k_aux largest pre-activations among latents dead for the trainer's
window reconstruct the main reconstruction's residual, weighted by `aux_coef` (1/32 in the paper).

Training takes the sparse path of `hsae.models.kernels` (issue 6): the pre-activations
(scale * x - b_dec) @ W_enc + b_enc are computed in row chunks without autograd and only the selected
entries are kept (`encode_topk_chunked`); one custom autograd function (`sparse_topk_step`) then
decodes them with `embedding_bag`, forms the reconstruction and AuxK losses and, in its backward,
writes all four parameter gradients through the active entries only (grad W_enc directly in its
(d_in, n_latents) layout, from the raw batch, without an (n, d_in) xc or any (n, n_latents) tensor).
The cost of a step is the encoder matmul plus O(k + k_aux) per token, and it computes the same codes,
losses and gradients as the dense formulation (`forward` of the base class, which is what runs in
eval mode, without autograd, or for subclasses that change `activate`/`extra_losses`). Peak memory is
about parameters + Adam state + batch + gradients + two (n, d_in) tensors (the reconstruction and its
error) + one pre-activation chunk.

`compute_dtype = "bfloat16"` runs the encoder matmul in bf16 (weights stay float32; on CPUs with
AVX-512 bf16/AMX and on GPUs it is several times faster); everything else stays float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hsae.config import SAEConfig
from hsae.errors import HsaeError
from hsae.models import register
from hsae.models.base import SAE, SAEOutput, StepContext
from hsae.models.codes import Codes, SparseCodes
from hsae.models.kernels import (
    DEFAULT_CHUNK_ROWS,
    TopKSelection,
    compute_dtype_of,
    dense_aux_codes,
    encode_topk_chunked,
    encoder_matmul,
    remove_parallel_component_,
    sparse_decode,
    sparse_encoder_values,
    sparse_topk_step,
)

__all__ = [
    "TopKConfig",
    "TopKSAE",
    "topk_codes",
    "aux_plan",
    "auxk_term",
    "auxk_loss",
    "sparse_decode",
    "sparse_encoder_values",
    "encode_topk_chunked",
    "encoder_matmul",
]

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TopKConfig(SAEConfig):
    k: int | None = 32
    # Latents used by the AuxK loss; None means d_in // 2 (as in sparsify), capped by the dead count.
    aux_k: int | None = None
    aux_coef: float = 1 / 32
    # dtype of the encoder matmul ("float32", or "bfloat16" for speed); weights stay float32.
    compute_dtype: str = "float32"

    def validate(self) -> None:
        if self.k is None:
            raise HsaeError(f"the {self.arch} family needs --k (active latents per token)")
        super().validate()
        if self.aux_coef < 0:
            raise HsaeError("aux_coef must be >= 0")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise HsaeError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")


def topk_codes(pre: Tensor, k: int) -> SparseCodes:
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return SparseCodes(indices, values.relu(), pre.shape[-1])


def aux_plan(model: SAE, ctx: StepContext | None, aux_k: int) -> tuple[Tensor | None, int]:
    """(dead latent ids, k_aux) when the AuxK term applies this step, else (None, 0)."""
    if ctx is None or ctx.dead_mask is None or model.config.aux_coef == 0:  # type: ignore[attr-defined]
        return None, 0
    dead_cols = ctx.dead_mask.nonzero().squeeze(1).to(model.W_enc.device)
    if dead_cols.numel() == 0:
        return None, 0
    return dead_cols, min(aux_k, dead_cols.numel())


def auxk_term(model: SAE, xn: Tensor, xn_hat: Tensor, values: Tensor, indices: Tensor) -> dict[str, Tensor]:
    """Weighted AuxK loss of the dead latents' codes (values, indices) on the live residual."""
    residual = (xn - xn_hat).detach()
    residual_hat = sparse_decode(indices, values, model.W_dec)
    loss = (residual_hat - residual).pow(2).sum(-1).mean()
    return {"auxk": model.config.aux_coef * torch.nan_to_num(loss)}  # type: ignore[attr-defined]


# The AuxK term over few dead latents is cheaper as a dense block on their columns than as sparse
# entries (kernels.dense_aux_codes; the fused step takes either): with k_aux near the dead count the
# entries are a dense block anyway, and small matmuls run many times faster per entry than gathers.
# Used while the (n, n_dead) block stays under this many elements; above it the sparse entries keep
# memory flat.
DENSE_AUXK_MAX_ELEMENTS = 2**21


def use_dense_auxk(n: int, dead_cols: Tensor | None) -> bool:
    return dead_cols is not None and n * dead_cols.numel() <= DENSE_AUXK_MAX_ELEMENTS


def auxk_loss(
    model: SAE, xn: Tensor, pre: Tensor, xn_hat: Tensor, ctx: StepContext | None, aux_k: int
) -> dict[str, Tensor]:
    """Gao et al.'s AuxK term: dead latents reconstruct the residual of the live ones (the k_aux
    largest pre-activations among the dead latents, ReLU'd; gradients flow through `pre`)."""
    dead_cols, k_aux = aux_plan(model, ctx, aux_k)
    if dead_cols is None:
        return {}
    values, pos = pre.index_select(1, dead_cols).topk(k_aux, dim=-1, sorted=False)
    return auxk_term(model, xn, xn_hat, values.relu(), dead_cols[pos])


@register("topk")
class TopKSAE(SAE):
    config_class = TopKConfig
    supports_k = True
    # Rows of pre-activations computed at once on the sparse training path.
    train_chunk_rows: ClassVar[int] = DEFAULT_CHUNK_ROWS
    # AuxK over few dead latents as dense blocks (`use_dense_auxk`); False: always sparse entries.
    dense_auxk: ClassVar[bool] = True

    def activate(self, pre: Tensor, k: int | None = None) -> Codes:
        k = k or self.config.k
        if not 0 < k <= self.n_latents:
            raise HsaeError(f"k must be between 1 and {self.n_latents}, got {k}")
        return topk_codes(pre, k)

    def aux_k(self) -> int:
        return self.config.aux_k or max(1, self.d_in // 2)  # type: ignore[attr-defined]

    def extra_losses(self, xn, pre, codes, xn_hat, ctx):
        return auxk_loss(self, xn, pre, xn_hat, ctx, self.aux_k())

    @property
    def _compute_dtype(self) -> torch.dtype | None:
        """dtype of the encoder matmul; None: the weights' own (float32 means "no cast")."""
        name = self.config.compute_dtype  # type: ignore[attr-defined]
        return None if name == "float32" else compute_dtype_of(name)

    def pre_activations(self, xn: Tensor) -> Tensor:
        return encoder_matmul(xn - self.b_dec, self.W_enc, self.b_enc, self._compute_dtype)

    # ----- the sparse training path ------------------------------------------------------------
    def _sparse_path_ok(self) -> bool:
        """The sparse path reproduces `activate` + `extra_losses` of the families it knows; a
        subclass that changes either (and keeps this forward) gets the dense formulation."""
        cls = type(self)
        return (
            self.training
            and torch.is_grad_enabled()
            and self.W_enc.requires_grad
            and cls.activate in _SPARSE_ACTIVATES
            and cls.extra_losses is TopKSAE.extra_losses
        )

    def _select_train(
        self, xc: Tensor, dead_cols: Tensor | None, k_aux: int
    ) -> tuple[SparseCodes, tuple[Tensor, Tensor] | None]:
        """Training codes (values without autograd) and the AuxK entries, from xc = xn - b_dec."""
        sel = encode_topk_chunked(
            xc,
            self.W_enc.detach(),
            self.b_enc.detach(),
            self.config.k,
            dead_cols=dead_cols,
            k_aux=k_aux,
            compute_dtype=self._compute_dtype,
            chunk_rows=self.train_chunk_rows,
        )
        codes = SparseCodes(sel.indices, sel.values, self.n_latents)
        aux = None if sel.aux_values is None else (sel.aux_values, sel.aux_indices)
        return codes, aux

    def _select_sparse(self, x: Tensor, dead_cols: Tensor | None, k_aux: int) -> TopKSelection:
        """Training codes and AuxK entries (no autograd) of raw inputs x: the pre-activations
        (scale * x - b_dec) @ W_enc + b_enc are computed in row chunks, never all at once."""
        return encode_topk_chunked(
            x,
            self.W_enc.detach(),
            self.b_enc.detach(),
            self.config.k,
            dead_cols=dead_cols,
            k_aux=k_aux,
            compute_dtype=self._compute_dtype,
            chunk_rows=self.train_chunk_rows,
            scale=self.config.input_scale,
            b_dec=self.b_dec.detach(),
        )

    def _select_with_aux(
        self, x: Tensor, ctx: StepContext | None
    ) -> tuple[TopKSelection, tuple[Tensor, Tensor] | None]:
        """The training selection of raw inputs x and the AuxK codes: sparse entries inside the
        selection, or (dead latent ids, a dense block over their columns) when that is small
        (`use_dense_auxk`)."""
        dead_cols, k_aux = aux_plan(self, ctx, self.aux_k())
        dense = self.dense_auxk and use_dense_auxk(x.shape[0], dead_cols)
        sel = self._select_sparse(x, None if dense else dead_cols, k_aux)
        if not dense:
            return sel, None
        z = dense_aux_codes(
            x, self.config.input_scale, self.W_enc.detach(), self.b_enc.detach(), self.b_dec.detach(), dead_cols, k_aux
        )
        return sel, (dead_cols, z)

    def forward(self, x: Tensor, ctx: StepContext | None = None) -> SAEOutput:
        if not self._sparse_path_ok():
            return super().forward(x, ctx)
        if x.dim() != 2 or x.shape[-1] != self.d_in:
            self.scale_in(x)  # raises the shape error
        x = x.to(dtype=self.W_enc.dtype, device=self.W_enc.device)
        sel, dense_aux = self._select_with_aux(x, ctx)
        x_hat, mse, auxk = sparse_topk_step(
            x,
            self.config.input_scale,
            self.W_enc,
            self.b_enc,
            self.W_dec,
            self.b_dec,
            sel,
            self.config.aux_coef,
            dense_aux,  # type: ignore[attr-defined]
        )
        losses = {"mse": mse}
        if auxk is not None:
            losses["auxk"] = auxk
        codes = SparseCodes(sel.indices, sel.values, self.n_latents, sel.offsets)
        return SAEOutput(x_hat=x_hat, codes=codes, losses=losses)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """As the base class, in place in row blocks (no (n_latents, d_in) temporaries)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            remove_parallel_component_(self.W_dec.grad, self.W_dec)


# `activate` methods whose codes are ReLU'd pre-activations at the selected entries (batchtopk adds its own).
_SPARSE_ACTIVATES = {TopKSAE.activate}
