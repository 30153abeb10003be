"""Typed configuration, validated once at the edge and saved beside every artefact.

Three records describe a run: `SAEConfig` (or a family's subclass: the model), `TrainConfig` (the
loop) and a data record (where activations came from). `config.json` beside the weights holds all
three, so the config that trained a model is the one saved with it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, Union

from hsae.errors import HsaeError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a JSON or command-line value to the annotated type, or say what is wrong."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except HsaeError as err:
                errors.append(str(err))
        raise HsaeError(errors[0] if errors else f"{name}: cannot be None")
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise HsaeError(f"{name}: expected a list, got {value!r}")
        items = [_coerce(v, arg, name) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise HsaeError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise HsaeError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    as_float = float(value)  # "1e6"
                except ValueError:
                    as_float = math.nan
                if math.isfinite(as_float) and as_float.is_integer():
                    return int(as_float)
        raise HsaeError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond the float range
                number = math.inf
        elif isinstance(value, str):
            try:
                number = float(value.replace("_", "")) if value.strip() else None
            except ValueError:
                pass
        if number is None:
            raise HsaeError(f"{name}: expected a number, got {value!r}")
        if not math.isfinite(number):
            # NaN and infinities pass every comparison a validation makes (or fail it silently), and
            # JSON cannot hold them: no option takes one.
            raise HsaeError(f"{name}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise HsaeError(f"{name}: expected a string, got {value!r}")
    if isinstance(tp, type) and issubclass(tp, dict):
        if isinstance(value, dict):
            return value
        raise HsaeError(f"{name}: expected a mapping, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, what: str | None = None, complete: bool = False) -> T:
    """Build dataclass `cls` from a mapping, refusing unknown keys and converting types. `complete`
    (for configs read back from a file hsae wrote, which holds every field) refuses missing fields
    instead of filling in defaults: a default would silently change what was saved. The one exception
    is a field in `cls.ADDED_FIELDS` (fields added after such files were first written, each with the
    value an older file implies: what its model was trained with, not necessarily today's default)."""
    what = what or cls.__name__
    if not isinstance(data, dict):
        raise HsaeError(f"{what}: expected a mapping of options, got {type(data).__name__}")
    if complete:
        data = {**getattr(cls, "ADDED_FIELDS", {}), **data}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(map(str, set(data) - set(fields)))
    if unknown:
        raise HsaeError(f"{what}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    missing = sorted(set(fields) - set(data)) if complete else []
    if missing:
        raise HsaeError(
            f"{what}: {', '.join(missing)} missing; the file is damaged or was not written by this version of hsae "
            "(it would load with defaults that are not what was saved)"
        )
    kwargs = {k: _coerce(v, hints[k], f"{what}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        raise HsaeError(f"{what}: {err}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """`["a=1", "b=x"]` -> {"a": "1", "b": "x"} (command-line `--option KEY=VALUE`)."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise HsaeError(f"--option {item!r}: expected KEY=VALUE, e.g. --option aux_coef=0.03")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = value.strip()
    return out


@dataclass
class SAEConfig:
    """What every SAE family needs. Families subclass it to add their own typed options."""

    arch: str
    d_in: int
    n_latents: int
    # Active latents per token for TopK-style families; the L0 target for penalty families.
    k: int | None = None
    # Raw activations are multiplied by this before encoding (the trainer sets it so that the mean
    # norm is sqrt(d_in)); decode divides it out again, so every checkpoint works on raw inputs.
    input_scale: float = 1.0

    def require_k(self) -> int:
        """k, for the families that cannot work without one (validation has refused None for them)."""
        if self.k is None:
            raise HsaeError(f"the {self.arch} family needs --k")
        return self.k

    def validate(self) -> None:
        if self.d_in <= 0:
            raise HsaeError(f"d_in must be positive, got {self.d_in}")
        if self.n_latents <= 0:
            raise HsaeError(f"--n-latents must be positive, got {self.n_latents}")
        if self.k is not None and not (0 < self.k < self.n_latents):
            raise HsaeError(
                f"--k {self.k} must be between 1 and n_latents-1 ({self.n_latents - 1}); lower --k or raise --n-latents"
            )
        if not (math.isfinite(self.input_scale) and self.input_scale > 0):
            raise HsaeError(f"input_scale must be a positive number, got {self.input_scale}")


# The default learning rate at 16384 latents. Gao et al.'s 2e-4 is too low for hsae's parametrisation
# (inputs at mean norm sqrt(d_in), unit decoder rows, W_enc = W_dec^T at init). Measured on MiniLM
# layer 3 (the demo store, 3072 latents, k=32, 1500 steps of 2048 tokens; final training FVU, dead
# fraction) at 1x / 3x / 5x / 10x / 30x Gao's rate: topk 0.137 / 0.109 / 0.102 / 0.098 / 0.128 (3.5%
# dead at 30x); batchtopk 0.137 / 0.108 / 0.100 / 0.095; matryoshka 0.159 / - / 0.121 / 0.116 (0.5%
# dead at 10x); relu at L0 32 0.316 (54% dead) / - / 0.136 (21%) / 0.123 (14%); jumprelu 0.227 (L0 77
# for a target of 32) / - / - / 0.127 (L0 56, 1% dead). 5x keeps nearly all of the gain with no dead
# latents in the TopK-style families.
DEFAULT_LR_AT_16K = 1e-3
# The default dead window, in mean intervals between one latent's firings (n_latents / k tokens at
# L0 k): a latent firing at under about 1/64 of the mean rate counts as dead, and AuxK trains it on
# the residual. Measured on SAELens's synthetic hierarchies and MiniLM: docs/hierarchy.md.
DEAD_WINDOW_MEAN_INTERVALS = 64
# Families without a k have no mean interval to scale by (their dead count is only reported).
DEAD_WINDOW_WITHOUT_K = 1_000_000
# Rates above this are refused up front: Adam moves every weight by about lr per step, so beyond 1 a
# single step is larger than a unit-norm decoder row, and the loss diverges within steps.
MAX_LR = 1.0


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 1000
    batch_size: int = 4096
    # None: DEFAULT_LR_AT_16K / sqrt(n_latents / 2**14), Gao et al.'s scaling in the width with a
    # base 5x theirs (see DEFAULT_LR_AT_16K).
    lr: float | None = None
    lr_warmup_steps: int = 100
    # Linear decay to zero over this final fraction of the run.
    lr_decay_fraction: float = 0.2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip_norm: float | None = None
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 10
    # A latent that has not fired for this many tokens counts as dead (AuxK revives those). None:
    # DEAD_WINDOW_MEAN_INTERVALS x n_latents / k tokens (see resolved_dead_window).
    dead_window_tokens: int | None = None
    # How b_dec starts: "geometric_median", "mean" or "zeros".
    b_dec_init: str = "geometric_median"
    # Scale inputs to mean norm sqrt(d_in) for training; the factor is saved in the SAE config.
    normalize_inputs: bool = True
    device: str = "cpu"
    wandb_project: str | None = None

    def validate(self) -> None:
        if self.steps <= 0:
            raise HsaeError(f"--steps must be positive, got {self.steps}")
        if self.batch_size <= 0:
            raise HsaeError(f"--batch-size must be positive, got {self.batch_size}")
        if self.lr is not None and not self.lr > 0:
            raise HsaeError(f"--lr must be a positive number, got {self.lr}")
        if self.lr is not None and self.lr > MAX_LR:
            raise HsaeError(
                f"--lr {self.lr:g} is far above any rate Adam trains an SAE with (the default is "
                f"{DEFAULT_LR_AT_16K:g} at 16384 latents; above {MAX_LR:g} every step moves each weight by more "
                "than a unit decoder row's length, and the loss diverges): give a rate of at most "
                f"{MAX_LR:g}, or leave --lr out"
            )
        if self.lr_warmup_steps < 0:
            raise HsaeError(f"lr_warmup_steps must be 0 (no warm-up) or more, got {self.lr_warmup_steps}")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise HsaeError(f"lr_decay_fraction must be in [0, 1], got {self.lr_decay_fraction}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise HsaeError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise HsaeError(f"grad_clip_norm must be positive (or none: no clipping), got {self.grad_clip_norm}")
        if self.seed < 0:
            raise HsaeError(f"--seed must be 0 or more, got {self.seed}")
        if self.checkpoint_every <= 0:
            raise HsaeError(f"--checkpoint-every must be positive, got {self.checkpoint_every}")
        if self.log_every <= 0:
            raise HsaeError(f"--log-every must be positive, got {self.log_every}")
        if self.dead_window_tokens is not None and self.dead_window_tokens <= 0:
            raise HsaeError(f"dead_window_tokens must be positive, got {self.dead_window_tokens}")
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise HsaeError(f"b_dec_init {self.b_dec_init!r} is not one of geometric_median, mean, zeros")

    def resolved_lr(self, n_latents: int) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR_AT_16K / math.sqrt(n_latents / 2**14)

    def resolved_dead_window(self, n_latents: int, k: int | None) -> int:
        """Tokens without firing after which a latent counts as dead, for a model of this width and k."""
        if self.dead_window_tokens is not None:
            return self.dead_window_tokens
        if k is None:
            return DEAD_WINDOW_WITHOUT_K
        return max(1, round(DEAD_WINDOW_MEAN_INTERVALS * n_latents / k))
