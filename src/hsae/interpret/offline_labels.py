"""Labels that need no network: the tokens most over-represented where a feature fires, and on WordNet
text the most specific WordNet noun its words share.

Token weights come from the feature's top and quantile examples: every token the feature is active on,
weighted by its activation relative to the feature's peak. Against the token's base rate over the whole
pass (add-one smoothed), a token scores p log(p / base) (its term of the KL divergence of the
feature's token distribution from the corpus's); the label lists the best few. For the hypernym, each
example gives the whole word holding its peak token ("gall" + "s" -> "galls").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hsae.errors import HsaeError
from hsae.interpret.examples_db import ExamplesDB
from hsae.interpret.tokens import normalise
from hsae.interpret.wordnet_names import shared_hypernym


@dataclass
class OfflineLabelConfig:
    tokens: int = 3  # tokens named in a label
    wordnet: bool | None = None  # name the shared WordNet hypernym (None: when the text is WordNet's)

    def validate(self) -> OfflineLabelConfig:
        if self.tokens <= 0:
            raise HsaeError(f"label: tokens must be positive, got {self.tokens}")
        return self


def word_at(pieces: list[str], i: int) -> str:
    """The whole word holding piece i: pieces without a leading space continue the word before them."""

    def joins(k: int) -> bool:  # piece k continues the word of piece k - 1
        return k > 0 and not pieces[k].startswith(" ") and pieces[k][:1].isalnum() and pieces[k - 1][-1:].isalnum()

    start, stop = i, i + 1
    while joins(start):
        start -= 1
    while stop < len(pieces) and joins(stop):
        stop += 1
    return "".join(pieces[start:stop]).strip()


def is_wordnet_text(db: ExamplesDB) -> bool:
    corpus = (db.meta.get("identity", {}).get("data") or {}).get("corpus") or {}
    return corpus.get("kind") == "wordnet"


def offline_labels(db: ExamplesDB, config: OfflineLabelConfig | None = None) -> dict[int, dict[str, Any]]:
    """latent -> {"label", "tokens": [[token, lift], ...], "hypernym": synset or None} for every latent
    with examples (dead latents get none)."""
    cfg = (config or OfflineLabelConfig()).validate()
    counts = db.token_counts()
    pieces = db.pieces(counts)
    base: dict[str, int] = {}
    for token, n in counts.items():
        key = normalise(pieces.get(token, ""))
        base[key] = base.get(key, 0) + n
    total, kinds = sum(base.values()), len(base) + 1
    use_wordnet = is_wordnet_text(db) if cfg.wordnet is None else cfg.wordnet
    out: dict[int, dict[str, Any]] = {}
    for latent in range(db.n_latents):
        examples = db.examples(latent)
        if not examples:
            continue
        shown = db.pieces(t for e in examples for t in e.tokens)
        peak = max(abs(e.value) for e in examples) or 1.0
        weights: dict[str, float] = {}
        words: dict[str, float] = {}
        for e in examples:
            for token, act in zip(e.tokens, e.acts, strict=True):
                key = normalise(shown.get(token, ""))
                if act != 0 and key:
                    weights[key] = weights.get(key, 0.0) + abs(act) / peak
            word = word_at([shown.get(t, "") for t in e.tokens], e.peak).lower()
            if word:
                words[word] = words.get(word, 0.0) + 1.0
        mass = sum(weights.values())
        if mass <= 0:
            continue
        scored = []
        for key, w in weights.items():
            p, q = w / mass, (base.get(key, 0) + 1) / (total + kinds)
            if p > q:
                scored.append((p * math.log(p / q), key, p / q))
        scored.sort(key=lambda s: (-s[0], s[1]))
        chosen = scored[: cfg.tokens] or [(0.0, max(weights, key=weights.__getitem__), 1.0)]
        label = ", ".join(key for _, key, _ in chosen)
        hypernym = shared_hypernym(words) if use_wordnet else None
        out[latent] = {
            "label": f"{hypernym.name}: {label}" if hypernym else label,
            "tokens": [[key, round(lift, 1)] for _, key, lift in chosen],
            "hypernym": hypernym.synset if hypernym else None,
            "hypernym_words": list(hypernym.words) if hypernym else [],
        }
    return out
