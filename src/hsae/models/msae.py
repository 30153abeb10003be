"""Matryoshka SAE over k (MSAE; Zaigrajew, Baniecki & Biecek 2025, "Interpreting CLIP with
Hierarchical Sparse Autoencoders", arXiv 2502.20578).

One shared pre-activation; for each k in a nesting list k_1 < ... < k_L a TopK code (the k_i
largest pre-activations, ReLU'd) and its own reconstruction; the loss is the weighted mean of the
reconstruction errors, with no sparsity term:

    L = sum_i w_i || x - (b_dec + topk_{k_i}(pre) @ W_dec) ||^2 / sum_i w_i.

Loss terms: "mse" is the largest k's term (w_L / sum w) |E_L|^2 and "nested_mse" the others'; their
sum is L. `x_hat` and the codes are those of the largest k. Inference: `encode(x, k=...)` keeps the
top k of the same pre-activations for any k (a top-k of the largest code), so one model is
evaluated at many sparsities (hsae.eval.over_k).

Options: `nesting` (default: doubling from min(64, k // 8) up to --k, i.e. the paper's 64, 128, ...
when k >= 512, and four or more levels below), `weighting` = "uw" (all 1), "rw" (reversed(1..L):
the largest weight on the smallest k, as in the authors' code) or explicit weights "w_1,...,w_L".

Where this departs from the paper (and its code, github WolodjaZ/MSAE):
- The largest nested k is --k, not the dictionary width (the paper's last level is the plain ReLU
  code of every latent): the fused sparse step costs O(K) per token, and a dense last level would
  make every step dense. Evaluate at larger k with `encode(x, k=...)` all the same.
- Inputs: hsae scales rows to mean norm sqrt(d) and learns b_dec from the mean (`-o b_dec_init=mean`
  centres exactly at the start) instead of subtracting the data mean before scaling.
- Adam, as every hsae family (the paper's AdamW has weight decay 0, the same update); hsae's learning
  rate and warm-up unless given (the paper: 1e-4 constant, linear decay over the last 20%:
  `--lr 1e-4 -o lr_warmup_steps=0`).
- No soft cap on the latents (the authors' code tanh-caps them at 30; the paper does not mention it).
- AuxK is off (`aux_coef` 0), as in the paper; `-o aux_coef=1` adds TopK's AuxK term (TopK's weight) on the
  largest k's residual.

Training runs the fused step `NestedKStep` (hsae.models.sparse.nested_k_step): one top-K selection
serves every nested k; tests/test_msae.py checks it against `forward` below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from hsae.errors import HsaeError
from hsae.models.base import SAEOutput, StepContext, TrainStep
from hsae.models.registry import register
from hsae.models.sparse.nested_k_step import NestedKStep
from hsae.models.topk import TopKConfig, TopKSAE, topk_codes

# The paper's nesting list starts at 64 and doubles.
PAPER_FIRST_K = 64
WEIGHTINGS = ("uw", "rw")


def default_nesting(k: int) -> list[int]:
    """Doubling from min(64, k // 8) (at least 1) while below k, then k."""
    ks = [min(PAPER_FIRST_K, max(1, k // 8))]
    while ks[-1] * 2 < k:
        ks.append(ks[-1] * 2)
    return ks + [k] if ks[-1] != k else ks


@dataclass
class MSAEConfig(TopKConfig):
    # The nested k's, ascending, ending at --k; None: `default_nesting(k)`.
    nesting: list[int] | None = None
    # "uw", "rw" or explicit weights "w_1,...,w_L" (one per nested k, >= 0, not all 0).
    weighting: str = "uw"
    aux_coef: float = 0.0  # the paper has no auxiliary loss

    def validate(self) -> None:
        super().validate()
        ks = self.nested_ks()
        if any(b <= a for a, b in zip(ks, ks[1:], strict=False)) or ks[0] < 1:
            raise HsaeError(f"nesting must be positive and strictly increasing, got {ks}")
        if ks[-1] != self.k:
            raise HsaeError(
                f"nesting ends at {ks[-1]} but --k is {self.k}: the largest nested k is --k; pass --k {ks[-1]} "
                f"or end the list at {self.k}"
            )
        self.level_weights()

    def nested_ks(self) -> list[int]:
        return list(self.nesting) if self.nesting else default_nesting(self.require_k())

    def level_weights(self) -> list[float]:
        """The weight of each nested k, normalised to sum 1."""
        levels = len(self.nested_ks())
        name = self.weighting.strip().lower()
        if name == "uw":
            raw = [1.0] * levels
        elif name == "rw":
            raw = [float(levels - i) for i in range(levels)]
        else:
            try:
                raw = [float(w) for w in name.split(",")]
            except ValueError:
                raw = []
            if len(raw) != levels or any(not 0 <= w < math.inf for w in raw) or sum(raw) <= 0:
                raise HsaeError(
                    f"weighting {self.weighting!r}: give uw, rw or {levels} non-negative weights, not all 0, "
                    f"one per nested k {self.nested_ks()} (e.g. -o weighting={','.join(['1'] * levels)})"
                )
        total = sum(raw)
        return [w / total for w in raw]


@register("msae")
class MSAE(TopKSAE[MSAEConfig]):
    config_class = MSAEConfig
    train_step: ClassVar[TrainStep] = NestedKStep()

    def nesting(self) -> list[int]:
        return self.config.nested_ks()

    def level_weights(self) -> list[float]:
        return self.config.level_weights()

    def forward(self, x: Tensor, ctx: StepContext | None = None) -> SAEOutput:
        """The reference formulation: one TopK code and reconstruction per nested k, dense."""
        xn = self.scale_in(x)
        pre = self.pre_activations(xn)
        terms = []
        for k in self.nesting():
            codes = topk_codes(pre, k)
            xn_hat = self.decode_normalized(codes)
            terms.append((xn_hat - xn).pow(2).sum(-1).mean())
        weights = self.level_weights()
        losses = {"mse": weights[-1] * terms[-1]}
        if len(terms) > 1:
            losses["nested_mse"] = torch.stack([w * t for w, t in zip(weights[:-1], terms[:-1], strict=True)]).sum()
        losses.update(self.extra_losses(xn, pre, codes, xn_hat, ctx))
        return SAEOutput(x_hat=xn_hat / self.config.input_scale, codes=codes, losses=losses)


__all__ = ["MSAE", "MSAEConfig", "default_nesting"]
