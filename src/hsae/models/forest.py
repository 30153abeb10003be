"""HSAE feature forests (Luo, Zhan, Jiang, Liu, Wu, Zhou & Dong 2026, arXiv 2602.11881).

L SAEs of growing size n_1 < ... < n_L (`level_fractions` of n_latents, default the paper's
2048:4096:8192:16384 = 1:2:4:8), all trained on the same x, stored side by side in one dictionary:
latents of level l occupy a contiguous block. Each level-(l+1) latent may have one parent in level l
(`parents` buffer, -1 = unassigned: a partial tree); `hierarchy()` reports it.

Losses (per batch, summed):
- per level, ||SAE~_l(x) - x||^2 ("mse" for the finest level, "level_mse" for the others) plus
  lambda_l * L0 (JumpReLU straight-through estimators; "l0");
- the structural constraint rho * sum over parents i with children of ||f_i(x) - sum_{j in C_i} f_j(x)||^2
  ("pc", rho = 0.01), where f_i(x) = a_i d_i is the feature's vector output; it is computed from the
  Gram matrix of the children's decoder rows, without materialising (batch x parents x d) tensors.
- Random feature perturbation: in SAE~_l each parent with children is swapped for the sum of its
  children with probability r = 0.05, per feature and step, shared across the batch. (The paper's
  formula reads as swapping 95% of the time; we follow its stated "perturbation rate 5%".)

Hierarchy updates alternate with gradient steps: each level-(l+1) latent takes as parent the level-l
latent of highest encoder-vector cosine (`similarity=decoder` uses decoder rows); the bottom 20%
(`unassigned_fraction`) by that similarity stay unassigned. The paper updates every 5000 steps; here
the first update comes after `hierarchy_start` (10%) of the run and the next ones every
min(`hierarchy_every`, 25% of the run) steps, so short runs still get a tree.

Choices for the small scale and the hsae interface:
- --k is the L0 of all levels together (matched with the other families; the paper sets a target
  per level): each level's share is k / L, the remainder to the finest levels, at least one each
  (`ForestConfig.level_k`).
- Activation: JumpReLU per latent (`activation=jumprelu`, default; threshold and bandwidth as the
  jumprelu family) with one L0 coefficient per level steered to that level's share (the
  multiplicative controller of hsae.models.penalty; the paper's Appendix-A controller was not
  available), or `activation=topk` (each level keeps its share), a robust alternative for tiny runs.
  No ghost grads.
- One shared b_dec (the paper's levels are separate SAEs with their own biases).
- The model's reconstruction is the mean of the level reconstructions: `encode` returns the codes
  of all levels with values divided by L, so that decode(codes) = b_dec + codes @ W_dec holds
  exactly with unit-norm W_dec rows. Activity (code != 0) is unscaled, so L0 is the sum over levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from hsae.config import SAEConfig
from hsae.errors import HsaeError
from hsae.models.base import SAE, SAEOutput, StepContext
from hsae.models.codes import Codes, to_dense
from hsae.models.jump import heaviside_step, jumprelu
from hsae.models.partition import bounds_from_fractions, group_of_latents
from hsae.models.registry import register


@dataclass
class ForestConfig(SAEConfig):
    k: int | None = 50
    level_fractions: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0])
    activation: str = "jumprelu"  # jumprelu | topk
    rho: float = 0.01
    perturb_rate: float = 0.05
    hierarchy_every: int = 5000
    hierarchy_start: float = 0.1
    unassigned_fraction: float = 0.2
    similarity: str = "encoder"  # encoder | decoder
    sparsity_coef: float = 0.2
    l0_controller_rate: float = 0.02
    # As the jumprelu family (see JumpReLUConfig): the paper's 0.001 for both leaves the thresholds
    # stuck near 0 on inputs normalised to mean norm sqrt(d_in) (measured on the claim-test forest,
    # 300 steps, target 2 per level: L0 47.6 with 0.001/0.001, 15.4 with 0.1/0.05; 3.0 after 1000 steps).
    threshold_init: float = 0.1
    bandwidth: float = 0.05

    def validate(self) -> None:
        if self.k is None:
            raise HsaeError("the forest family needs --k (target L0 of all levels together)")
        super().validate()
        for name in ("threshold_init", "bandwidth"):
            if not getattr(self, name) > 0:
                raise HsaeError(f"forest: {name} must be > 0, got {getattr(self, name)}")
        for name in ("sparsity_coef", "l0_controller_rate", "rho"):
            if not getattr(self, name) >= 0:
                raise HsaeError(f"forest: {name} must be >= 0, got {getattr(self, name)}")
        if len(self.level_fractions) < 2 or any(f <= 0 for f in self.level_fractions):
            raise HsaeError("forest: level_fractions needs at least two positive numbers, e.g. 1,3")
        b = self.level_bounds()
        if len(b) != len(self.level_fractions) + 1:
            raise HsaeError(
                f"forest: level_fractions {self.level_fractions} leave a level empty at n_latents {self.n_latents}"
            )
        sizes = [hi - lo for lo, hi in zip(b[:-1], b[1:], strict=False)]
        if self.activation == "topk" and any(k >= size for k, size in zip(self.level_k(), sizes, strict=True)):
            raise HsaeError(
                f"forest: a level's share of --k {self.k} ({self.level_k()}) must be below its size {sizes}"
            )
        if self.activation not in ("jumprelu", "topk"):
            raise HsaeError(f"forest: activation must be jumprelu or topk, got {self.activation!r}")
        if self.similarity not in ("encoder", "decoder"):
            raise HsaeError(f"forest: similarity must be encoder or decoder, got {self.similarity!r}")
        for name in ("perturb_rate", "hierarchy_start"):
            if not 0 <= getattr(self, name) <= 1:
                raise HsaeError(f"forest: {name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.unassigned_fraction < 1:
            raise HsaeError(f"forest: unassigned_fraction must be in [0, 1), got {self.unassigned_fraction}")
        if self.hierarchy_every < 1:
            raise HsaeError(f"forest: hierarchy_every must be >= 1 (steps), got {self.hierarchy_every}")

    def level_bounds(self) -> list[int]:
        return bounds_from_fractions(self.n_latents, self.level_fractions)

    def level_k(self) -> list[int]:
        """Each level's share of --k (the L0 of all levels together): as even as possible, the
        remainder to the finest levels, and at least one per level (so the L0 is max(k, levels))."""
        n, k = len(self.level_fractions), self.require_k()
        return [max(1, k // n + (1 if lv >= n - k % n else 0)) for lv in range(n)]


@register("forest")
class ForestSAE(SAE[ForestConfig]):
    config_class = ForestConfig
    builtin_hierarchy = True
    level: Tensor
    sparsity_coefs: Tensor

    def __init__(self, config: ForestConfig):
        super().__init__(config)
        self.register_buffer("level", group_of_latents(config.level_bounds()))
        self.register_buffer("sparsity_coefs", torch.full((self.n_levels,), float(config.sparsity_coef)))
        self.log_threshold = nn.Parameter(torch.full((config.n_latents,), math.log(config.threshold_init)))

    @property
    def n_levels(self) -> int:
        return len(self.config.level_bounds()) - 1

    def set_hierarchy(self, parents: Tensor) -> None:
        raise HsaeError("the forest family has a built-in tree; its parents are learned, not set")

    # ----- activation ------------------------------------------------------------------------
    def level_acts(self, pre: Tensor) -> Tensor:
        """Dense (n, n_latents) activations of every level, unscaled."""
        cfg = self.config
        if cfg.activation == "jumprelu":
            return jumprelu(pre, self.log_threshold.exp(), cfg.bandwidth)
        b = cfg.level_bounds()
        out = torch.zeros_like(pre)
        for lo, hi, k in zip(b[:-1], b[1:], cfg.level_k(), strict=False):
            v, i = pre[:, lo:hi].topk(k, dim=-1, sorted=False)
            out = out.scatter(1, i + lo, v.relu())
        return out

    def activate(self, pre: Tensor, k: int | None = None) -> Codes:
        return self.level_acts(pre) / self.n_levels

    # ----- training -----------------------------------------------------------------------------
    def forward(self, x: Tensor, ctx: StepContext | None = None) -> SAEOutput:
        cfg = self.config
        L = self.n_levels
        xn = self.scale_in(x)
        pre = self.pre_activations(xn)
        acts = self.level_acts(pre)
        parents = self.parents
        has_parent = parents >= 0
        has_children = torch.zeros_like(has_parent)
        has_children[parents[has_parent]] = True
        swapped = torch.zeros_like(has_parent)
        if self.training and cfg.perturb_rate > 0 and has_parent.any():
            swapped = has_children & (torch.rand(self.n_latents, device=pre.device) < cfg.perturb_rate)
        child_of_swapped = has_parent & swapped[parents.clamp_min(0)]
        level_losses = []
        for lv in range(L):
            w = ((self.level == lv) & ~swapped) | ((self.level == lv + 1) & child_of_swapped)
            xl = torch.addmm(self.b_dec, acts * w, self.W_dec)
            level_losses.append((xl - xn).pow(2).sum(-1).mean())
        losses = {"mse": level_losses[-1], "level_mse": torch.stack(level_losses[:-1]).sum()}
        if cfg.activation == "jumprelu":
            active = heaviside_step(pre, self.log_threshold.exp(), cfg.bandwidth)  # (n, m)
            per_level = (
                torch.zeros(L, device=pre.device, dtype=pre.dtype).index_add(0, self.level, active.sum(0))
                / pre.shape[0]
            )
            losses["l0"] = (self.sparsity_coefs * per_level).sum()
        if cfg.rho > 0 and has_parent.any():
            losses["pc"] = cfg.rho * self.pc_loss(acts)
        codes = acts / L
        xn_hat = torch.addmm(self.b_dec, codes, self.W_dec)
        return SAEOutput(x_hat=xn_hat / cfg.input_scale, codes=codes, losses=losses)

    def pc_loss(self, acts: Tensor) -> Tensor:
        """Mean over the batch of sum_i ||a_i d_i - sum_{j in C_i} a_j d_j||^2."""
        parents = self.parents
        J = torch.nonzero(parents >= 0).flatten()
        P = parents[J]
        W = self.W_dec
        aJ, aP = acts[:, J], acts[:, P]
        parent_ids = torch.unique(P)
        t1 = (acts[:, parent_ids].pow(2) * W[parent_ids].pow(2).sum(-1)).sum(-1)
        t2 = -2 * (aP * aJ * (W[P] * W[J]).sum(-1)).sum(-1)
        WJ = W[J]
        G = (WJ @ WJ.T) * (P[:, None] == P[None, :])
        t3 = ((aJ @ G) * aJ).sum(-1)
        return (t1 + t2 + t3).mean()

    @torch.no_grad()
    def after_step(self, out: SAEOutput, ctx: StepContext) -> None:
        cfg = self.config
        if cfg.activation == "jumprelu":
            active = (to_dense(out.codes) != 0).float()
            per_level = torch.zeros(self.n_levels, device=active.device).index_add(0, self.level, active.sum(0))
            per_level /= active.shape[0]
            target = torch.tensor(cfg.level_k(), dtype=per_level.dtype, device=per_level.device)
            ratio = (per_level.clamp_min(1e-3) / target).log().clamp(-1, 1)
            self.sparsity_coefs.mul_((cfg.l0_controller_rate * ratio).exp())
        done = ctx.step + 1
        start = max(1, round(cfg.hierarchy_start * ctx.total_steps))
        every = max(1, min(cfg.hierarchy_every, ctx.total_steps // 4))
        if done >= start and (done - start) % every == 0:
            self.update_hierarchy()

    @torch.no_grad()
    def update_hierarchy(self) -> None:
        """Each latent of level l+1 takes the most similar latent of level l; the weakest
        `unassigned_fraction` of each level stay unassigned."""
        cfg = self.config
        vec = self.W_enc.T if cfg.similarity == "encoder" else self.W_dec
        vec = vec / vec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        b = cfg.level_bounds()
        parents = torch.full_like(self.parents, -1)
        for lv in range(1, self.n_levels):
            plo, lo, hi = b[lv - 1], b[lv], b[lv + 1]
            sim = vec[lo:hi] @ vec[plo:lo].T
            best, arg = sim.max(dim=1)
            keep = torch.ones_like(best, dtype=torch.bool)
            n_drop = int(cfg.unassigned_fraction * (hi - lo))
            if n_drop:
                keep[best.argsort()[:n_drop]] = False
            parents[lo:hi] = torch.where(keep, arg + plo, torch.full_like(arg, -1))
        self.parents.copy_(parents)


__all__ = ["ForestConfig", "ForestSAE"]
