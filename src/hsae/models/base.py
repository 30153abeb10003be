"""The SAE interface every family implements (docs/architecture.md, "Adding a family").

A family subclasses `SAE[ItsConfig]`, declares its typed config class, and overrides `activate`
(pre-activations to codes) and, where it has them, `extra_losses`, `forward` and `after_step`.
Encoding, decoding, input scaling, the decoder-norm rule, `hierarchy()` and save/load are shared.

Training and inference are separate: `forward` is the family's reference formulation (what eval
runs, and what the generic `AutogradStep` differentiates), while the class attribute `train_step`
says how a training step is computed. A family keeps the generic step or declares a fused one, e.g.
`train_step = FusedTopKStep(selection=PerTokenTopK())` (hsae.models.sparse.steps); tests check
every fused step against the family's own `forward`.

Conventions:
- `W_enc` is (d_in, n_latents), `W_dec` is (n_latents, d_in) with unit-norm rows unless the family
  sets `unit_norm_decoder = False`. Families with another parametrisation override `create_weights`
  and expose both as read-only properties.
- Raw activations are multiplied by `config.input_scale` on the way in and divided by it on the way
  out, so a model (and every checkpoint) works on raw activations as they come from the network.
- Loss terms are in normalised units: "mse" is the squared error summed over dimensions, averaged
  over tokens; family terms (AuxK, L1, L0, ...) are already weighted; the training loss is their sum.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from hsae.atomic import write_json, write_safetensors
from hsae.config import SAEConfig, from_dict, to_dict
from hsae.errors import HsaeError
from hsae.models.codes import Codes, SparseCodes
from hsae.models.registry import get_family
from hsae.models.sparse.ops import sparse_decode
from hsae.version import __version__

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"

C = TypeVar("C", bound=SAEConfig)


@dataclass
class StepContext:
    """What a training step tells the model beyond the batch."""

    step: int
    total_steps: int
    # Latents that have not fired within the trainer's dead window (None outside training).
    dead_mask: Tensor | None = None

    @property
    def progress(self) -> float:
        return self.step / max(1, self.total_steps)


@dataclass
class SAEOutput:
    x_hat: Tensor | None  # in raw units, like the input (the trainer drops it before the backward)
    codes: Codes
    losses: dict[str, Tensor] = field(default_factory=dict)  # normalised units, already weighted

    @property
    def loss(self) -> Tensor:
        terms = iter(self.losses.values())
        total = next(terms)
        for term in terms:
            total = total + term
        return total


class TrainStep(Protocol):
    """How a family computes one training step's output (losses to backpropagate, codes, x_hat)."""

    def __call__(self, model: Any, x: Tensor, ctx: StepContext) -> SAEOutput: ...


@dataclass(frozen=True)
class AutogradStep:
    """The generic training step: the family's own `forward`, differentiated by autograd."""

    def __call__(self, model: Any, x: Tensor, ctx: StepContext) -> SAEOutput:
        return model(x, ctx)


class SAE(nn.Module, Generic[C]):
    """Base class of every family. See the module docstring for the conventions."""

    arch: ClassVar[str] = ""
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    unit_norm_decoder: ClassVar[bool] = True
    # Whether encode() honours a `k` argument at inference (nested-over-k families and TopK).
    supports_k: ClassVar[bool] = False
    # Whether the family learns its forest (hierarchy() reports it); otherwise one is extracted post
    # hoc (hsae.interpret.forest) and stored in the `parents` buffer.
    builtin_hierarchy: ClassVar[bool] = False
    train_step: ClassVar[TrainStep] = AutogradStep()

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    parents: Tensor

    def __init__(self, config: C):
        super().__init__()
        self.config: C = config
        # A forest found post hoc (interpret/) for families without one built in; -1 = root.
        self.register_buffer("parents", torch.full((config.n_latents,), -1, dtype=torch.long))
        self.create_weights()
        # On the meta device (parameter_count) there are no values to set, and drawing them would
        # load torch's reference ops (torch._dynamo, sympy: a second of start-up).
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def create_weights(self) -> None:
        """The encoder/decoder pair W_enc, b_enc, W_dec, b_dec (values are set by reset_parameters)."""
        d, m = self.config.d_in, self.config.n_latents
        self.W_enc = nn.Parameter(torch.empty(d, m))
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(torch.empty(m, d))
        self.b_dec = nn.Parameter(torch.zeros(d))

    # ----- initialisation -------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Random unit decoder rows, encoder = decoder transpose (Gao et al., Conerly et al.)."""
        with torch.no_grad():
            w = torch.randn_like(self.W_dec)
            w /= w.norm(dim=1, keepdim=True)
            self.W_dec.copy_(w)
            self.W_enc.copy_(w.T)
            self.b_enc.zero_()
            self.b_dec.zero_()

    @property
    def n_latents(self) -> int:
        return self.config.n_latents

    @property
    def d_in(self) -> int:
        return self.config.d_in

    # ----- the interface -----------------------------------------------------------------------
    def scale_in(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[-1] != self.d_in:
            raise HsaeError(
                f"expected activations of shape (n, {self.d_in}), got {tuple(x.shape)}; this SAE was "
                f"trained on width {self.d_in}"
            )
        x = x.to(dtype=self.W_enc.dtype, device=self.W_enc.device)
        s = self.config.input_scale
        return x if s == 1.0 else x * s

    def pre_activations(self, xn: Tensor) -> Tensor:
        """(n, n_latents) encoder pre-activations of normalised inputs."""
        return torch.addmm(self.b_enc, xn - self.b_dec, self.W_enc)

    def activate(self, pre: Tensor, k: int | None = None) -> Codes:
        """Pre-activations to codes: the family's nonlinearity."""
        raise NotImplementedError

    def select(self, xn: Tensor, pre: Tensor) -> Codes:
        """The training forward's codes of normalised inputs xn with pre-activations `pre` (a family
        that chooses entries by other scores than `pre` overrides this, e.g. TopK's bf16 screening)."""
        return self.activate(pre)

    def encode_normalized(self, xn: Tensor, k: int | None = None) -> Codes:
        return self.activate(self.pre_activations(xn), k)

    def decode_normalized(self, codes: Codes) -> Tensor:
        if isinstance(codes, SparseCodes):
            return sparse_decode(codes.indices, codes.values, self.W_dec, codes.offsets) + self.b_dec
        return torch.addmm(self.b_dec, codes.to(self.W_dec.dtype), self.W_dec)

    def encode(self, x: Tensor, k: int | None = None) -> Codes:
        """Codes of raw activations x (n, d_in). `k` picks the number of active latents where the
        family supports choosing it at inference."""
        if k is not None and not self.supports_k:
            raise HsaeError(f"the {self.arch} family does not take k at inference")
        return self.encode_normalized(self.scale_in(x), k)

    def decode(self, codes: Codes) -> Tensor:
        """Raw-unit reconstruction from codes."""
        return self.decode_normalized(codes) / self.config.input_scale

    def forward(self, x: Tensor, ctx: StepContext | None = None) -> SAEOutput:
        """The reference formulation: encode, decode and every loss term, all through autograd."""
        xn = self.scale_in(x)
        pre = self.pre_activations(xn)
        codes = self.select(xn, pre)
        xn_hat = self.decode_normalized(codes)
        losses = {"mse": (xn_hat - xn).pow(2).sum(-1).mean()}
        losses.update(self.extra_losses(xn, pre, codes, xn_hat, ctx))
        return SAEOutput(x_hat=xn_hat / self.config.input_scale, codes=codes, losses=losses)

    def extra_losses(
        self, xn: Tensor, pre: Tensor, codes: Codes, xn_hat: Tensor, ctx: StepContext | None
    ) -> dict[str, Tensor]:
        """Family loss terms besides the reconstruction (weighted)."""
        return {}

    def training_forward(self, x: Tensor, ctx: StepContext) -> SAEOutput:
        """One training step's output, computed by the family's declared `train_step`."""
        return type(self).train_step(self, x, ctx)

    def after_step(self, out: SAEOutput, ctx: StepContext) -> None:
        """Called after each optimiser step (thresholds, coefficient controllers, ...)."""

    def training_state(self) -> dict[str, Tensor]:
        """State that shapes later steps but is neither a parameter nor a buffer (e.g. counts a
        family accumulates between events); the trainer checkpoints it, so resumed runs are exact."""
        return {}

    def load_training_state(self, state: dict[str, Tensor]) -> None:
        """Restore what `training_state` returned."""
        if state:
            raise HsaeError(f"the {self.arch} family keeps no training state, but the checkpoint has {sorted(state)}")

    def hierarchy(self) -> Tensor:
        """Parent of each latent (-1 = root), LongTensor (n_latents,)."""
        return self.parents.detach().clone().cpu()

    def set_hierarchy(self, parents: Tensor) -> None:
        """Store a forest found post hoc (families with a built-in tree refuse)."""
        parents = torch.as_tensor(parents, dtype=torch.long)
        if parents.shape != (self.n_latents,):
            raise HsaeError(f"parents must have shape ({self.n_latents},), got {tuple(parents.shape)}")
        self.parents.copy_(parents)

    # ----- decoder constraint --------------------------------------------------------------------
    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component that would change decoder row norms."""
        if not self.unit_norm_decoder or self.W_dec.grad is None:
            return
        w, g = self.W_dec, self.W_dec.grad
        g -= (g * w).sum(-1, keepdim=True) * w

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        if self.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    # ----- persistence -------------------------------------------------------------------------
    def save(self, directory: str | Path, record: dict[str, Any] | None = None) -> None:
        """Write config.json and weights.safetensors (each atomically). `record` adds the train and
        data sections to config.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_safetensors(directory / WEIGHTS_FILE, dict(self.state_dict()), metadata={"arch": self.arch})
        payload = {"hsae_version": __version__, "sae": to_dict(self.config)}
        payload.update(record or {})
        payload["sae"] = to_dict(self.config)
        write_json(directory / CONFIG_FILE, payload)

    @classmethod
    def from_config(cls, config: Any) -> SAE:
        """A fresh model of this family from its (validated) config."""
        return cls(config)


def read_config(directory: str | Path) -> dict[str, Any]:
    """A model folder's config.json: a JSON object whose sections ("sae", "train", "data", ...) are
    objects (or null); anything else is refused as a damaged folder."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise HsaeError(f"{directory} holds no hsae model ({CONFIG_FILE} is missing); train one with `hsae train`")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HsaeError(f"{path} is not valid JSON ({err}); the model folder is damaged") from None
    if not isinstance(record, dict):
        raise HsaeError(
            f"{path} holds a JSON {type(record).__name__}, not an object with 'sae', 'train' and 'data' sections; "
            "the model folder is damaged"
        )
    for section in ("sae", "train", "data"):
        if record.get(section) is not None and not isinstance(record[section], dict):
            raise HsaeError(f"{path}: its '{section}' section is not an object; the model folder is damaged")
    return record


def parameter_count(family: type[SAE], config: SAEConfig) -> int:
    """The number of parameters a model of `config` has, without allocating it: counted on the meta
    device, or, for a family whose set-up needs real values, the lower bound every family meets (a
    dictionary of n_latents directions in d_in)."""
    try:
        with torch.device("meta"):
            model = family.from_config(config)
        return sum(p.numel() for p in model.parameters())
    except (RuntimeError, NotImplementedError):
        return config.n_latents * config.d_in


def available_memory(device: str | torch.device) -> int | None:
    """Bytes free for new tensors on `device` (None when it cannot be told)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(needed: int, device: str | torch.device, what: str, fix: str) -> None:
    """Refuse, before allocating, work that needs more memory than `device` has free."""
    free = available_memory(device)
    if free is not None and needed > free:
        raise HsaeError(
            f"{what} needs at least {needed / 2**30:.1f} GiB of memory, but {torch.device(device)} has "
            f"{free / 2**30:.1f} GiB free; {fix}"
        )


def _read_weights(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise HsaeError(
            f"{path} is not a readable safetensors file ({err}); it is damaged or truncated: copy or train the model "
            "again"
        ) from None


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "floating point"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "integers"


def check_state(state: dict[str, Tensor], expected: dict[str, Tensor], path: Path, what: str) -> None:
    """`state` (tensors read from `path`) must have the names, shapes and kinds of `expected` (a
    model's state dict) and hold no NaN; otherwise a named error."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise HsaeError(
            f"{path} does not match {what} (missing {missing}, unexpected {unexpected}); it is damaged or belongs "
            "to another model"
        )
    for name, want in expected.items():
        got = state[name]
        if tuple(got.shape) != tuple(want.shape):
            raise HsaeError(
                f"{path}: {name} has shape {tuple(got.shape)} but {what} needs {tuple(want.shape)}; the weights "
                "do not belong to this config"
            )
        if _kind(got.dtype) != _kind(want.dtype):
            raise HsaeError(
                f"{path}: {name} is {str(got.dtype).replace('torch.', '')}, but {what} keeps it as "
                f"{_kind(want.dtype)}; the weights are damaged or were not written by hsae"
            )
        # (an infinity can mean something in a family's own tensors, e.g. the log of a zero threshold;
        # NaN never does)
        if got.dtype.is_floating_point and bool(got.isnan().any()):
            _refuse_non_finite(path, name, got)


def _refuse_non_finite(path: Path, name: str, values: Tensor) -> None:
    bad = int((~torch.isfinite(values)).sum())
    raise HsaeError(
        f"{path}: {name} holds {bad} NaN or infinite value(s); the model diverged or the file is damaged: train it "
        "again (with a lower --lr)"
    )


def check_finite_weights(model: SAE, path: Path) -> None:
    """The encoder and decoder every family exposes hold finite numbers (a diverged model's do not)."""
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            values = getattr(model, name, None)  # (a family may have no encoder bias)
            if isinstance(values, Tensor) and values.is_floating_point() and not bool(torch.isfinite(values).all()):
                _refuse_non_finite(path, name, values)


def load(directory: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load a model saved by `SAE.save` (or any hsae checkpoint folder): every config field, every
    weight (names, shapes, kinds) and finite values are checked, each failure a named HsaeError."""
    directory = Path(directory)
    record = read_config(directory)
    sae_record = record.get("sae")
    if not isinstance(sae_record, dict) or not isinstance(sae_record.get("arch"), str):
        raise HsaeError(f"{directory / CONFIG_FILE} has no 'sae' section with an 'arch'; not an hsae model")
    family = get_family(sae_record["arch"])
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise HsaeError(f"{directory} has a config but no {WEIGHTS_FILE}; the model folder is incomplete")
    config = from_dict(family.config_class, sae_record, what=f"{directory / CONFIG_FILE} sae", complete=True)
    state = _read_weights(weights_path)  # (as much memory as the file is large, no more)
    size = parameter_count(family, config)
    # The file must hold the model's float32 (or half) weights: a config whose model would be far
    # larger than its weights file is damaged, and building that model could exhaust the memory.
    if size * 2 > weights_path.stat().st_size * 1.01 + 4096:
        raise HsaeError(
            f"{directory / CONFIG_FILE} describes a model of {size} parameters ({config.n_latents} latents, d_in "
            f"{config.d_in}), more than {weights_path} ({weights_path.stat().st_size} bytes) holds; the config "
            "does not belong to these weights"
        )
    check_memory(size * 4, "cpu", f"the model in {directory}", "load it on a machine with more memory")
    model = family.from_config(config)
    check_state(state, model.state_dict(), weights_path, f"the {family.arch} model of {directory / CONFIG_FILE}")
    dtype = state["W_dec"].dtype if "W_dec" in state else None
    if dtype is not None and dtype.is_floating_point:
        model.to(dtype)  # the weights file decides the dtype
    parents = state.get("parents")
    if parents is not None and parents.numel() and not bool(((parents >= -1) & (parents < config.n_latents)).all()):
        raise HsaeError(
            f"{weights_path}: parents holds values outside -1..{config.n_latents - 1} (each latent's parent, -1 for "
            "a root); the file is damaged: extract the forest again with `hsae tree --save`"
        )
    model.load_state_dict(state)
    check_finite_weights(model, weights_path)
    return model.to(device).eval()


def init_b_dec_geometric_median(x: Tensor, iters: int = 100, eps: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm for the geometric median of rows of x."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        dist = (x - y).norm(dim=1).clamp_min(eps)
        w = 1.0 / dist
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= 1e-7 * max(1.0, float(y.norm())):
            y = y_new
            break
        y = y_new
    return y.float()


def standard_input_scale(x: Tensor) -> float:
    """Factor that brings the mean row norm of x to sqrt(d)."""
    mean_norm = float(x.float().norm(dim=1).mean())
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise HsaeError("activations have zero or non-finite norm; cannot normalise them")
    return math.sqrt(x.shape[1]) / mean_norm
