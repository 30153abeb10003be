"""SAELens folders: `cfg.json` + `sae_weights.safetensors` (W_enc (d_in, d_sae), W_dec (d_sae, d_in),
b_enc, b_dec, and `threshold` for JumpReLU), as `SAE.save_model` writes them (sae-lens 6.x).

SAELens computes pre = (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc and decodes
codes @ W_dec + b_dec. Reading maps:
- standard -> relu; topk -> topk; jumprelu -> jumprelu, or batchtopk / matryoshka when the folder is
  what sae-lens saves after training a BatchTopK or Matryoshka SAE (a JumpReLU whose thresholds are
  all equal, with `metadata.training_architecture` batchtopk or matryoshka_batchtopk);
- batchtopk / matryoshka_batchtopk as saved in training form (the `topk_threshold` buffer) -> the
  same families, encoding with that threshold as sae-lens's saved inference SAE does;
- apply_b_dec_to_input = false: b_dec @ W_enc is added to b_enc; rescale_acts_by_decoder_norm: the
  decoder norms are folded into the encoder (exact: same codes, unit decoder rows); a finetuning
  `scaling_factor` (pre-6 files) is folded into W_dec;
- normalize_activations none, expected_average_only_in and covariance_whitening read as sae-lens's
  own `load_from_disk` reads them (no scaling at inference); constant_norm_rescale and layer_norm
  rescale each token and are refused, as are architectures hsae has no family for.
Pre-6 configs (no `architecture`, `activation_fn_str`, `hook_point`, boolean normalisation) are read
with sae-lens's documented defaults. Writing produces a sae-lens 6 folder that `SAE.load_from_disk`
loads; batchtopk and matryoshka are written the way sae-lens writes its own: as JumpReLU with one
threshold for all latents and the training architecture in the metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hsae.atomic import write_json, write_safetensors
from hsae.errors import HsaeError
from hsae.formats.base import ExportMeta, Foreign
from hsae.formats.files import read_json, read_safetensors, require
from hsae.formats.flat import FlatSAE, fold_decoder_norms, subtract_b_dec_first, uniform_value

NAME = "saelens"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FILES = (CFG_FILE, WEIGHTS_FILE)
WRITES = ("relu", "topk", "jumprelu", "batchtopk", "matryoshka")
# The sae-lens release whose format `write` produces (tests/data/formats was checked with it).
FORMAT_VERSION = "6.54.12"

_READS = ("standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk")
# Normalisations sae-lens's inference SAE applies as the identity when it loads a folder from disk.
_IDENTITY_NORMALISATIONS = ("none", "expected_average_only_in", "covariance_whitening")


def detect(path: Path) -> bool:
    folder = path.parent if path.is_file() else path
    return (folder / CFG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def _major_version(cfg: dict[str, Any]) -> int:
    version = cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version")
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return 0


def _legacy_to_v6(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """A pre-6.0 config in 6.x terms, with the defaults sae-lens gives such files."""
    out = dict(cfg)
    for old, new in (("hook_point", "hook_name"), ("activation_fn_str", "activation_fn")):
        if old in out and new not in out:
            out[new] = out.pop(old)
    activation = out.get("activation_fn") or "relu"
    if activation == "topk":
        out["architecture"] = "topk"
        out.setdefault("k", (out.get("activation_fn_kwargs") or {}).get("k"))
    elif activation != "relu":
        raise HsaeError(f"{path}: activation_fn {activation!r} has no hsae equivalent (hsae reads relu and topk)")
    out.setdefault("architecture", "standard")
    out.setdefault("apply_b_dec_to_input", True)
    norm = out.get("normalize_activations")
    if isinstance(norm, bool) or norm is None:
        out["normalize_activations"] = "expected_average_only_in" if norm else "none"
    meta = dict(out.get("metadata") or {})
    for key in ("model_name", "hook_name"):
        if key in out:
            meta.setdefault(key, out[key])
    out["metadata"] = meta
    return out


def read(path: Path) -> Foreign:
    folder = path.parent if path.is_file() else path
    cfg_path, weights_path = folder / CFG_FILE, folder / WEIGHTS_FILE
    saved = read_json(cfg_path)
    cfg = saved if _major_version(saved) >= 6 else _legacy_to_v6(saved, cfg_path)
    arch = cfg.get("architecture")
    if arch not in _READS:
        raise HsaeError(
            f"SAELens architecture {arch!r} ({folder}) is not supported: hsae has no family that computes the same "
            f"thing; it reads {', '.join(_READS)}"
        )
    norm = cfg.get("normalize_activations") or "none"
    if norm not in _IDENTITY_NORMALISATIONS:
        raise HsaeError(
            f"{cfg_path}: normalize_activations={norm!r} rescales every token at run time, which no fixed weights "
            "can reproduce; hsae cannot import it"
        )
    state = read_safetensors(weights_path)
    require(state, ("W_enc", "b_enc", "W_dec", "b_dec"), weights_path)
    W_enc, b_enc, W_dec, b_dec = (state[n].float() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    notes: list[str] = []
    if norm == "expected_average_only_in":
        notes.append(
            "normalize_activations=expected_average_only_in read as sae-lens's load_from_disk reads it (no scaling); "
            "a hub release's norm scaling factor, if it has one, is not in the folder"
        )
    if "scaling_factor" in state and not bool((state["scaling_factor"] == 1).all()):
        W_dec = W_dec * state["scaling_factor"].float()[:, None]
        notes.append("finetuning scaling_factor folded into W_dec")
    if cfg.get("reshape_activations") == "hook_z":
        notes.append("reshape_activations=hook_z: hsae takes the heads flattened, (n_heads * d_head) per token")
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = subtract_b_dec_first(W_enc, b_enc, b_dec)
        notes.append("apply_b_dec_to_input=false: b_dec @ W_enc added to b_enc")
    if cfg.get("rescale_acts_by_decoder_norm", False):
        W_enc, b_enc, W_dec = fold_decoder_norms(W_enc, b_enc, W_dec)
        notes.append("rescale_acts_by_decoder_norm: decoder norms folded into the encoder")
    meta = cfg.get("metadata") or {}
    flat = _flat_of(arch, cfg, meta, state, W_enc, b_enc, W_dec, b_dec, notes, weights_path)
    return Foreign(
        flat=flat,
        architecture=arch,
        folder=folder,
        files=[cfg_path, weights_path],
        config=saved,
        model_name=meta.get("model_name"),
        hook_name=meta.get("hook_name"),
    )


def _k(value: Any, path: Path) -> int:
    if value is None or float(value) < 1:
        raise HsaeError(f"{path}: k is {value!r}; a TopK-style SAE needs k >= 1")
    return max(1, round(float(value)))


def _flat_of(arch, cfg, meta, state, W_enc, b_enc, W_dec, b_dec, notes, weights_path) -> FlatSAE:
    common = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "notes": notes}
    if arch == "standard":
        return FlatSAE(kind="relu", **common)
    if arch == "topk":
        return FlatSAE(kind="topk", k=_k(cfg.get("k"), weights_path), **common)
    if arch in ("batchtopk", "matryoshka_batchtopk"):  # training form: the running threshold buffer
        require(state, ("topk_threshold",), weights_path)
        threshold = state["topk_threshold"].float().reshape(())
        return _batchtopk(arch, cfg, threshold, common, weights_path)
    require(state, ("threshold",), weights_path)
    threshold = state["threshold"].float()
    training = meta.get("training_architecture")
    value = uniform_value(threshold)
    if training in ("batchtopk", "matryoshka_batchtopk"):
        if value is not None:
            details = meta.get("training_architecture_details") or {}
            return _batchtopk(training, details, torch.tensor(value, dtype=torch.float32), common, weights_path)
        notes.append(f"trained as {training}, but its thresholds differ per latent: read as JumpReLU")
    return FlatSAE(kind="jumprelu", threshold=threshold, **common)


def _batchtopk(arch: str, details: dict[str, Any], threshold, common: dict[str, Any], path: Path) -> FlatSAE:
    k = _k(details.get("k"), path)
    if arch == "batchtopk":
        return FlatSAE(kind="batchtopk", k=k, threshold=threshold, **common)
    widths = [int(w) for w in details.get("matryoshka_widths") or []]
    m = common["W_enc"].shape[1]
    if not widths or widths[-1] != m or any(b <= a for a, b in zip([0, *widths[:-1]], widths, strict=True)):
        raise HsaeError(f"{path}: matryoshka_widths {widths} should rise to d_sae ({m})")
    return FlatSAE(kind="matryoshka", k=k, threshold=threshold, widths=widths, **common)


def write(flat: FlatSAE, out: Path, meta: ExportMeta) -> list[Path]:
    arch = {"relu": "standard", "topk": "topk"}.get(flat.kind, "jumprelu")
    metadata: dict[str, Any] = {
        "sae_lens_version": FORMAT_VERSION,
        "written_by": f"hsae {meta.hsae_version}".strip(),
        "model_name": meta.model_name,
        "hook_name": meta.hook_name,
        "hf_hook_name": meta.hf_hook_name,
    }
    cfg: dict[str, Any] = {
        "architecture": arch,
        "d_in": flat.d_in,
        "d_sae": flat.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    tensors = {"W_enc": flat.W_enc, "b_enc": flat.b_enc, "W_dec": flat.W_dec, "b_dec": flat.b_dec}
    if flat.kind == "topk":
        cfg.update(k=flat.k, rescale_acts_by_decoder_norm=False)
    elif flat.kind in ("jumprelu", "batchtopk", "matryoshka"):
        tensors["threshold"] = flat.threshold.expand(flat.n_latents)  # type: ignore[union-attr]
    if flat.kind == "batchtopk":
        metadata.update(training_architecture="batchtopk", training_architecture_details={"k": flat.k})
    elif flat.kind == "matryoshka":
        metadata.update(
            training_architecture="matryoshka_batchtopk",
            training_architecture_details={"k": flat.k, "matryoshka_widths": flat.widths},
        )
    cfg["metadata"] = metadata
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / WEIGHTS_FILE, {k: v.to(torch.float32) for k, v in tensors.items()})
    write_json(out / CFG_FILE, cfg)
    return [out / CFG_FILE, out / WEIGHTS_FILE]
