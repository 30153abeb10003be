"""Running the base model with something spliced in at the SAE's hook, and finding that model.

Evaluators that need the network the SAE was trained on (downstream fidelity, absorption, WordNet
alignment) share this module:

- `base_model_for(ctx)` finds the base model and hook an SAE belongs to: `ctx.options["base_model"]`
  (a `LoadedModel` or a model name/folder) and `ctx.options["hook"]` if given, else the "data"
  section of the model folder's config.json (what the SAE was trained on), else the evaluated
  source's `describe()`. It loads the model once per process (local files only: evaluation never
  downloads), checks that the hook exists and that its width equals the SAE's `d_in`, and raises
  `Skip` with the reason otherwise (activation files record no model; a hub name not on disk; ...).
- `spliced(module, replace, mask)` is a context manager: while it is open, the module's output (the
  first element when it returns a tuple) is replaced at the positions where `mask` (batch, seq) is
  True by `replace(rows)`, rows being the (n, width) activations at those positions. Positions
  outside the mask pass through unchanged.
- `splice_mask(attention_mask, special_tokens_mask, keep_special)` gives the positions to splice:
  real (non-padding) tokens, minus special tokens unless the activations were harvested with them —
  the same positions `hsae.sources.hf.Harvester` keeps, so the SAE only ever sees the kind of token
  it was trained on.
- `sae_replacement(sae)` and `zero_replacement` are the two replacements the metrics use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hsae.errors import HsaeError

Replacement = Callable[[Tensor], Tensor]

# Loaded base models, by (name or folder): loading MiniLM takes seconds and every evaluator needs it.
_LOADED: dict[str, Any] = {}


def splice_mask(attention_mask: Tensor, special_tokens_mask: Tensor | None, keep_special: bool = False) -> Tensor:
    """(batch, seq) bool: the positions whose activation the SAE replaces."""
    mask = attention_mask.bool()
    if not keep_special and special_tokens_mask is not None:
        mask = mask & ~special_tokens_mask.bool()
    return mask


@contextmanager
def spliced(module: nn.Module, replace: Replacement, mask: Tensor) -> Iterator[None]:
    """Replace `module`'s output at `mask` positions by `replace(rows)` while the context is open."""

    def hook(mod, args, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(out, Tensor) or out.dim() != 3 or tuple(out.shape[:2]) != tuple(mask.shape):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise HsaeError(f"cannot splice at a module whose output is {shape}, not (batch, tokens, width)")
        m = mask.to(out.device)
        new = out.clone()
        rows = out[m]
        if rows.shape[0]:
            new[m] = replace(rows).to(dtype=out.dtype, device=out.device)
        if isinstance(output, tuple):
            return (new, *output[1:])
        if isinstance(output, list):
            return [new, *output[1:]]
        return new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def sae_replacement(sae) -> Replacement:
    """Rows -> the SAE's reconstruction of them (raw units)."""

    def replace(rows: Tensor) -> Tensor:
        with torch.no_grad():
            return sae.decode(sae.encode(rows.float())).float()

    return replace


def zero_replacement(rows: Tensor) -> Tensor:
    return torch.zeros_like(rows)


# ----- finding the base model ---------------------------------------------------------------------
@dataclass
class BaseModel:
    """The network an SAE belongs to, loaded, with the hook and how activations were harvested."""

    loaded: Any  # hsae.sources.hf.LoadedModel
    hook: str
    keep_special: bool = False
    max_length: int | None = None
    record: dict[str, Any] = field(default_factory=dict)  # the "data" record it was found in

    @property
    def module(self) -> nn.Module:
        return dict(self.loaded.model.named_modules())[self.hook]

    @property
    def key(self) -> str:
        """Identifies (model, hook) for caches of SAE-independent results."""
        return f"{self.loaded.path or self.loaded.name}|{id(self.loaded.model)}|{self.hook}|{self.keep_special}"

    def is_causal_lm(self) -> bool:
        name = type(self.loaded.model).__name__
        return name.endswith(("ForCausalLM", "LMHeadModel"))

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, Tensor]:
        limit = min(x for x in (max_length, self.max_length, self.loaded.max_length) if x)
        return dict(
            self.loaded.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="pt",
                return_special_tokens_mask=True,
            )
        )


def _data_record(ctx) -> dict[str, Any]:
    """The record naming the base model: the model folder's config "data", else the source's."""
    if ctx.model_dir is not None:
        try:
            from hsae.models.base import read_config

            data = read_config(ctx.model_dir).get("data") or {}
        except HsaeError:
            data = {}
        if isinstance(data.get("model"), dict):
            return data
    describe = getattr(ctx.source, "describe", None)
    data = describe() if callable(describe) else {}
    return data if isinstance(data.get("model"), dict) else {}


def _keep_special(record: dict[str, Any]) -> bool:
    if "keep_special" in record:  # on-the-fly sources describe the harvester at the top level
        return bool(record["keep_special"])
    return bool((record.get("harvest") or {}).get("keep_special", False))


def _max_length(record: dict[str, Any]) -> int | None:
    value = record.get("max_length", (record.get("harvest") or {}).get("max_length"))
    return int(value) if value else None


def _load(spec: str):
    from hsae.sources.hf import load_model

    if spec not in _LOADED:
        _LOADED[spec] = load_model(spec, device="cpu", local_files_only=True)
    return _LOADED[spec]


def base_model_for(ctx) -> BaseModel:
    """The base model of `ctx.model` (see the module docstring); raises Skip when there is none."""
    from hsae.eval.run import Skip

    if "base_model_resolved" in ctx.cache:
        return ctx.cache["base_model_resolved"]
    record = _data_record(ctx)
    option = ctx.options.get("base_model")
    hook = ctx.options.get("hook") or record.get("hook")
    loaded = None
    if option is not None and not isinstance(option, str):
        loaded = option  # a LoadedModel handed in by the caller
    else:
        source_loaded = getattr(getattr(ctx.source, "harvester", None), "loaded", None)
        if option is None and source_loaded is not None and getattr(ctx.source, "hook", None) == hook:
            loaded = source_loaded  # an on-the-fly source already holds the model
        else:
            model_record = record.get("model") or {}
            spec = option or model_record.get("path") or model_record.get("name")
            if option is None and model_record.get("path") and not Path(model_record["path"]).is_dir():
                spec = model_record.get("name")  # the folder moved: try the name (the embedded copy)
            if not spec:
                raise Skip(
                    "the data records no base model to splice into (activation files carry none; "
                    "evaluate on a store made by `hsae harvest`, or pass the base_model option)"
                )
            try:
                loaded = _load(str(spec))
            except HsaeError as err:
                raise Skip(f"cannot load the base model {spec}: {err}") from None
    if not hook:
        raise Skip("the data records no hook name; pass the hook option")
    from hsae.sources.hf import HookedModel

    try:
        width = HookedModel(loaded, [hook]).widths()[hook]
    except HsaeError as err:
        raise Skip(f"cannot hook the base model at {hook}: {err}") from None
    if width != ctx.model.d_in:
        raise Skip(f"the base model's {hook} has width {width} but the SAE takes {ctx.model.d_in}")
    base = BaseModel(loaded, hook, _keep_special(record), _max_length(record), record)
    ctx.cache["base_model_resolved"] = base
    return base


def run_model(base: BaseModel, inputs: dict[str, Tensor], replace: Replacement | None = None):
    """A full forward pass on tokenized `inputs` (with special_tokens_mask), optionally spliced."""
    inputs = dict(inputs)
    special = inputs.pop("special_tokens_mask", None)
    device = base.loaded.device
    model_inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.inference_mode():
        if replace is None:
            return base.loaded.model(**model_inputs)
        mask = splice_mask(inputs["attention_mask"], special, base.keep_special)
        with spliced(base.module, replace, mask):
            return base.loaded.model(**model_inputs)


__all__ = ["splice_mask", "spliced", "sae_replacement", "zero_replacement", "BaseModel", "base_model_for", "run_model"]
