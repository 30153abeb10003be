"""Gemma Scope `params.npz`: JumpReLU SAEs as numpy arrays W_enc (d_in, d_sae), W_dec (d_sae, d_in),
b_enc, b_dec and threshold (d_sae,), as Google DeepMind released them on the hub.

Gemma Scope encodes pre = x @ W_enc + b_enc (no b_dec subtraction), keeps relu(pre) where
pre > threshold and decodes with W_dec plus b_dec: hsae's JumpReLU with b_dec @ W_enc added to
b_enc. The arrays are read with numpy's allow_pickle=False. The folder names nothing about the model,
so none is recorded; the embedding SAEs of Gemma Scope were trained on embeddings scaled by
sqrt(d_model), and are read as stored (give them the scaled embeddings). Writing takes any threshold
family (relu as thresholds 0, jumprelu, and batchtopk or matryoshka as one threshold for all).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hsae.atomic import atomic_path
from hsae.errors import HsaeError
from hsae.formats.base import ExportMeta, Foreign
from hsae.formats.flat import FlatSAE, subtract_b_dec_first

NAME = "gemma_scope"
WEIGHTS_FILE = "params.npz"
FILES = (WEIGHTS_FILE,)
WRITES = ("relu", "jumprelu", "batchtopk", "matryoshka")
_ARRAYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def _weights_path(path: Path) -> Path:
    return path if path.is_file() else path / WEIGHTS_FILE


def detect(path: Path) -> bool:
    weights = _weights_path(path)
    return weights.is_file() and weights.suffix == ".npz"


def read(path: Path) -> Foreign:
    weights = _weights_path(path)
    try:
        with np.load(weights, allow_pickle=False) as data:
            # Some copies spell the matrices w_enc / w_dec.
            arrays = {("W_" + key[2:] if key.startswith("w_") else key): np.asarray(data[key]) for key in data.files}
    except (OSError, ValueError) as err:
        raise HsaeError(f"{weights} is not a readable numpy .npz file ({err})") from None
    missing = [name for name in _ARRAYS if name not in arrays]
    if missing:
        raise HsaeError(f"{weights} lacks {', '.join(missing)} (it holds {', '.join(sorted(arrays))})")
    t = {name: torch.from_numpy(arrays[name].astype(np.float32)) for name in _ARRAYS}
    flat = FlatSAE(
        kind="jumprelu",
        W_enc=t["W_enc"],
        b_enc=subtract_b_dec_first(t["W_enc"], t["b_enc"], t["b_dec"]),
        W_dec=t["W_dec"],
        b_dec=t["b_dec"],
        threshold=t["threshold"],
        notes=["Gemma Scope does not subtract b_dec from its input: b_dec @ W_enc added to b_enc"],
    )
    return Foreign(flat=flat, architecture="jumprelu", folder=weights.parent, files=[weights])


def write(flat: FlatSAE, out: Path, meta: ExportMeta) -> list[Path]:
    threshold = torch.zeros(flat.n_latents, dtype=torch.float32) if flat.threshold is None else flat.threshold
    arrays = {
        "W_enc": flat.W_enc,
        "W_dec": flat.W_dec,
        "b_enc": flat.b_enc - flat.b_dec @ flat.W_enc,  # Gemma Scope adds no b_dec subtraction of its own
        "b_dec": flat.b_dec,
        "threshold": threshold.expand(flat.n_latents),
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{k: v.to(torch.float32).numpy() for k, v in arrays.items()})  # type: ignore[arg-type]
    return [out / WEIGHTS_FILE]
