"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Codes keep the k largest pre-activations of each token (ReLU'd), as sparse (indices, values). The
AuxK loss (hsae.models.auxk) revives dead latents: the k_aux largest pre-activations among latents
dead for the trainer's window reconstruct the main reconstruction's residual, weighted by `aux_coef`
(1, as SAELens; the paper's 1/32 weighs a loss normalised by the residual's variance, which hsae's
raw squared error is not: docs/hierarchy.md, "AuxK's weight").

`forward` is the dense reference formulation; training runs the fused sparse step
(`FusedTopKStep(selection=PerTokenTopK())`, hsae.models.sparse): pre-activations in row chunks
without autograd, only the selected entries kept, one custom autograd function for decoder, losses
and all four gradients. The cost of a step is the encoder matmul plus O(k + k_aux) per token, with
the same codes, losses and gradients as `forward` (tests/test_kernels.py). Peak memory is about
parameters + Adam state + batch + gradients + two (n, d_in) tensors + one pre-activation chunk.

`compute_dtype = "bfloat16"` chooses the active latents from a bf16 encoder matmul (several times
faster on CPUs with AVX-512 bf16/AMX and on GPUs) and then computes their values exactly in float32
(k dot products per token), so codes, losses and gradients are the float32 model's at the chosen
entries; only near-ties at the k-th value may choose differently (`benchmarks/train_speed.py`
measures how often). Weights stay float32. Implemented for this family (per-token TopK) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

from hsae.config import SAEConfig
from hsae.errors import HsaeError
from hsae.models.auxk import auxk_loss
from hsae.models.base import SAE, StepContext, TrainStep
from hsae.models.codes import Codes, SparseCodes
from hsae.models.registry import register
from hsae.models.sparse.ops import compute_dtype_of, encoder_matmul, remove_parallel_component_
from hsae.models.sparse.selection import exact_values
from hsae.models.sparse.steps import FusedTopKStep, PerTokenTopK

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class TopKConfig(SAEConfig):
    k: int | None = 32
    # Latents used by the AuxK loss; None means d_in // 2 (as in sparsify), capped by the dead count.
    aux_k: int | None = None
    aux_coef: float = 1.0
    # dtype of the encoder matmul ("float32", or "bfloat16" for speed); weights stay float32.
    compute_dtype: str = "float32"

    def validate(self) -> None:
        if self.k is None:
            raise HsaeError(f"the {self.arch} family needs --k (active latents per token)")
        super().validate()
        if self.aux_coef < 0:
            raise HsaeError(f"aux_coef must be >= 0, got {self.aux_coef}")
        if self.aux_k is not None and self.aux_k <= 0:
            raise HsaeError(f"aux_k must be positive (or none: d_in // 2), got {self.aux_k}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise HsaeError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.compute_dtype != "float32" and self.arch != "topk":
            raise HsaeError(f"compute_dtype {self.compute_dtype} (screened selection) is implemented for topk only")


def topk_codes(pre: Tensor, k: int) -> SparseCodes:
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return SparseCodes(indices, values.relu(), pre.shape[-1])


TC = TypeVar("TC", bound=TopKConfig)


@register("topk")
class TopKSAE(SAE[TC]):
    config_class = TopKConfig
    supports_k = True
    train_step: ClassVar[TrainStep] = FusedTopKStep(selection=PerTokenTopK())

    def activate(self, pre: Tensor, k: int | None = None) -> Codes:
        k = k or self.config.k
        if k is None or not 0 < k <= self.n_latents:
            raise HsaeError(f"k must be between 1 and {self.n_latents}, got {k}")
        return topk_codes(pre, k)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """dtype of the matmul that chooses the active latents; None: the weights' own (exact)."""
        name = self.config.compute_dtype
        return None if name == "float32" else compute_dtype_of(name)

    def screening_scores(self, xn: Tensor) -> Tensor | None:
        """The low-precision pre-activations that choose the active latents (no autograd), or None
        when the exact ones choose them."""
        if self.compute_dtype is None:
            return None
        with torch.no_grad():
            return encoder_matmul(xn - self.b_dec, self.W_enc, self.b_enc, self.compute_dtype)

    def select(self, xn: Tensor, pre: Tensor) -> Codes:
        scores = self.screening_scores(xn)
        if scores is None:
            return self.activate(pre)
        indices = scores.topk(self.config.require_k(), dim=-1, sorted=False).indices
        return SparseCodes(indices, pre.gather(1, indices).relu(), self.n_latents)

    def encode_normalized(self, xn: Tensor, k: int | None = None) -> Codes:
        scores = self.screening_scores(xn)
        if scores is None:
            return self.activate(self.pre_activations(xn), k)
        k = k or self.config.require_k()
        if not 0 < k <= self.n_latents:
            raise HsaeError(f"k must be between 1 and {self.n_latents}, got {k}")
        indices = scores.topk(k, dim=-1, sorted=False).indices
        values = exact_values(xn - self.b_dec, self.W_enc.t().contiguous(), self.b_enc, indices)
        return SparseCodes(indices, values, self.n_latents)

    def aux_k(self) -> int:
        """Latents used by the AuxK term: config.aux_k, or d_in // 2 (as in sparsify)."""
        return self.config.aux_k or max(1, self.d_in // 2)

    def extra_losses(self, xn, pre, codes, xn_hat, ctx: StepContext | None) -> dict[str, Tensor]:
        return auxk_loss(self, xn, pre, xn_hat, ctx, self.screening_scores(xn))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """As the base class, in place in row blocks (no (n_latents, d_in) temporaries)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            remove_parallel_component_(self.W_dec.grad, self.W_dec)


__all__ = ["TopKConfig", "TopKSAE", "topk_codes"]
