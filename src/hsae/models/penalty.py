"""Shared by the penalty families (relu, jumprelu): the sparsity coefficient's schedule.

Without an L0 target the coefficient warms up linearly over `sparsity_warmup_fraction` of the run,
as both papers do. With a target (`--k` for these families) a controller replaces the warm-up: after
every step it multiplies the coefficient by exp(rate * clip(log(L0 / target), -1, 1)), so runs of
different families can be compared at the same L0. The coefficient lives in a buffer, so resuming a
run restores it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from hsae.config import SAEConfig
from hsae.errors import HsaeError
from hsae.models.base import SAE, SAEOutput, StepContext
from hsae.models.codes import l0_per_row


@dataclass
class PenaltyConfig(SAEConfig):
    sparsity_coef: float = 1.0
    sparsity_warmup_fraction: float = 0.05
    # Per-step log-rate of the L0 controller (used when k, the L0 target, is set).
    l0_controller_rate: float = 0.02

    def validate(self) -> None:
        super().validate()
        if self.sparsity_coef < 0 or not math.isfinite(self.sparsity_coef):
            raise HsaeError(f"sparsity_coef must be a finite number >= 0, got {self.sparsity_coef}")
        if not 0 <= self.sparsity_warmup_fraction <= 1:
            raise HsaeError(f"sparsity_warmup_fraction must be in [0, 1], got {self.sparsity_warmup_fraction}")
        if self.l0_controller_rate < 0:
            raise HsaeError(f"l0_controller_rate must be >= 0, got {self.l0_controller_rate}")


PC = TypeVar("PC", bound=PenaltyConfig)


class PenaltySAE(SAE[PC]):
    """Base of families whose sparsity comes from a loss term rather than a hard top-k."""

    sparsity_coef: Tensor

    def __init__(self, config: PC):
        super().__init__(config)
        self.register_buffer("sparsity_coef", torch.tensor(float(config.sparsity_coef)))

    def current_coef(self, ctx: StepContext | None) -> Tensor:
        cfg = self.config
        if ctx is None or cfg.k is not None or cfg.sparsity_warmup_fraction == 0:
            return self.sparsity_coef
        return self.sparsity_coef * min(1.0, ctx.progress / cfg.sparsity_warmup_fraction)

    @torch.no_grad()
    def after_step(self, out: SAEOutput, ctx: StepContext) -> None:
        target = self.config.k
        if target is None:
            return
        l0 = float(l0_per_row(out.codes).mean())
        ratio = math.log(max(l0, 1e-3) / target)
        self.sparsity_coef.mul_(math.exp(self.config.l0_controller_rate * max(-1.0, min(1.0, ratio))))
