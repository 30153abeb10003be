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
  inference. At inference the update is in place, in row chunks that keep c in cache, and the
  atom is picked by `argmax_rows` (blocked, equal to argmax and ~5x faster on CPU; both encoders
  use it). benchmarks/mp_gram.py measures the speed-up (6-8x with G cached at m = 4096, d = 768).
Hierarchy on the synthetic forest (measured, tests/test_hierarchical.py, training seeds 1, 2, 3): at L0 2
on the claim forest (8 roots at p 0.15, so a third of samples carry two; children at cosine 0.5) MP-SAE
absorbs more than TopK (0.90, 0.79, 0.91 vs 0.74, 0.82, 0.79; edge F1 0.22, 0.22, 0.08 vs 0.35, 0.15, 0.35);
absorption only asks which latents fire. In its own paper's toy regime (the official tree.json: one
top-level concept per sample, at most one child, near-orthogonal directions, magnitudes 1.5 + 0.25 N(0, 1);
SyntheticConfig exclusive_roots / mag_dist="normal", parent_cos 0) it still does not beat TopK at the same
L0: with the adaptive stop and at most 2 steps (L0 1.59-1.75) absorption 0.36-0.57 and edge F1 0.65-0.77,
against TopK k=2 (L0 1.65-1.83, ReLU may leave a slot empty) at 0.002-0.003 and 0.93. MP does learn the
pure atoms (best cosine ~1 for most true features) but, with spare atoms, also keeps merged parent+child
ones, and greedy selection takes a merged atom first whenever one exists. This matches the OpenReview
caveat in hier_papers.md that the hierarchy claim is not established beyond the paper's own setting (the
paper's toy also uses exactly as many atoms as true features and 15000 steps).

Choices where the sources differ: non-negative selection (argmax of relu(c), as the synthetic code;
`nonneg=false` gives overcomplete's signed argmax); a fixed number of steps by default (overcomplete's
encoder), or with `adaptive_stop=true` the synthetic code's data-dependent stop: a row stops when a step
re-selects an atom it holds (its support did not change; that step's coefficient still counts, as there)
or finds no positive correlation, or when ||r|| < stop_threshold * ||x - b_dec|| (the synthetic code's
threshold is absolute, 0.05 on inputs of norm ~1.5-2.5; hsae normalises inputs, so it is relative here),
with k the most steps a row may take and stopped rows' later slots holding 0 (their L0 is below k;
the Gram encoder then runs its out-of-place loop at inference too);
a b_dec pre-bias (the synthetic code has none); atoms
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
from hsae.models.base import SAE, SAEOutput, StepContext
from hsae.models.codes import Codes, SparseCodes
from hsae.models.registry import register


@dataclass
class MPConfig(SAEConfig):
    k: int | None = 32
    encoder: str = "gram"  # gram | naive
    nonneg: bool = True
    revive_coef: float = 0.01
    # The official synthetic code's data-dependent stop (off by default: k fixed steps). With
    # `adaptive_stop`, a row stops once a step re-selects an atom it already holds (its support did not
    # change; the step's coefficient still counts, as there) or finds no positive correlation, or once
    # ||r|| < stop_threshold * ||x - b_dec||; k is then the most steps a row may take.
    adaptive_stop: bool = False
    stop_threshold: float = 0.0

    def validate(self) -> None:
        if self.k is None:
            raise HsaeError("the mp family needs --k (matching-pursuit steps per token)")
        super().validate()
        if self.encoder not in ("gram", "naive"):
            raise HsaeError(f"mp: encoder must be gram or naive, got {self.encoder!r}")
        if self.revive_coef < 0:
            raise HsaeError(f"mp: revive_coef must be >= 0, got {self.revive_coef}")
        if not 0 <= self.stop_threshold < 1:
            raise HsaeError(
                f"mp: stop_threshold must be in [0, 1) (a fraction of ||x - b_dec||), got {self.stop_threshold}"
            )
        if self.stop_threshold > 0 and not self.adaptive_stop:
            raise HsaeError("mp: stop_threshold needs adaptive_stop=true")


ARGMAX_BLOCK = 64
# Correlations (rows x atoms) updated at once by the in-place Gram encoder.
GRAM_CHUNK_ELEMENTS = 1 << 22


def argmax_rows(c: Tensor, block: int = ARGMAX_BLOCK) -> Tensor:
    """`c.argmax(dim=1)` (the first maximal index of each row), computed in two passes: the
    maxima of blocks of `block` columns (a vectorised reduction), then the argmax inside the
    winning block. On CPUs torch's argmax over long rows does not vectorise and was most of a
    matching-pursuit step's time (6.7 ms of ~10 at 1024 x 4096; this takes 1.4 ms). Ties and
    the first-index rule are the same as argmax's."""
    n, m = c.shape
    nb = m // block
    if nb < 2 or c.device.type != "cpu":  # GPUs' argmax is already a parallel reduction
        return c.argmax(dim=1)
    bmax = c[:, : nb * block].unflatten(1, (nb, block)).amax(dim=2)
    if nb * block < m:
        bmax = torch.cat([bmax, c[:, nb * block :].amax(dim=1, keepdim=True)], 1)
    pos = (bmax.argmax(dim=1) * block)[:, None] + torch.arange(block, device=c.device)
    pos = pos.clamp_max_(m - 1)  # the short last block repeats its last column (after it: no effect)
    return pos.gather(1, c.gather(1, pos).argmax(dim=1, keepdim=True)).squeeze(1)


def _select(c: Tensor, nonneg: bool) -> tuple[Tensor, Tensor]:
    """Index of the chosen atom per row and its correlation (clamped at 0 when nonneg)."""
    # argmax(relu(c)) = argmax(c) whenever a positive correlation exists; otherwise the step is a
    # no-op (coefficient 0) whichever atom is named, so one pass over c suffices.
    with torch.no_grad():
        j = argmax_rows(c.detach())
    a = c.gather(1, j[:, None]).squeeze(1)
    return j, (a.clamp_min(0) if nonneg else a)


class _Stopper:
    """The data-dependent stop (`adaptive_stop`): which rows are done, from the atoms picked so far,
    the step's coefficient and the squared residual norm, tracked as ||r||^2 -= c_j^2 / G_jj."""

    def __init__(self, xc: Tensor, k: int, threshold: float):
        with torch.no_grad():
            self.r2 = xc.detach().pow(2).sum(1)
            self.floor = threshold * threshold * self.r2
        self.done = torch.zeros(xc.shape[0], dtype=torch.bool, device=xc.device)
        self.picked = torch.empty(xc.shape[0], k, dtype=torch.long, device=xc.device)
        self.t = 0

    def mask(self, a: Tensor) -> Tensor:
        return torch.where(self.done, torch.zeros_like(a), a)

    @torch.no_grad()
    def update(self, j: Tensor, a: Tensor, sq_j: Tensor) -> None:
        """After a step that picked atoms `j` with (masked) coefficients `a`; sq_j = ||w_j||^2."""
        a = a.detach()
        repeat = (self.picked[:, : self.t] == j[:, None]).any(1)
        self.picked[:, self.t] = j
        self.t += 1
        self.r2 = self.r2 - a * a * sq_j  # a = c_j / ||w_j||^2, so a^2 ||w_j||^2 = c_j^2 / ||w_j||^2
        self.done = self.done | repeat | (a == 0) | (self.r2 <= self.floor)  # not in place: autograd saved it


def mp_naive(
    xc: Tensor, W: Tensor, k: int, nonneg: bool = True, *, adaptive_stop: bool = False, stop_threshold: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Matching pursuit, residual form. Returns indices (n, k), coefficients (n, k), residual (n, d).
    With `adaptive_stop`, rows that stopped get coefficient 0 in their later slots (see MPConfig)."""
    r = xc
    sq = W.pow(2).sum(1)
    stop = _Stopper(xc, k, stop_threshold) if adaptive_stop else None
    idx, val = [], []
    for _ in range(k):
        c = r @ W.T
        j, a = _select(c, nonneg)
        a = a / sq[j]
        if stop is not None:
            a = stop.mask(a)
            stop.update(j, a, sq[j].detach())
        r = r - a[:, None] * W[j]
        idx.append(j)
        val.append(a)
    return torch.stack(idx, 1), torch.stack(val, 1), r


def mp_gram(
    xc: Tensor,
    W: Tensor,
    k: int,
    nonneg: bool = True,
    G: Tensor | None = None,
    *,
    adaptive_stop: bool = False,
    stop_threshold: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Matching pursuit, Gram form: c_{t+1} = c_t - a G[j] with G = W W^T. Returns indices, coefficients."""
    G = W @ W.T if G is None else G
    inplace = not (torch.is_grad_enabled() and (xc.requires_grad or W.requires_grad or G.requires_grad))
    if not inplace or adaptive_stop:
        diag = G.diagonal()
        c = xc @ W.T
        stop = _Stopper(xc, k, stop_threshold) if adaptive_stop else None
        picked, coefs = [], []
        for _ in range(k):
            j, a = _select(c, nonneg)
            a = a / diag[j]
            if stop is not None:
                a = stop.mask(a)
                stop.update(j, a, diag[j].detach())
            c = c - a[:, None] * G.index_select(0, j)
            picked.append(j)
            coefs.append(a)
        return torch.stack(picked, 1), torch.stack(coefs, 1)
    # inference: the correlations are updated in place, in row chunks small enough that the
    # correlations and the gathered rows of G stay in cache across the k steps (measured at
    # n = 4096, m = 4096: 1.08 s unchunked, 0.72 s in chunks of 1024 rows)
    G = G.contiguous()
    diag = G.diagonal().contiguous()
    n, m = xc.shape[0], G.shape[0]
    idx = torch.empty(n, k, dtype=torch.long, device=xc.device)
    val = torch.empty(n, k, dtype=G.dtype, device=xc.device)
    step = max(1, GRAM_CHUNK_ELEMENTS // max(1, m))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        c = xc[lo:hi] @ W.T
        rows = torch.empty_like(c)
        for t in range(k):
            j = argmax_rows(c)
            a = c.gather(1, j[:, None])
            if nonneg:
                a.clamp_min_(0)
            a.div_(diag.index_select(0, j)[:, None])
            torch.index_select(G, 0, j, out=rows)
            c.addcmul_(rows, a, value=-1)
            idx[lo:hi, t] = j
            val[lo:hi, t] = a.squeeze(1)
    return idx, val


def merge_repeats(idx: Tensor, val: Tensor) -> Tensor:
    """Values with each re-selected atom's total in its first slot and 0 in its later slots."""
    k = idx.shape[1]
    same = idx[:, :, None] == idx[:, None, :]  # (n, k, k)
    earlier = torch.ones(k, k, dtype=torch.bool, device=idx.device).tril(-1)  # [t, s]: s < t
    repeat = (same & earlier).any(-1)
    total = torch.bmm(same.to(val.dtype), val[:, :, None]).squeeze(-1)
    return torch.where(repeat, torch.zeros_like(total), total)


@register("mp")
class MPSAE(SAE[MPConfig]):
    config_class = MPConfig
    supports_k = True

    def __init__(self, config: MPConfig):
        self._gram: tuple[tuple, Tensor] | None = None  # (key of W_dec's state, W_dec W_dec^T)
        super().__init__(config)

    def create_weights(self) -> None:
        """Only the dictionary and b_dec: matching pursuit has no encoder matrix."""
        self.W_dec = nn.Parameter(torch.empty(self.config.n_latents, self.config.d_in))
        self.b_dec = nn.Parameter(torch.zeros(self.config.d_in))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            w = torch.randn_like(self.W_dec)
            self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            self.b_dec.zero_()

    @property
    def W_enc(self) -> Tensor:
        """W_dec^T (read-only): what an encoder matrix would be, for evaluators that read one."""
        return self.W_dec.T

    @W_enc.setter
    def W_enc(self, value: Tensor) -> None:
        raise HsaeError("mp has no encoder matrix: W_enc is W_dec^T; set W_dec instead")

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
        k = k or self.config.require_k()
        if not 0 < k:
            raise HsaeError(f"mp: k must be positive, got {k}")
        xc = xn - self.b_dec
        cfg = self.config
        if cfg.encoder == "gram":
            return mp_gram(
                xc, self.W_dec, k, cfg.nonneg, self.gram(), adaptive_stop=cfg.adaptive_stop,
                stop_threshold=cfg.stop_threshold,
            )  # fmt: skip
        idx, val, _ = mp_naive(
            xc, self.W_dec, k, cfg.nonneg, adaptive_stop=cfg.adaptive_stop, stop_threshold=cfg.stop_threshold
        )
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


__all__ = ["MPConfig", "MPSAE", "mp_naive", "mp_gram", "merge_repeats", "argmax_rows"]
