"""Matryoshka SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025, arXiv 2503.17547; Nabeshima's
random-prefix variant).

A BatchTopK SAE whose latents are split into nested groups: prefix i is latents [0, m_i). The loss
sums the reconstruction error of every prefix,

    L = sum_i w_i || x - (b_dec + f[:, :m_i] @ W_dec[:m_i]) ||^2 + aux_coef * AuxK,

with the top-k taken once over the full dictionary (each prefix uses the active latents that fall
inside it; no separate top-k per prefix), as in the authors' code. Loss terms: "mse" is the full
dictionary's error (the last prefix, weight 1), "prefix_mse" the strict prefixes' errors, each
weighted `prefix_weight`; their sum is L. Early latents therefore have to reconstruct on their own
and learn general (parent) features. The paper sums the prefixes with weight 1; hsae's default is
0.25 (measured: higher MCC, explained variance and edge F1 on SAELens's synthetic hierarchies over
three seeds, more true edges on hsae's claim forest, lower FVU on MiniLM; docs/hierarchy.md).

Groups (choices, where the papers leave room):
- Fixed (default, as in the paper's Gemma runs, "slightly better"): `group_fractions`, the size of
  each group as a fraction of n_latents, default the repository's [1/16, 1/16, 1/8, 1/4, 1/2]; the
  last group takes the rounding remainder.
- Sampled (`sampled_groups=true`, Nabeshima): each step draws `n_sampled_prefixes - 1` distinct cut
  points from a truncated Pareto law over {min_prefix, ..., m-1} (CDF 1 - (l/(m-min_prefix+1))^0.5,
  short prefixes favoured), plus m. The draws use torch's global RNG, which the trainer checkpoints,
  so resumed runs stay exact. Nabeshima's latent-permutation trick (re-sorting latents by usage) is
  not implemented; his ReLU + cumulative L1 activation is not used (this family is BatchTopK).
- Inference: BatchTopK's learned global threshold (or `encode(x, k=...)` for per-token TopK).

`forward` is the dense reference formulation; training runs the fused sparse step, as TopK and
BatchTopK do: BatchTopK's selection, then the nested-prefix step (hsae.models.sparse.prefix_step,
declared as `FusedTopKStep(selection=BatchTopK(), groups=group_bounds)`) for the prefix losses,
AuxK and all gradients; no (n, n_latents) tensor enters autograd, and the extra cost over BatchTopK
is one more sparse decode and a few (n, d_in) passes per group.

There is no built-in tree: `hierarchy()` returns the forest found post hoc (hsae.interpret.forest;
`hsae tree DIR --data ... --save`), all -1 until then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from hsae.errors import HsaeError
from hsae.models.base import SAEOutput, StepContext
from hsae.models.batchtopk import BatchTopKConfig, BatchTopKSAE
from hsae.models.codes import SparseCodes, to_dense
from hsae.models.partition import bounds_from_fractions, group_of_latents
from hsae.models.registry import register
from hsae.models.sparse.ops import sparse_decode
from hsae.models.sparse.steps import BatchTopK, FusedTopKStep


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    group_fractions: list[float] = field(default_factory=lambda: [1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2])
    sampled_groups: bool = False
    n_sampled_prefixes: int = 5
    min_prefix: int = 1
    pareto_power: float = 0.5
    # weight of each strict prefix's reconstruction error against the full dictionary's
    prefix_weight: float = 0.25
    # models saved before prefix_weight existed were trained with the plain sum (hsae.config.from_dict)
    ADDED_FIELDS: ClassVar[dict[str, Any]] = {"prefix_weight": 1.0}

    def validate(self) -> None:
        super().validate()
        if not self.group_fractions or any(f <= 0 for f in self.group_fractions):
            raise HsaeError("group_fractions must be a non-empty list of positive numbers, e.g. 0.25,0.75")
        if len(self.fixed_bounds()) != len(self.group_fractions) + 1:
            raise HsaeError(
                f"group_fractions {self.group_fractions} give an empty group with n_latents {self.n_latents}; "
                "use fewer or larger groups"
            )
        if self.n_sampled_prefixes < 1 or (self.sampled_groups and self.n_sampled_prefixes > self.n_latents):
            raise HsaeError(
                f"matryoshka: n_sampled_prefixes must be between 1 and n_latents ({self.n_latents}), "
                f"got {self.n_sampled_prefixes}"
            )
        if not 1 <= self.min_prefix < max(2, self.n_latents):
            raise HsaeError(
                f"matryoshka: min_prefix must be between 1 and n_latents-1 ({self.n_latents - 1}), "
                f"got {self.min_prefix}"
            )
        if not self.pareto_power > 0:
            raise HsaeError(
                f"matryoshka: pareto_power (the exponent of the prefix lengths' Pareto law) must be > 0, "
                f"got {self.pareto_power}"
            )

        if not self.prefix_weight >= 0:
            raise HsaeError(
                f"matryoshka: prefix_weight (each strict prefix's loss weight) must be >= 0, got {self.prefix_weight}"
            )

    def fixed_bounds(self) -> list[int]:
        return bounds_from_fractions(self.n_latents, self.group_fractions)


@register("matryoshka")
class MatryoshkaSAE(BatchTopKSAE[MatryoshkaConfig]):
    config_class = MatryoshkaConfig

    def group_bounds(self) -> list[int]:
        """[0, m_1, ..., m] for this step (sampled groups draw new cuts while training)."""
        cfg = self.config
        if not (cfg.sampled_groups and self.training):
            return cfg.fixed_bounds()
        m, lo = cfg.n_latents, cfg.min_prefix
        n_cuts = min(cfg.n_sampled_prefixes - 1, m - lo)
        if n_cuts <= 0:
            return [0, m]
        lengths = torch.arange(lo, m, dtype=torch.float64)
        span = m - lo + 1
        cdf_hi = 1 - ((lengths - lo + 1) / span) ** cfg.pareto_power
        cdf_lo = 1 - ((lengths - lo) / span) ** cfg.pareto_power
        pmf = (cdf_lo - cdf_hi).clamp_min(0)
        cuts = lengths[torch.multinomial(pmf, n_cuts, replacement=False)].long().sort().values.tolist()
        return [0, *cuts, m]

    train_step = FusedTopKStep(selection=BatchTopK(), groups=group_bounds)

    def _prefix_losses(self, xn: Tensor, idx: Tensor, val: Tensor, off: Tensor | None) -> tuple[Tensor, dict]:
        """b_dec plus each group's decoded codes, cumulatively; the loss of every prefix. Each group
        decodes only its own entries (CSR per group), so all groups together cost one decode."""
        n = xn.shape[0]
        if off is None:  # fixed-width (n, k) codes
            k = idx.shape[1]
            idx, val = idx.reshape(-1), val.reshape(-1)
            off = torch.arange(0, n * k + 1, k, device=idx.device)
        rows = torch.arange(n, device=idx.device).repeat_interleave(off.diff(), output_size=idx.numel())
        xn_hat = self.b_dec.expand_as(xn)
        prefix_losses = []
        bounds = self.group_bounds()
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=False):
            in_group = (idx >= lo) & (idx < hi)
            if bool(in_group.any()):
                counts = torch.bincount(rows[in_group], minlength=n)
                off_g = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
                xn_hat = xn_hat + sparse_decode(idx[in_group], val[in_group], self.W_dec, off_g)
            prefix_losses.append((xn_hat - xn).pow(2).sum(-1).mean())
        losses = {"mse": prefix_losses[-1]}
        if len(prefix_losses) > 1:
            losses["prefix_mse"] = self.config.prefix_weight * torch.stack(prefix_losses[:-1]).sum()
        return xn_hat, losses

    def forward(self, x: Tensor, ctx: StepContext | None = None) -> SAEOutput:
        xn = self.scale_in(x)
        pre = self.pre_activations(xn)
        codes = self.activate(pre)
        if isinstance(codes, SparseCodes):
            idx, val, off = codes.indices, codes.values, codes.offsets
        else:  # dense threshold codes (eval mode)
            sc = SparseCodes.from_dense(to_dense(codes))
            idx, val, off = sc.indices, sc.values, sc.offsets
        xn_hat, losses = self._prefix_losses(xn, idx, val, off)
        losses.update(self.extra_losses(xn, pre, codes, xn_hat, ctx))
        return SAEOutput(x_hat=xn_hat / self.config.input_scale, codes=codes, losses=losses)

    def latent_groups(self) -> Tensor:
        """Group index of each latent under the fixed groups."""
        b = self.config.fixed_bounds()
        return group_of_latents(b)


__all__ = ["MatryoshkaConfig", "MatryoshkaSAE"]
