"""Steering: add a feature's decoder direction at the model's hook and see what changes.

The added vector is decode(scale * e_i) - decode(0): the feature's contribution to the reconstruction
at activation `scale`, in the model's own units (so a scale near the feature's top activations is a
natural strength). It is added at every position of the hooked module's output (or input, for a
":input" hook site).

- An encoder (MiniLM): the sentence embedding of the text with and without the addition, and the
  WordNet glosses nearest to each (how the meaning moved).
- A causal LM: greedy continuations of the text with and without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hsae.errors import HsaeError
from hsae.interpret.embed import SentenceEmbedder


@torch.no_grad()
def steering_vector(sae, feature: int, scale: float) -> Tensor:
    if not 0 <= feature < sae.n_latents:
        raise HsaeError(f"feature {feature} does not exist: the model has features 0..{sae.n_latents - 1}")
    codes = torch.zeros(2, sae.n_latents, dtype=sae.W_dec.dtype, device=sae.W_dec.device)
    codes[0, feature] = scale
    out = sae.decode(codes)
    return (out[0] - out[1]).float()


@contextmanager
def steered(model, hook: str, vector: Tensor) -> Iterator[None]:
    """Within the block, `vector` is added to the hook site's activations at every position."""
    from hsae.sources.hf import resolve_hooks, split_hook

    module = resolve_hooks(model, [hook])[hook]
    _, site = split_hook(hook)

    def add(x):
        return x + vector.to(x.device, x.dtype)

    if site == "input":

        def pre_hook(mod, args):
            return (add(args[0]), *args[1:])

        handle = module.register_forward_pre_hook(pre_hook)
    else:

        def hook_fn(mod, args, output):
            if isinstance(output, tuple):
                return (add(output[0]), *output[1:])
            return add(output)

        handle = module.register_forward_hook(hook_fn)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class SteerResult:
    feature: int
    scale: float
    text: str
    kind: str  # "embedding" or "generation"
    cosine: float | None = None  # embedding: cosine of the sentence embeddings before and after
    before: list[dict[str, Any]] = field(default_factory=list)  # embedding: nearest glosses
    after: list[dict[str, Any]] = field(default_factory=list)
    plain: str | None = None  # generation: the continuation without and with steering
    steered_text: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class GlossIndex:
    """Embeddings of `count` WordNet noun glosses spread evenly over the noun synsets, computed once
    per process."""

    def __init__(self, embedder, count: int = 3000):
        from hsae.sources.text import wordnet_reader

        synsets = list(wordnet_reader().all_synsets("n"))
        step = max(1, len(synsets) // count)
        self.synsets = synsets[::step][:count]
        self.texts = [s.definition() for s in self.synsets]
        self.embeddings = embedder.embed(self.texts)

    def nearest(self, embedding: Tensor, k: int = 5) -> list[dict[str, Any]]:
        cos = self.embeddings @ embedding
        best = cos.topk(min(k, cos.numel()))
        return [
            {"synset": self.synsets[i].name(), "gloss": self.texts[i], "cosine": round(float(c), 4)}
            for i, c in zip(best.indices.tolist(), best.values, strict=True)
        ]


class Steerer:
    """Steers one model's base network at its hook (loaded once, reused for every request)."""

    def __init__(self, sae, loaded, hook: str, glosses: int = 3000):
        self.sae, self.loaded, self.hook, self.glosses = sae, loaded, hook, glosses
        self.causal = getattr(loaded.model, "get_output_embeddings", lambda: None)() is not None
        self.embedder: SentenceEmbedder | None = None
        self.index: GlossIndex | None = None

    def run(self, feature: int, scale: float, text: str, max_new_tokens: int = 30) -> SteerResult:
        if not text.strip():
            raise HsaeError("steering needs some text: pass --text")
        vector = steering_vector(self.sae, feature, scale)
        if self.causal:
            return self._generate(feature, scale, text, vector, max_new_tokens)
        return self._embed(feature, scale, text, vector)

    @torch.no_grad()
    def _generate(self, feature: int, scale: float, text: str, vector: Tensor, max_new_tokens: int) -> SteerResult:
        tokenizer, model = self.loaded.tokenizer, self.loaded.model
        inputs = tokenizer(text, return_tensors="pt").to(self.loaded.device)
        settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.eos_token_id}

        def continuation() -> str:
            out = model.generate(**inputs, **settings)
            return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

        plain = continuation()
        with steered(model, self.hook, vector):
            steered_text = continuation()
        return SteerResult(feature, scale, text, "generation", plain=plain, steered_text=steered_text)

    def _embed(self, feature: int, scale: float, text: str, vector: Tensor) -> SteerResult:
        if self.embedder is None:
            self.embedder = SentenceEmbedder(self.loaded)
        if self.index is None:
            self.index = GlossIndex(self.embedder, self.glosses)
        before = self.embedder.embed([text])[0]
        with steered(self.loaded.model, self.hook, vector):
            after = self.embedder.embed([text])[0]
        return SteerResult(
            feature,
            scale,
            text,
            "embedding",
            cosine=round(float(before @ after), 4),
            before=self.index.nearest(before),
            after=self.index.nearest(after),
        )


def steer(
    model_dir, feature: int, scale: float, text: str, *, glosses: int = 3000, max_new_tokens: int = 30
) -> SteerResult:
    """Load a model folder's SAE and base model and steer once (see `Steerer`)."""
    from hsae.interpret.streams import recorded_model
    from hsae.models import load
    from hsae.models.base import read_config
    from hsae.sources.hf import load_model

    sae = load(model_dir)
    name, hook = recorded_model(read_config(model_dir))
    return Steerer(sae, load_model(name), hook, glosses).run(feature, scale, text, max_new_tokens)
