"""ReLU SAE with an L1 penalty weighted by decoder-row norms (Anthropic, "Circuits Updates", April 2024).

f = ReLU(W_enc^T (x - b_dec) + b_enc); loss = ||x - x_hat||^2 + lambda * sum_i f_i ||W_dec,i||.
Decoder rows are not constrained to unit norm (the penalty makes their norm part of the cost); they
start at norm `decoder_init_norm` with W_enc = W_dec^T. lambda warms up over the first 5% of steps,
or follows an L0 target when `--k` is given (hsae.models.penalty).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hsae.errors import HsaeError
from hsae.models.codes import Codes
from hsae.models.penalty import PenaltyConfig, PenaltySAE
from hsae.models.registry import register


@dataclass
class ReLUConfig(PenaltyConfig):
    sparsity_coef: float = 5.0
    decoder_init_norm: float = 0.1

    def validate(self) -> None:
        super().validate()
        if not self.decoder_init_norm > 0:
            raise HsaeError(f"decoder_init_norm must be positive, got {self.decoder_init_norm}")


@register("relu")
class ReLUSAE(PenaltySAE[ReLUConfig]):
    config_class = ReLUConfig
    unit_norm_decoder = False

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.W_dec.mul_(self.config.decoder_init_norm)
            self.W_enc.copy_(self.W_dec.T)

    def activate(self, pre: Tensor, k: int | None = None) -> Codes:
        return pre.relu()

    def extra_losses(self, xn, pre, codes, xn_hat, ctx):
        l1 = (codes * self.W_dec.norm(dim=1)).sum(-1).mean()
        return {"l1": self.current_coef(ctx) * l1}
