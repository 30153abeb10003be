"""CKNNA: centred kernel nearest-neighbour alignment (Huh et al. 2024, "The Platonic Representation
Hypothesis"; the definition of their code, github minyoungg/platonic-rep, metrics.py).

For two representations A (n, d_a) and B (n, d_b) of the same n items, with linear kernels K = A A^T
and L = B B^T: each item's top-k neighbours under K (itself excluded) and under L; the mask M keeps
the pairs (i, j) where j is among i's top-k neighbours under both kernels. Then

    CKNNA = HSIC(M * K, M * L) / sqrt(HSIC(M_K * K, M_K * K) HSIC(M_L * L, M_L * L)),

with the unbiased HSIC estimator (Song et al. 2012, eq. 5) and M_K, M_L each kernel's own
neighbour mask (its mask with itself). It is 1 for representations with the same neighbourhoods
and kernel values, near 0 for unrelated ones. The MSAE paper reports it between an SAE's inputs and
its reconstructions, and between inputs and codes, per batch of 4096 rows, averaged
(`batched_cknna`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hsae.errors import HsaeError

DEFAULT_NEIGHBOURS = 10
DEFAULT_BATCH = 4096
# Added to the normaliser, as in the reference code, so that kernels without neighbourhood structure
# (all-zero codes) give 0 rather than NaN.
EPS = 1e-6


def hsic_unbiased(K: Tensor, L: Tensor) -> Tensor:
    """The unbiased HSIC estimator of two (n, n) kernel matrices (diagonals ignored), n >= 4:
    [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)), K~ = K with a zero
    diagonal. 1'K~L~1 is (K~'1) . (L~1), so no (n, n) product is formed."""
    n = K.shape[0]
    if n < 4:
        raise HsaeError(f"the unbiased HSIC needs at least 4 rows, got {n}")
    Kt = K.clone().fill_diagonal_(0)
    Lt = L.clone().fill_diagonal_(0)
    trace = (Kt * Lt.t()).sum()
    sums = Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
    cross = torch.dot(Kt.sum(0), Lt.sum(1)) * 2 / (n - 2)
    return (trace + sums - cross) / (n * (n - 3))


def neighbour_mask(K: Tensor, k: int) -> Tensor:
    """(n, n) 0/1 mask of each row's k largest kernel values, the diagonal (the item itself) excluded."""
    n = K.shape[0]
    scores = K.clone().fill_diagonal_(float("-inf"))
    top = scores.topk(k, dim=1).indices
    return torch.zeros(n, n, dtype=K.dtype, device=K.device).scatter_(1, top, 1.0)


def cknna(A: Tensor, B: Tensor, neighbours: int = DEFAULT_NEIGHBOURS) -> float:
    """CKNNA between the rows of A (n, d_a) and B (n, d_b), computed in float64."""
    if A.shape[0] != B.shape[0]:
        raise HsaeError(f"CKNNA compares the same items: {A.shape[0]} rows against {B.shape[0]}")
    n = A.shape[0]
    if not 2 <= neighbours < n:
        raise HsaeError(f"CKNNA needs 2 <= neighbours < rows, got {neighbours} neighbours for {n} rows")
    A, B = A.double(), B.double()
    K, L = A @ A.t(), B @ B.t()
    mask_k, mask_l = neighbour_mask(K, neighbours), neighbour_mask(L, neighbours)
    mutual = mask_k * mask_l
    cross = hsic_unbiased(mutual * K, mutual * L)
    self_k = hsic_unbiased(mask_k * K, mask_k * K)
    self_l = hsic_unbiased(mask_l * L, mask_l * L)
    return float(cross / (torch.sqrt(self_k * self_l) + EPS))


def batched_cknna(A: Tensor, B: Tensor, batch: int = DEFAULT_BATCH, neighbours: int = DEFAULT_NEIGHBOURS) -> float:
    """The mean CKNNA over consecutive batches of `batch` rows (a last batch with no more than
    `neighbours` rows, too small for neighbourhoods, is left out unless it is the only one)."""
    n = A.shape[0]
    scores: list[float] = []
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        if stop - start <= neighbours and scores:
            break
        scores.append(cknna(A[start:stop], B[start:stop], neighbours))
    return sum(scores) / len(scores)
