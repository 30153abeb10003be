"""An interpretability score that runs offline: how well a feature's label, embedded by MiniLM, picks
out the contexts where the feature fires (delphi's embedding scorer).

For each labelled feature, the label and its activating contexts (top and quantile examples, plain
text) are embedded; the score is the ROC AUC of cos(label, context) for activating contexts against
random contexts where the feature is silent, and against near-miss ones (silent, while one of its
decoder neighbours fires). The pass's random contexts are embedded once and shared by all features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hsae.interpret.embed import SentenceEmbedder
from hsae.interpret.examples_db import ExamplesDB
from hsae.interpret.samples import activating_examples, example_text, render, silent_contexts
from hsae.interpret.scores import auroc


@dataclass
class EmbeddingScoreConfig:
    positives: int = 20
    negatives: int = 50
    neighbours: int = 10
    seed: int = 0
    features_per_batch: int = 64


def embedding_scores(
    db: ExamplesDB, labels: dict[int, str], neighbours, embedder: SentenceEmbedder, cfg: EmbeddingScoreConfig
) -> dict[int, dict[str, Any]]:
    """latent -> {"auroc", "auroc_near_miss", "n_positive", "n_negative"} for every labelled latent."""
    contexts = db.contexts()
    context_pieces = db.pieces(t for c in contexts for t in c.tokens)
    context_emb = embedder.embed([render([context_pieces.get(t, "") for t in c.tokens]) for c in contexts])
    index = {id(c): i for i, c in enumerate(contexts)}
    out: dict[int, dict[str, Any]] = {}
    latents = sorted(labels)
    for start in range(0, len(latents), cfg.features_per_batch):
        batch = latents[start : start + cfg.features_per_batch]
        positives = {i: activating_examples(db, i, cfg.positives, top=cfg.positives // 2, seed=cfg.seed) for i in batch}
        pieces = db.pieces(t for examples in positives.values() for e in examples for t in e.tokens)
        texts = [example_text(e, pieces, mark_active=False) for i in batch for e in positives[i]]
        emb = embedder.embed(texts + [labels[i] for i in batch])
        label_emb = emb[len(texts) :]
        at = 0
        for k, latent in enumerate(batch):
            n_pos = len(positives[latent])
            pos = (emb[at : at + n_pos] @ label_emb[k]).tolist()
            at += n_pos
            near = [j for j, _ in neighbours.of(latent, cfg.neighbours)]
            scored = {}
            for name, chosen in (
                ("auroc", silent_contexts(contexts, latent, cfg.negatives, seed=cfg.seed)),
                ("auroc_near_miss", silent_contexts(contexts, latent, cfg.negatives, near=near, seed=cfg.seed)),
            ):
                rows = [index[id(c)] for c in chosen]
                neg = (context_emb[rows] @ label_emb[k]).tolist() if rows else []
                value = auroc(pos, neg)
                scored[name] = None if value is None else round(value, 4)
                scored[f"n_{'negative' if name == 'auroc' else 'near_miss'}"] = len(rows)
            out[latent] = {**scored, "n_positive": n_pos}
    return out
