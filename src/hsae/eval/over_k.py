"""One model evaluated at many k (the MSAE paper's protocol): at each k, the code is the top k of the
model's pre-activations (`encode(x, k=k)`), and the metrics are

- fvu and cosine of the reconstruction (hsae.eval.core's definitions), l0 and zero_fraction (the
  fraction of latents that are 0 in a code, 1 - l0 / n_latents), dead_fraction (latents never active
  at that k over the evaluated rows);
- cknna_recon and cknna_codes: CKNNA (hsae.eval.cknna) between the inputs and the reconstructions,
  and between the inputs and the codes, per batch of `batch_size` rows, averaged.

The result is one row per k,
ascending: a sparsity-fidelity curve of one model (`hsae eval DIR -o ks=16,32,...`, the
`over_k` evaluator).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from hsae.errors import HsaeError
from hsae.eval.cknna import DEFAULT_BATCH, DEFAULT_NEIGHBOURS, cknna
from hsae.eval.core import CoreAccumulator
from hsae.models.codes import to_dense

FIRST_K = 16  # the paper evaluates at 16, 32, ... up to the width


def doubling_ks(n_latents: int, first: int = FIRST_K) -> list[int]:
    """first, 2 first, 4 first, ... below n_latents, then n_latents."""
    ks = []
    k = max(1, min(first, n_latents))
    while k < n_latents:
        ks.append(k)
        k *= 2
    return ks + [n_latents]


def parse_ks(text: str | Sequence[int], n_latents: int) -> list[int]:
    """A list of k from "16,32,64" (or a sequence), checked against the model's width."""
    try:
        ks = [int(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip()]
    except ValueError:
        raise HsaeError(f"ks must be a comma-separated list of integers, e.g. 16,32,64; got {text!r}") from None
    if not ks or any(not 0 < k <= n_latents for k in ks):
        raise HsaeError(f"every k must be between 1 and the model's {n_latents} latents, got {ks}")
    return sorted(set(ks))


@torch.no_grad()
def evaluate_over_k(
    model: Any,
    x: Tensor,
    ks: Sequence[int],
    *,
    batch_size: int = DEFAULT_BATCH,
    neighbours: int = DEFAULT_NEIGHBOURS,
) -> list[dict[str, Any]]:
    """The metrics of the module docstring for `model` (an SAE with `supports_k`) on raw rows x, one
    dict per k in ascending order."""
    if not getattr(model, "supports_k", False):
        raise HsaeError(f"the {model.arch} family does not take k at inference, so it cannot be evaluated over k")
    ks = parse_ks(list(ks), model.n_latents)
    accs = {k: CoreAccumulator(model.n_latents) for k in ks}
    recon_scores: dict[int, list[float]] = {k: [] for k in ks}
    code_scores: dict[int, list[float]] = {k: [] for k in ks}
    n = x.shape[0]
    for start in range(0, n, batch_size):
        xb = x[start : start + batch_size]
        score = xb.shape[0] > neighbours  # a last batch too small for neighbourhoods gets no CKNNA
        for k in ks:
            codes = model.encode(xb, k=k)
            x_hat = model.decode(codes).to(xb.dtype)
            accs[k].update(xb, x_hat, codes)
            if score:
                recon_scores[k].append(cknna(xb, x_hat, neighbours))
                code_scores[k].append(cknna(xb, to_dense(codes), neighbours))
    rows = []
    for k in ks:
        core = accs[k].result()
        rows.append(
            {
                "k": k,
                "l0": core["l0"],
                "zero_fraction": 1 - core["l0"] / model.n_latents,
                "fvu": core["fvu"],
                "cosine": core["cosine"],
                "dead_fraction": core["dead_fraction"],
                "cknna_recon": _mean(recon_scores[k]),
                "cknna_codes": _mean(code_scores[k]),
            }
        )
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
