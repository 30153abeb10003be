"""H-SAE (Muchane, Richardson, Park & Veitch 2025, arXiv 2506.01197): a top-level TopK SAE whose every
latent owns a small child SAE ("expert") working in a learned s-dimensional subspace; a child is
computed only when its parent is among the top-k.

Forward (Algorithm 1):
    z  = TopK_k(relu(E (x - b_dec)))                  top level, n_top latents
    for each active parent j:  u_j = P_down[j] (x - b_dec)         (s,)
                               zz_j = TopK_1(relu(E_j u_j))        exactly one child (or none if <= 0)
    x_hat = b_dec + D z + sum_j P_up[j] D_j zz_j
Loss: ||x - x_hat||^2 + beta ||x - (b_dec + D z)||^2 ("top_mse") + lambda1 L_ortho + lambda2 (||z||_1 +
sum ||zz_j||_1), with L_ortho = ||E D - diag(E D)||_F / (n_top^2 - n_top) on the top level, and the
three weights warmed up linearly from 0 over `warmup_steps` (paper: 1000; capped here at 10% of the
run so that short runs see the full weights). Paper defaults: beta 0.1 (here 1: measured, see
docs/hierarchy.md), lambda1 0.1, lambda2 0.001, m_low 16 with s 4 (or 64 with 8).

--k is the L0 of parents and children together (matched with the other families): ceil(k / 2)
parents, and the strongest floor(k / 2) of them each with its one child (the paper's k counts the
parents only, so its L0 is up to 2k).

Latent layout (n_latents = n_top * (1 + m_low); choose --n-latents as a multiple of 1 + m_low):
latents [0, n_top) are the parents; latent n_top + j * m_low + c is child c of parent j.
`W_dec` (n_latents, d_in) is computed, not stored: rows [0, n_top) are D's unit-norm columns, row
n_top + j*m_low + c is P_up[j] @ D_j[:, c], the child's direction in the input space — not unit norm
(`unit_norm_decoder = False`), so that decode(codes) = b_dec + codes @ W_dec holds exactly for the
full code. `W_enc` likewise (d_in, n_latents): the top encoder, and P_down[j]^T E_j^T for children.
Codes are (n, 2 ceil(k/2)) SparseCodes: the parents, then each one's child (value 0 when none fires).

Choices where the paper is unclear or the small scale asks for it: relu (LeakyReLU slope 0; the
paper's alpha ~ 1/sqrt(d) threshold is not used), untied weights, input centred by b_dec like the other
hsae families (the paper does not centre), D and D_j columns kept at unit norm after each step
(gradient projected), no AuxK (the orthogonality term replaces it). Initialisation: D random unit
rows with E = D^T; each expert's projections start tied, P_up[j] = a random orthonormal (d, s) basis
and P_down[j] = its transpose (the official JAX code ties them throughout; here they train freely),
E_j = D_j random unit rows, so a child's direction starts at unit norm like its parent's.
Option `orthogonal_children=true` (not in the paper; Park et al.'s geometry, which motivates H-SAE,
has child-minus-parent vectors orthogonal to the parent): each expert's effective up-projection is
P_up[j] with its component along D_j removed, so a child can only add what its parent's direction
does not carry, and W_dec's child rows are those offsets. What was measured with each option, and
why the top latents absorb their children on hsae's claim forest, is in docs/hierarchy.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hsae.config import SAEConfig
from hsae.errors import HsaeError
from hsae.models.base import SAE, SAEOutput, StepContext
from hsae.models.codes import Codes, SparseCodes, to_dense
from hsae.models.registry import register
from hsae.models.sparse.ops import sparse_decode


@dataclass
class HSAEConfig(SAEConfig):
    k: int | None = 32
    m_low: int = 16
    subspace_dim: int = 4
    # The weight of the top level's own reconstruction; the paper's 0.1 lets the top level leave its
    # children's share to the experts, which recovers fewer edges (docs/hierarchy.md).
    beta: float = 1.0
    ortho_coef: float = 0.1
    l1_coef: float = 0.001
    warmup_steps: int = 1000
    # Keep each expert's output subspace orthogonal to its parent's decoder direction (an option,
    # see the module docstring); false (default) is the paper's unconstrained P_up.
    orthogonal_children: bool = False

    @property
    def n_top(self) -> int:
        return self.n_latents // (1 + self.m_low)

    def validate(self) -> None:
        if self.k is None:
            raise HsaeError("the h-sae family needs --k (active latents per token, parents and children together)")
        for name in ("m_low", "subspace_dim"):
            if getattr(self, name) < 1:
                raise HsaeError(f"h-sae: {name} must be >= 1, got {getattr(self, name)}")
        if self.subspace_dim > self.d_in:
            raise HsaeError(f"h-sae: subspace_dim {self.subspace_dim} cannot exceed d_in {self.d_in}")
        if self.n_latents % (1 + self.m_low):
            n_top = max(1, self.n_latents // (1 + self.m_low))
            raise HsaeError(
                f"h-sae: --n-latents must be a multiple of 1 + m_low = {1 + self.m_low} (n_top parents, each "
                f"with m_low children); e.g. --n-latents {n_top * (1 + self.m_low)}"
            )
        super().validate()
        if not 0 < (self.k + 1) // 2 < self.n_top:
            raise HsaeError(
                f"h-sae: --k {self.k} counts parents and children (one child each), so (k + 1) // 2 parents must be "
                f"below the number of top latents {self.n_top}"
            )
        for name in ("beta", "ortho_coef", "l1_coef"):
            if not getattr(self, name) >= 0:
                raise HsaeError(f"h-sae: {name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps < 1:
            raise HsaeError(
                "h-sae: warmup_steps must be >= 1 (1: the full loss weights from the first step), "
                f"got {self.warmup_steps}"
            )


@register("h-sae")
class HSAE(SAE[HSAEConfig]):
    config_class = HSAEConfig
    unit_norm_decoder = False
    builtin_hierarchy = True
    supports_k = True

    def create_weights(self) -> None:
        """The top SAE (E, D), each expert's projections and child SAE; W_enc and W_dec are computed
        from them. Each child's parent is its expert's top latent."""
        config = self.config
        d, n, m, s = config.d_in, config.n_top, config.m_low, config.subspace_dim
        self.E = nn.Parameter(torch.empty(d, n))  # top encoder (columns)
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.D = nn.Parameter(torch.empty(n, d))  # top decoder rows
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.P_down = nn.Parameter(torch.empty(n, s, d))
        self.P_up = nn.Parameter(torch.empty(n, d, s))
        self.E_low = nn.Parameter(torch.empty(n, m, s))
        self.D_low = nn.Parameter(torch.empty(n, m, s))  # child decoder rows in the subspace
        self.parents[n:] = torch.arange(n).repeat_interleave(m)

    def reset_parameters(self) -> None:
        cfg = self.config
        d, s = cfg.d_in, cfg.subspace_dim
        with torch.no_grad():
            w = torch.randn_like(self.D)
            w /= w.norm(dim=1, keepdim=True)
            self.D.copy_(w)
            self.E.copy_(w.T)
            self.b_enc.zero_()
            self.b_dec.zero_()
            # Each expert's subspace: a random orthonormal basis (d, s), P_up = basis and P_down =
            # basis^T (the official code ties them; here they start tied and train freely), so a
            # child's input-space direction P_up D_j[c] starts at unit norm, like the parents'.
            basis = torch.linalg.qr(torch.randn(self.P_up.shape[0], d, s, dtype=torch.float64)).Q
            self.P_up.copy_(basis.to(self.P_up.dtype))
            self.P_down.copy_(basis.transpose(1, 2).to(self.P_down.dtype))
            v = torch.randn_like(self.D_low)
            v /= v.norm(dim=-1, keepdim=True)
            self.D_low.copy_(v)
            self.E_low.copy_(v)

    # ----- the input-space view --------------------------------------------------------------
    @property
    def n_top(self) -> int:
        return self.config.n_top

    @property
    def W_dec(self) -> Tensor:
        """(n_latents, d_in), computed (read-only): parents' rows of D, then children's P_up D_j[c]."""
        child = torch.einsum("nds,nms->nmd", self.up(), self.D_low).reshape(-1, self.d_in)
        return torch.cat([self.D, child], 0)

    @W_dec.setter
    def W_dec(self, value: Tensor) -> None:
        raise HsaeError("h-sae computes W_dec from D, P_up and D_low; set those instead")

    @property
    def W_enc(self) -> Tensor:
        """(d_in, n_latents), computed (read-only): E, then children's P_down^T E_j."""
        child = torch.einsum("nsd,nms->nmd", self.P_down, self.E_low).reshape(-1, self.d_in)
        return torch.cat([self.E.T, child], 0).T

    @W_enc.setter
    def W_enc(self, value: Tensor) -> None:
        raise HsaeError("h-sae computes W_enc from E, P_down and E_low; set those instead")

    def up(self, experts: Tensor | None = None) -> Tensor:
        """The effective up-projections (..., d_in, s) of `experts` (all when None): P_up, minus its
        component along the expert's parent direction D_j when `orthogonal_children` is set."""
        P = self.P_up if experts is None else self.P_up[experts]
        if not self.config.orthogonal_children:
            return P
        Dj = self.D if experts is None else self.D[experts]  # (..., d), unit norm
        Dj = Dj / Dj.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        along = torch.einsum("...d,...ds->...s", Dj, P)
        return P - Dj[..., :, None] * along[..., None, :]

    def hierarchy(self) -> Tensor:
        return self.parents.detach().clone().cpu()

    def set_hierarchy(self, parents: Tensor) -> None:
        raise HsaeError("the h-sae family has a built-in tree (each child belongs to its expert); it cannot be set")

    # ----- encode / decode ---------------------------------------------------------------------
    def scale_in(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[-1] != self.d_in:
            raise HsaeError(f"expected activations of shape (n, {self.d_in}), got {tuple(x.shape)}")
        x = x.to(dtype=self.D.dtype, device=self.D.device)
        s = self.config.input_scale
        return x if s == 1.0 else x * s

    def pre_activations(self, xn: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, xn - self.b_dec, self.E)

    def _encode(self, xn: Tensor, k: int | None = None):
        """k is the L0 of parents and children together: ceil(k / 2) parents, the strongest
        floor(k / 2) of them with their one child."""
        k = k or self.config.require_k()
        n_par = (k + 1) // 2
        if not 0 < n_par <= self.n_top:
            raise HsaeError(f"h-sae: k (parents and children) must be between 1 and {2 * self.n_top}, got {k}")
        xc = xn - self.b_dec
        pre = torch.addmm(self.b_enc, xc, self.E)
        top_val, top_idx = pre.topk(n_par, dim=-1, sorted=True)
        top_val = top_val.relu()
        u = torch.einsum("bksd,bd->bks", self.P_down[top_idx], xc)  # (B, k, s)
        child_pre = torch.einsum("bkms,bks->bkm", self.E_low[top_idx], u)  # (B, k, m_low)
        c_val, c_idx = child_pre.max(dim=-1)
        c_val = c_val.relu() * (top_val > 0)  # children only under an active parent
        if k % 2:  # an odd L0: the weakest parent goes without its child
            c_val = torch.cat([c_val[:, :-1], torch.zeros_like(c_val[:, -1:])], 1)
        child_global = self.n_top + top_idx * self.config.m_low + c_idx
        return pre, top_idx, top_val, c_idx, c_val, child_global

    def encode_normalized(self, xn: Tensor, k: int | None = None) -> Codes:
        _, top_idx, top_val, _, c_val, child_global = self._encode(xn, k)
        return SparseCodes(torch.cat([top_idx, child_global], 1), torch.cat([top_val, c_val], 1), self.n_latents)

    def activate(self, pre: Tensor, k: int | None = None) -> Codes:
        raise HsaeError("h-sae encodes through its experts; use encode()")

    def decode_normalized(self, codes: Codes) -> Tensor:
        if isinstance(codes, SparseCodes) and not codes.is_ragged:
            return self._decode_sparse(codes.indices, codes.values)
        dense = to_dense(codes).to(self.D.dtype)
        return torch.addmm(self.b_dec, dense, self.W_dec)

    def _decode_sparse(self, idx: Tensor, val: Tensor) -> Tensor:
        """b_dec + sum of parent rows of D and child directions P_up[j] D_j[c], without the full W_dec."""
        n, m = self.n_top, self.config.m_low
        is_top = idx < n
        out = sparse_decode(torch.where(is_top, idx, torch.zeros_like(idx)), val * is_top, self.D)
        child = (idx - n).clamp_min(0)
        j, c = torch.div(child, m, rounding_mode="floor"), child % m
        low = self.D_low[j, c]  # (B, K, s)
        contrib = torch.einsum("bkds,bks->bkd", self.up(j), low * (val * ~is_top)[..., None])
        return out + contrib.sum(1) + self.b_dec

    def forward(self, x: Tensor, ctx: StepContext | None = None) -> SAEOutput:
        cfg = self.config
        xn = self.scale_in(x)
        pre, top_idx, top_val, c_idx, c_val, child_global = self._encode(xn)
        x_top = sparse_decode(top_idx, top_val, self.D) + self.b_dec
        low = self.D_low[top_idx, c_idx] * c_val[..., None]  # (B, k, s)
        x_low = torch.einsum("bkds,bks->bd", self.up(top_idx), low)
        xn_hat = x_top + x_low
        codes = SparseCodes(torch.cat([top_idx, child_global], 1), torch.cat([top_val, c_val], 1), self.n_latents)
        losses = {"mse": (xn_hat - xn).pow(2).sum(-1).mean()}
        ramp = 1.0
        if ctx is not None:
            warm = min(cfg.warmup_steps, max(1, ctx.total_steps // 10))
            ramp = min(1.0, (ctx.step + 1) / warm)
        if cfg.beta:
            losses["top_mse"] = ramp * cfg.beta * (x_top - xn).pow(2).sum(-1).mean()
        if cfg.ortho_coef:
            ed = self.D @ self.E  # (n_top, n_top): [i, j] = D_i . E_j
            off = ed - torch.diag_embed(ed.diagonal())
            losses["ortho"] = ramp * cfg.ortho_coef * off.norm() / (self.n_top**2 - self.n_top)
        if cfg.l1_coef:
            losses["l1"] = ramp * cfg.l1_coef * (top_val.sum(-1) + c_val.sum(-1)).mean()
        return SAEOutput(x_hat=xn_hat / cfg.input_scale, codes=codes, losses=losses)

    # ----- decoder constraint: unit columns of D and of each D_j --------------------------------
    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        for w in (self.D, self.D_low):
            if w.grad is not None:
                w.grad -= (w.grad * w).sum(-1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        for w in (self.D, self.D_low):
            w.div_(w.norm(dim=-1, keepdim=True).clamp_min(1e-12))


__all__ = ["HSAEConfig", "HSAE"]
