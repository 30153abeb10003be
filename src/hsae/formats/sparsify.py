"""EleutherAI sparsify checkpoints: one folder per hook with `cfg.json` (its SparseCoderConfig plus
`d_in`) and `sae.safetensors` (encoder.weight (num_latents, d_in), encoder.bias, W_dec (num_latents,
d_in), b_dec), as `SparseCoder.save_to_disk` writes them (eai-sparsify 1.3).

sparsify encodes relu((x - b_dec) @ encoder.weight.T + encoder.bias), keeps the k largest and decodes
them with W_dec plus b_dec: hsae's TopK (which takes the k largest first and ReLUs them: the same
values, and zeros wherever fewer than k are positive). Transcoders (`transcode`), skip connections
(`W_skip`) and the `groupmax` activation compute something else and are refused. Only TopK SAEs can be
written; what wrote them is recorded in the hsae.json beside them (sparsify warns about cfg keys it does
not know).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hsae.atomic import write_json, write_safetensors
from hsae.errors import HsaeError
from hsae.formats.base import ExportMeta, Foreign
from hsae.formats.files import read_json, read_safetensors, require
from hsae.formats.flat import FlatSAE, is_unit_norm

NAME = "sparsify"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
FILES = (CFG_FILE, WEIGHTS_FILE)
WRITES = ("topk",)


def detect(path: Path) -> bool:
    folder = path.parent if path.is_file() else path
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def read(path: Path) -> Foreign:
    folder = path.parent if path.is_file() else path
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    cfg = read_json(cfg_path)
    if cfg.get("transcode"):
        raise HsaeError(f"{folder} is a sparsify transcoder (it predicts another module's output); hsae reads SAEs")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise HsaeError(f"{folder}: sparsify activation {activation!r} is not supported; hsae reads topk")
    state = read_safetensors(weights_path)
    if "W_skip" in state or cfg.get("skip_connection"):
        raise HsaeError(f"{folder} has a skip connection (W_skip), which no hsae family has")
    require(state, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), weights_path)
    k = cfg.get("k")
    if not isinstance(k, int) or k < 1:
        raise HsaeError(f"{cfg_path}: k is {k!r}; expected a positive integer")
    flat = FlatSAE(
        kind="topk",
        W_enc=state["encoder.weight"].float().T,
        b_enc=state["encoder.bias"],
        W_dec=state["W_dec"],
        b_dec=state["b_dec"],
        k=k,
    )
    return Foreign(
        flat=flat, architecture=f"SparseCoder ({activation})", folder=folder, files=[cfg_path, weights_path], config=cfg
    )


def write(flat: FlatSAE, out: Path, meta: ExportMeta) -> list[Path]:
    cfg: dict[str, Any] = {
        "activation": "topk",
        "expansion_factor": max(1, flat.n_latents // flat.d_in),
        # Only at initialisation and in training; True would be untrue of a decoder carrying input_scale.
        "normalize_decoder": is_unit_norm(flat.W_dec),
        "num_latents": flat.n_latents,
        "k": flat.k,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": flat.d_in,
    }
    tensors = {
        "encoder.weight": flat.W_enc.T.contiguous(),
        "encoder.bias": flat.b_enc,
        "W_dec": flat.W_dec,
        "b_dec": flat.b_dec,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / WEIGHTS_FILE, {k: v.to(torch.float32) for k, v in tensors.items()})
    write_json(out / CFG_FILE, cfg)
    return [out / CFG_FILE, out / WEIGHTS_FILE]
