"""MP-SAE: matching-pursuit encoding (Costa, Fel, Lubana, Tolooshams & Ba 2025, "From Flat to
Hierarchical", arXiv 2506.03093; official code mpsae/MP-SAE and KempnerInstitute/overcomplete).

The only weights are the dictionary W_dec (n_latents, d_in), unit-norm rows ("atoms"), and b_dec.
There is no encoder matrix: `W_enc` is a read-only view W_dec^T, kept for evaluators that read it.
Encoding runs k steps of matching pursuit on the centred input r = x - b_dec:

    c = W r;  j = argmax(relu(c));  a = c_j / ||w_j||^2;  z_j += a;  r -= a w_j

Atoms may be re-selected (their coefficients add up), so the realised L0 is <= k; codes are
fixed-width (n, k) SparseCodes in selection order, with a re-selected atom's total in its first slot
and 0 in the later ones. Training differentiates through the unrolled loop (indices from argmax carry
no gradient; values and residuals do). Loss: the MSE only (sparsity is k), plus optionally the
overcomplete library's dead-atom term, -revive_coef * mean(residual . w_j) over atoms dead for the
trainer's window, which pulls them towards what is left unexplained.

Two equal encoders (tests/test_hierarchical.py checks them against each other):
- "naive": recomputes c = W r with a matmul every step, O(n m d) per step.
- "gram" (default): c is computed once and updated with rows of the Gram matrix G = W W^T,
  c <- c - a G[j], O(n m) per step. G is rebuilt every training forward (W changes) and cached for
  inference. benchmarks/mp_gram.py measures the speed-up.

Choices where the sources differ: non-negative selection (argmax of relu(c), as the synthetic code;
`nonneg=false` gives overcomplete's signed argmax); a fixed number of steps (the synthetic code's
data-dependent stop is not implemented); a b_dec pre-bias (the synthetic code has none); atoms
renormalised after every optimiser step with the parallel gradient removed (the trainer does that).
`encode(x, k=...)` runs any number of steps at inference ("adaptive sparsity"). No built-in tree:
`hierarchy()` returns the post-hoc forest (hsae.interpret.forest) once one is saved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hsae.config import SAEConfig
from hsae.errors import HsaeError
from hsae.models import register
from hsae.models.base import SAE, SAEOutput, StepContext
from hsae.models.codes import Codes, SparseCodes


@dataclass
class MPConfig(SAEConfig):
    k: int | None = 32
    encoder: str = "gram"  # gram | naive
    nonneg: bool = True
    revive_coef: float = 0.01

    def validate(self) -> None:
        if self.k is None:
            raise HsaeError("the mp family needs --k (matching-pursuit steps per token)")
        super().validate()
        if self.encoder not in ("gram", "naive"):
            raise HsaeError(f"mp: encoder must be gram or naive, got {self.encoder!r}")
        if self.revive_coef < 0:
            raise HsaeError("mp: revive_coef must be >= 0")


def _select(c: Tensor, nonneg: bool) -> tuple[Tensor, Tensor]:
    """Index of the chosen atom per row and its correlation (clamped at 0 when nonneg)."""
    # argmax(relu(c)) = argmax(c) whenever a positive correlation exists; otherwise the step is a
    # no-op (coefficient 0) whichever atom is named, so one pass over c suffices.
    j = c.argmax(dim=1)
    a = c.gather(1, j[:, None]).squeeze(1)
    return j, (a.clamp_min(0) if nonneg else a)


def mp_naive(xc: Tensor, W: Tensor, k: int, nonneg: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Matching pursuit, residual form. Returns indices (n, k), coefficients (n, k), residual (n, d)."""
    r = xc
    sq = W.pow(2).sum(1)
    idx, val = [], []
    for _ in range(k):
        c = r @ W.T
        j, a = _select(c, nonneg)
        a = a / sq[j]
        r = r - a[:, None] * W[j]
        idx.append(j)
        val.append(a)
    return torch.stack(idx, 1), torch.stack(val, 1), r


def mp_gram(xc: Tensor, W: Tensor, k: int, nonneg: bool = True, G: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Matching pursuit, Gram form: c_{t+1} = c_t - a G[j] with G = W W^T. Returns indices, coefficients."""
    G = W @ W.T if G is None else G
    inplace = not (torch.is_grad_enabled() and (xc.requires_grad or W.requires_grad or G.requires_grad))
    diag = G.diagonal()
    c = xc @ W.T
    idx, val = [], []
    for _ in range(k):
        j, a = _select(c, nonneg)
        a = a / diag[j]
        if inplace:  # inference: update the correlations in place, no temporaries beyond G[j]
            c.addcmul_(G.index_select(0, j), a[:, None], value=-1)
        else:
            c = c - a[:, None] * G.index_select(0, j)
        idx.append(j)
        val.append(a)
    return torch.stack(idx, 1), torch.stack(val, 1)


def merge_repeats(idx: Tensor, val: Tensor) -> Tensor:
    """Values with each re-selected atom's total in its first slot and 0 in its later slots."""
    k = idx.shape[1]
    same = idx[:, :, None] == idx[:, None, :]  # (n, k, k)
    earlier = torch.ones(k, k, dtype=torch.bool, device=idx.device).tril(-1)  # [t, s]: s < t
    repeat = (same & earlier).any(-1)
    total = torch.bmm(same.to(val.dtype), val[:, :, None]).squeeze(-1)
    return torch.where(repeat, torch.zeros_like(total), total)


@register("mp")
class MPSAE(SAE):
    config_class = MPConfig
    supports_k = True

    def __init__(self, config: MPConfig):
        nn.Module.__init__(self)
        self.config = config
        self.W_dec = nn.Parameter(torch.empty(config.n_latents, config.d_in))
        self.b_dec = nn.Parameter(torch.zeros(config.d_in))
        self.register_buffer("parents", torch.full((config.n_latents,), -1, dtype=torch.long))
        self._gram: tuple[tuple, Tensor] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            w = torch.randn_like(self.W_dec)
            self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            self.b_dec.zero_()

    @property
    def W_enc(self) -> Tensor:  # type: ignore[override]
        return self.W_dec.T

    def gram(self) -> Tensor:
        if torch.is_grad_enabled() and self.W_dec.requires_grad:
            return self.W_dec @ self.W_dec.T
        key = (self.W_dec.data_ptr(), self.W_dec._version, self.W_dec.dtype, self.W_dec.device)
        if self._gram is None or self._gram[0] != key:
            with torch.no_grad():
                self._gram = (key, self.W_dec @ self.W_dec.T)
        return self._gram[1]

    def pre_activations(self, xn: Tensor) -> Tensor:
        """The first step's correlations W (x - b_dec)."""
        return (xn - self.b_dec) @ self.W_dec.T

    def pursue(self, xn: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        k = k or self.config.k
        if not 0 < k:
            raise HsaeError(f"mp: k must be positive, got {k}")
        xc = xn - self.b_dec
        if self.config.encoder == "gram":
            return mp_gram(xc, self.W_dec, k, self.config.nonneg, self.gram())
        idx, val, _ = mp_naive(xc, self.W_dec, k, self.config.nonneg)
        return idx, val

    def encode_normalized(self, xn: Tensor, k: int | None = None) -> Codes:
        idx, val = self.pursue(xn, k)
        return SparseCodes(idx, merge_repeats(idx, val), self.n_latents)

    def activate(self, pre: Tensor, k: int | None = None) -> Codes:
        raise HsaeError("mp encodes by matching pursuit on the input, not from pre-activations; use encode()")

    def forward(self, x: Tensor, ctx: StepContext | None = None) -> SAEOutput:
        xn = self.scale_in(x)
        codes = self.encode_normalized(xn)
        xn_hat = self.decode_normalized(codes)
        losses = {"mse": (xn_hat - xn).pow(2).sum(-1).mean()}
        if self.training and ctx is not None and ctx.dead_mask is not None and self.config.revive_coef > 0:
            dead = ctx.dead_mask
            if dead.any():
                residual = (xn - xn_hat).detach()
                losses["revive"] = -self.config.revive_coef * (residual @ self.W_dec[dead].T).mean()
        return SAEOutput(x_hat=xn_hat / self.config.input_scale, codes=codes, losses=losses)


__all__ = ["MPConfig", "MPSAE", "mp_naive", "mp_gram", "merge_repeats"]
