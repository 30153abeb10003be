"""`FlatSAE`: the numbers every foreign SAE format shares, in raw activation units.

What hsae's flat families compute, written without input scaling:

    pre   = (x - b_dec) @ W_enc + b_enc
    codes = relu(pre)                       relu
          = the k largest of pre, ReLU'd    topk
          = pre * (pre > threshold)         jumprelu (one threshold per latent, >= 0),
                                            batchtopk and matryoshka (one global threshold)
    x_hat = codes @ W_dec + b_dec

Importers turn a foreign file into a `FlatSAE`, exporters write one out; `from_model` folds an hsae
model's input_scale into the weights and `to_model` builds an ordinary hsae model from one. Tensors
are held in float32, as hsae's models are (folding a scale or a bias rounds once, ~1e-7 relative;
float64 copies of a large dictionary would not fit in memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hsae.config import from_dict
from hsae.errors import HsaeError
from hsae.models import SAE, get_family

KINDS = ("relu", "topk", "batchtopk", "jumprelu", "matryoshka")
THRESHOLD_KINDS = ("jumprelu", "batchtopk", "matryoshka")
SIDECAR_NAME = "hsae.json"  # where an hsae export keeps its config (hsae.formats.sidecar)


@dataclass
class FlatSAE:
    kind: str
    W_enc: Tensor  # (d_in, n_latents)
    b_enc: Tensor  # (n_latents,)
    W_dec: Tensor  # (n_latents, d_in)
    b_dec: Tensor  # (d_in,)
    # Active latents per token (topk); the training k of batchtopk and matryoshka.
    k: int | None = None
    # jumprelu: (n_latents,); batchtopk and matryoshka: a 0-dim tensor.
    threshold: Tensor | None = None
    # matryoshka: the nested prefixes' ends [m_1, ..., n_latents].
    widths: list[int] | None = None
    # What an importer or exporter did to the numbers (folds, choices), for the provenance record.
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = (
            t.detach().to(torch.float32).cpu() for t in (self.W_enc, self.b_enc, self.W_dec, self.b_dec)
        )
        if self.threshold is not None:
            self.threshold = self.threshold.detach().to(torch.float32).cpu()
        if self.W_enc.dim() != 2:
            raise HsaeError(f"W_enc has shape {tuple(self.W_enc.shape)}; expected a matrix (d_in, n_latents)")
        d, m = self.W_enc.shape
        shapes = {"W_dec": (m, d), "b_enc": (m,), "b_dec": (d,)}
        for name, shape in shapes.items():
            if tuple(getattr(self, name).shape) != shape:
                raise HsaeError(
                    f"{name} has shape {tuple(getattr(self, name).shape)}, expected {shape} for W_enc of shape "
                    f"({d}, {m}); the file is damaged or its W_dec is stored transposed"
                )
        if self.kind not in KINDS:
            raise HsaeError(f"no flat SAE kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.kind in THRESHOLD_KINDS and self.threshold is None:
            raise HsaeError(f"a {self.kind} SAE needs a threshold")
        expected = (m,) if self.kind == "jumprelu" else ()
        if self.threshold is not None and tuple(self.threshold.shape) != expected:
            raise HsaeError(f"threshold has shape {tuple(self.threshold.shape)}, expected {expected}")
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            value = getattr(self, name)
            if value is not None and not bool(torch.isfinite(value).all()):
                raise HsaeError(f"{name} holds NaN or infinite values; the file is damaged")

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def n_latents(self) -> int:
        return self.W_enc.shape[1]


def subtract_b_dec_first(W_enc: Tensor, b_enc: Tensor, b_dec: Tensor) -> Tensor:
    """The b_enc that gives, with b_dec subtracted from the input first, the pre-activations
    x @ W_enc + b_enc of an encoder that does not subtract it (SAELens apply_b_dec_to_input=false,
    Gemma Scope, dictionary_learning's JumpReLU)."""
    return b_enc.float() + b_dec.float() @ W_enc.float()


def fold_decoder_norms(W_enc: Tensor, b_enc: Tensor, W_dec: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Unit decoder rows, with each row's norm moved into its encoder column and bias: for an SAE
    whose codes are defined as pre * ||W_dec_i|| and decoded with W_dec_i / ||W_dec_i|| (SAELens's
    rescale_acts_by_decoder_norm), the same codes and reconstructions."""
    norms = W_dec.float().norm(dim=1).clamp_min(1e-12)
    return W_enc.float() * norms, b_enc.float() * norms, W_dec.float() / norms[:, None]


# Families no foreign format can hold: their encoders are not one of the flat forms above.
_WHY_NOT = {
    "mp": "matching pursuit encodes iteratively from the dictionary alone (SAELens's matching_pursuit has "
    "another stopping rule)",
    "h-sae": "its child SAEs live in per-parent subspaces",
    "forest": "its levels are separate SAEs averaged into one reconstruction",
    "tree": "a child latent fires only with its parent",
}


def from_model(model: SAE) -> FlatSAE:
    """The raw-unit numbers of an hsae model: input_scale s folded into the weights as
    W_enc * s, W_dec / s, b_dec / s (the codes stay the same)."""
    arch = model.arch
    if arch not in KINDS:
        why = _WHY_NOT.get(arch, "it is not one of the flat families")
        raise HsaeError(
            f"the {arch} family cannot be written in another library's format ({why}); "
            f"formats hold the flat families {', '.join(KINDS)}"
        )
    s = float(model.config.input_scale)
    notes = [] if s == 1.0 else [f"input_scale {s:.9g} folded into the weights (W_enc * s, W_dec / s, b_dec / s)"]
    family_model: Any = model  # the threshold names differ by family (log_threshold, threshold)
    kind, threshold, widths = arch, None, None
    if arch == "jumprelu":
        threshold = family_model.log_threshold.detach().exp()
    elif arch in ("batchtopk", "matryoshka"):
        threshold = family_model.threshold.detach().reshape(())
        if float(threshold) < 0:
            # Never trained: hsae then encodes with per-token TopK, so that is what gets written.
            kind, threshold = "topk", None
            notes.append(
                f"the {arch} model has no learned threshold yet (never trained): written as TopK, as it encodes"
            )
        elif arch == "matryoshka":
            widths = family_model.config.fixed_bounds()[1:]
    return FlatSAE(
        kind=kind,
        W_enc=model.W_enc.detach().float() * s,
        b_enc=model.b_enc.detach().float(),
        W_dec=model.W_dec.detach().float() / s,
        b_dec=model.b_dec.detach().float() / s,
        k=model.config.k,
        threshold=threshold,
        widths=widths,
        notes=notes,
    )


def _take_saved_family(flat: FlatSAE, saved: dict[str, Any] | None) -> None:
    """A format that stores BatchTopK or Matryoshka as JumpReLU (Gemma Scope) loses the family: when
    the sidecar names one and every threshold is the same, the numbers are exactly that family's."""
    if not saved or flat.kind != "jumprelu" or saved.get("arch") not in ("batchtopk", "matryoshka"):
        return
    value = uniform_value(flat.threshold)  # type: ignore[arg-type]
    if value is None or value < 0:
        return
    family = get_family(saved["arch"])
    config: Any = from_dict(family.config_class, saved, what=f"{SIDECAR_NAME} sae config")
    flat.kind, flat.k, flat.threshold = saved["arch"], config.k, torch.tensor(value, dtype=torch.float32)
    if flat.kind == "matryoshka":
        flat.widths = config.fixed_bounds()[1:]
    flat.notes.append(f"a JumpReLU with one threshold for all latents, as hsae's {flat.kind} is: read as {flat.kind}")


def _config_values(flat: FlatSAE, saved: dict[str, Any] | None) -> dict[str, Any]:
    """The hsae config of `flat`: the saved one (an hsae export's sidecar) where it describes the same
    family and shape, else the family's defaults with what the numbers fix."""
    if (
        saved
        and saved.get("arch") == flat.kind
        and (saved.get("d_in"), saved.get("n_latents"))
        == (
            flat.d_in,
            flat.n_latents,
        )
    ):
        return dict(saved)
    values: dict[str, Any] = {"arch": flat.kind, "d_in": flat.d_in, "n_latents": flat.n_latents}
    if flat.kind in ("topk", "batchtopk", "matryoshka"):
        values["k"] = flat.k
    if flat.kind == "matryoshka":
        bounds = [0, *flat.widths]  # type: ignore[misc]
        values["group_fractions"] = [(hi - lo) / flat.n_latents for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    return values


def to_model(flat: FlatSAE, saved_config: dict[str, Any] | None = None) -> SAE:
    """An ordinary hsae model computing what `flat` computes (float32). `saved_config`, an hsae
    config written beside an export, restores the options and the input_scale it was trained with:
    the scale is divided back out of the weights (W_enc / s, W_dec * s, b_dec * s)."""
    _take_saved_family(flat, saved_config)
    if flat.kind == "jumprelu" and float(flat.threshold.max()) <= 0:  # type: ignore[union-attr]
        # relu(pre) * (pre > t) with every t <= 0 is relu(pre): ReLU, exactly.
        flat.kind, flat.threshold = "relu", None
        flat.notes.append("every JumpReLU threshold is <= 0, which is ReLU: read as relu")
    family = get_family(flat.kind)
    values = _config_values(flat, saved_config)
    config: Any = from_dict(family.config_class, values, what=f"imported {flat.kind} config")
    if flat.kind == "matryoshka" and config.fixed_bounds()[1:] != flat.widths:
        raise HsaeError(f"matryoshka widths {flat.widths} cannot be expressed as hsae group_fractions")
    s = float(config.input_scale)
    if family.unit_norm_decoder and not is_unit_norm(flat.W_dec * s):
        flat.notes.append(
            f"decoder rows have norms {describe_norms(flat.W_dec * s)}, kept as they are (normalising them would "
            "change the codes or, for TopK, which latents fire); hsae's training would renormalise them"
        )
    model = family.from_config(config)
    state = model.state_dict()
    state["W_enc"] = flat.W_enc / s
    state["b_enc"] = flat.b_enc
    state["W_dec"] = flat.W_dec * s
    state["b_dec"] = flat.b_dec * s
    if flat.kind == "jumprelu":
        # A threshold <= 0 lets every positive pre-activation through, as ReLU does: log 0 = -inf.
        state["log_threshold"] = flat.threshold.clamp_min(0).log()  # type: ignore[union-attr]
    elif flat.kind in ("batchtopk", "matryoshka"):
        state["threshold"] = flat.threshold.clamp_min(0).reshape(())  # type: ignore[union-attr]
    model.load_state_dict({key: value.to(torch.float32) for key, value in state.items()})
    return model.eval()


def uniform_value(t: Tensor) -> float | None:
    """The single value of `t` if all its entries are equal, else None."""
    flat = t.reshape(-1)
    return float(flat[0]) if flat.numel() and bool((flat == flat[0]).all()) else None


def is_unit_norm(W_dec: Tensor, tol: float = 1e-4) -> bool:
    norms = W_dec.float().norm(dim=1)
    return bool(((norms - 1).abs() <= tol).all())


def describe_norms(W_dec: Tensor) -> str:
    norms = W_dec.float().norm(dim=1)
    return f"{float(norms.min()):.4g} to {float(norms.max()):.4g}"
