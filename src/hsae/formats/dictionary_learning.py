"""dictionary_learning (saprmarks) trainer folders: `ae.pt`, a state dict saved with torch.save, and the
trainer's `config.json` ({"trainer": {"dict_class": ..., "k": ..., "lm_name": ..., ...}}), as
`trainSAE` writes them (dictionary-learning 0.1). `ae.pt` is read with torch.load(weights_only=True)
only: nothing but tensors is unpickled. Checkpoints (`checkpoints/ae_N.pt`) read the same way, with the
config.json of the folder above.

The class is told by the state dict's names (and config.json's dict_class where the names are shared):
- AutoEncoder: relu((x - bias) @ encoder.weight.T + encoder.bias), decoded by decoder.weight (d_in, m)
  plus bias -> relu. AutoEncoderNew (no input bias, decoder.bias) -> relu with b_dec @ W_enc folded in.
- AutoEncoderTopK -> topk; BatchTopKSAE (encodes with its learned threshold) -> batchtopk;
  MatryoshkaBatchTopKSAE (W_enc, W_dec, group_sizes) -> matryoshka. AutoEncoderTopK and BatchTopKSAE
  hold the same names: config.json decides.
- JumpReluAutoEncoder: relu(pre * (pre > threshold)) with pre = x @ W_enc + b_enc (apply_b_dec_to_input
  is False unless set by hand after loading, and is not saved) -> jumprelu with b_dec @ W_enc folded in.
- GatedAutoEncoder and others are refused.
The saved weights already work on raw activations (trainSAE scales the biases back by its norm
factor before saving), so nothing else is folded. Writing produces the same files for each family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hsae.atomic import atomic_path, write_json
from hsae.errors import HsaeError
from hsae.formats.base import ExportMeta, Foreign
from hsae.formats.files import read_json, read_tensor_pickle, require
from hsae.formats.flat import FlatSAE, subtract_b_dec_first

NAME = "dictionary_learning"
WEIGHTS_FILE = "ae.pt"
CONFIG_FILE = "config.json"
FILES = (WEIGHTS_FILE, CONFIG_FILE)
WRITES = ("relu", "topk", "batchtopk", "matryoshka", "jumprelu")

_CLASS_OF_KIND = {
    "relu": "AutoEncoder",
    "topk": "AutoEncoderTopK",
    "batchtopk": "BatchTopKSAE",
    "matryoshka": "MatryoshkaBatchTopKSAE",
    "jumprelu": "JumpReluAutoEncoder",
}


def _weights_path(path: Path) -> Path:
    return path if path.is_file() else path / WEIGHTS_FILE


def _config_path(weights: Path) -> Path | None:
    for folder in (weights.parent, weights.parent.parent if weights.parent.name == "checkpoints" else None):
        if folder is not None and (folder / CONFIG_FILE).is_file():
            return folder / CONFIG_FILE
    return None


def detect(path: Path) -> bool:
    weights = _weights_path(path)
    return weights.is_file() and weights.suffix == ".pt"


def _dict_class(state: dict[str, torch.Tensor], trainer: dict[str, Any], weights: Path) -> str:
    names = set(state)
    if {"gate_bias", "mag_bias"} & names or "r_mag" in names:
        return "GatedAutoEncoder"
    if "group_sizes" in names:
        return "MatryoshkaBatchTopKSAE"
    if {"W_enc", "threshold"} <= names:
        return "JumpReluAutoEncoder"
    if {"k", "threshold", "b_dec", "encoder.weight"} <= names:
        named = trainer.get("dict_class")
        if named in ("AutoEncoderTopK", "BatchTopKSAE"):
            return named
        raise HsaeError(
            f"{weights} holds k and threshold, as both AutoEncoderTopK and BatchTopKSAE do, and no config.json "
            "beside it names the class (trainer.dict_class); put the trainer's config.json next to it"
        )
    if {"bias", "encoder.weight", "decoder.weight"} <= names:
        return "AutoEncoder"
    if {"encoder.weight", "decoder.weight", "decoder.bias"} <= names:
        return "AutoEncoderNew"
    return str(trainer.get("dict_class") or "an unknown class")


def read(path: Path) -> Foreign:
    weights = _weights_path(path)
    config_path = _config_path(weights)
    config = read_json(config_path) if config_path else {}
    trainer: dict[str, Any] = config["trainer"] if isinstance(config.get("trainer"), dict) else {}
    state = read_tensor_pickle(weights)
    cls = _dict_class(state, trainer, weights)
    flat = _flat_of(cls, state, weights)
    hook = trainer.get("submodule_name")
    if hook is None and trainer.get("layer") is not None:
        hook = f"layer {trainer['layer']}"
    return Foreign(
        flat=flat,
        architecture=cls,
        folder=weights.parent,
        files=[weights] + ([config_path] if config_path else []),
        config=config,
        model_name=trainer.get("lm_name"),
        hook_name=hook,
    )


def _k(state: dict[str, torch.Tensor]) -> int:
    return int(state["k"].item())


def _threshold(state: dict[str, torch.Tensor], cls: str, weights: Path) -> torch.Tensor:
    threshold = state["threshold"].float().reshape(())
    if float(threshold) < 0:
        raise HsaeError(
            f"{weights}: the {cls} threshold is {float(threshold):g}, never set by training; dictionary_learning "
            "would encode with no sparsity at all (relu of every latent), so there is nothing faithful to import"
        )
    return threshold


def _flat_of(cls: str, state: dict[str, torch.Tensor], weights: Path) -> FlatSAE:
    if cls == "AutoEncoder":
        require(state, ("encoder.bias",), weights)
        return FlatSAE(
            kind="relu",
            W_enc=state["encoder.weight"].float().T,
            b_enc=state["encoder.bias"],
            W_dec=state["decoder.weight"].float().T,
            b_dec=state["bias"],
        )
    if cls == "AutoEncoderNew":
        require(state, ("encoder.bias",), weights)
        W_enc, b_dec = state["encoder.weight"].float().T, state["decoder.bias"]
        return FlatSAE(
            kind="relu",
            W_enc=W_enc,
            b_enc=subtract_b_dec_first(W_enc, state["encoder.bias"], b_dec),
            W_dec=state["decoder.weight"].float().T,
            b_dec=b_dec,
            notes=["AutoEncoderNew has no input bias: decoder.bias @ W_enc added to b_enc"],
        )
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        require(state, ("encoder.bias", "decoder.weight"), weights)
        common: dict[str, Any] = {
            "W_enc": state["encoder.weight"].float().T,
            "b_enc": state["encoder.bias"],
            "W_dec": state["decoder.weight"].float().T,
            "b_dec": state["b_dec"],
            "k": _k(state),
        }
        if cls == "AutoEncoderTopK":
            return FlatSAE(kind="topk", **common)
        return FlatSAE(kind="batchtopk", threshold=_threshold(state, cls, weights), **common)
    if cls == "MatryoshkaBatchTopKSAE":
        require(state, ("W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold"), weights)
        widths = torch.cumsum(state["group_sizes"].long(), 0).tolist()
        return FlatSAE(
            kind="matryoshka",
            W_enc=state["W_enc"],
            b_enc=state["b_enc"],
            W_dec=state["W_dec"],
            b_dec=state["b_dec"],
            k=_k(state),
            threshold=_threshold(state, cls, weights),
            widths=widths,
        )
    if cls == "JumpReluAutoEncoder":
        require(state, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), weights)
        return FlatSAE(
            kind="jumprelu",
            W_enc=state["W_enc"],
            b_enc=subtract_b_dec_first(state["W_enc"], state["b_enc"], state["b_dec"]),
            W_dec=state["W_dec"],
            b_dec=state["b_dec"],
            threshold=state["threshold"].float(),
            notes=["JumpReluAutoEncoder does not subtract b_dec from its input: b_dec @ W_enc added to b_enc"],
        )
    raise HsaeError(
        f"{weights}: dictionary_learning class {cls} is not supported (hsae reads "
        f"{', '.join(['AutoEncoder', 'AutoEncoderNew', *list(_CLASS_OF_KIND.values())[1:]])})"
    )


def _state_of(flat: FlatSAE) -> dict[str, torch.Tensor]:
    f32 = {n: getattr(flat, n).to(torch.float32) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if flat.kind == "relu":
        return {
            "bias": f32["b_dec"],
            "encoder.weight": f32["W_enc"].T.contiguous(),
            "encoder.bias": f32["b_enc"],
            "decoder.weight": f32["W_dec"].T.contiguous(),
        }
    if flat.kind == "jumprelu":
        b_enc = flat.b_enc - flat.b_dec @ flat.W_enc  # it adds no b_dec subtraction of its own
        return {**f32, "b_enc": b_enc.to(torch.float32), "threshold": flat.threshold.to(torch.float32)}  # type: ignore[union-attr]
    threshold = flat.threshold if flat.threshold is not None else torch.tensor(-1.0)
    buffers = {"k": torch.tensor(flat.k, dtype=torch.int32), "threshold": threshold.to(torch.float32).reshape(())}
    if flat.kind == "matryoshka":
        bounds = [0, *flat.widths]  # type: ignore[misc]
        sizes = [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        return {**f32, **buffers, "group_sizes": torch.tensor(sizes)}
    return {
        "encoder.weight": f32["W_enc"].T.contiguous(),
        "encoder.bias": f32["b_enc"],
        "decoder.weight": f32["W_dec"].T.contiguous(),
        "b_dec": f32["b_dec"],
        **buffers,
    }


def write(flat: FlatSAE, out: Path, meta: ExportMeta) -> list[Path]:
    trainer: dict[str, Any] = {
        "dict_class": _CLASS_OF_KIND[flat.kind],
        "trainer_class": f"written by hsae {meta.hsae_version}".strip(),
        "activation_dim": flat.d_in,
        "dict_size": flat.n_latents,
        "lm_name": meta.model_name,
        "submodule_name": meta.hf_hook_name,
    }
    if flat.k is not None and flat.kind != "relu" and flat.kind != "jumprelu":
        trainer["k"] = flat.k
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        torch.save(_state_of(flat), tmp)
    write_json(out / CONFIG_FILE, {"trainer": trainer})
    return [out / WEIGHTS_FILE, out / CONFIG_FILE]
