"""delphi's detection and fuzzing scorers (Paulo et al. 2024, arXiv 2410.13928), through an LLM.

- Detection: given the label, the LLM says for each excerpt whether the feature is active in it.
  Positives are activating examples across quantiles; negatives are random and near-miss contexts
  (`hsae.interpret.samples`).
- Fuzzing: given the label, the LLM says for each excerpt whether its marked tokens are where the
  feature fires. Positives are activating examples marked where the feature is active; negatives are
  activating examples marked on as many tokens where it is silent ("mis-marked"), and random and
  near-miss contexts with as many random tokens marked.

Excerpts are shuffled and asked about `batch` at a time; the LLM answers with a JSON list of 0/1. An
answer that cannot be read counts as no prediction for its batch (the count of such batches is
reported). Metrics per kind of negative: accuracy, precision, recall, F1 and AUC (`scores.binary_metrics`).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

from hsae.interpret.examples_db import Context, ExamplesDB
from hsae.interpret.llm import LLMClient
from hsae.interpret.samples import activating_examples, example_text, render, silent_contexts
from hsae.interpret.scores import binary_metrics

DETECTION_SYSTEM = (
    "A feature of a neural network is described below. For each numbered excerpt, decide whether the "
    "feature is active anywhere in it. Answer with a JSON list of 0s and 1s, one per excerpt in order "
    "(1: active), and nothing else."
)
FUZZING_SYSTEM = (
    "A feature of a neural network is described below. In each numbered excerpt some tokens are marked "
    "<<like this>>. Decide for each excerpt whether the marked tokens are ones where the described feature "
    "is active. Answer with a JSON list of 0s and 1s, one per excerpt in order (1: correctly marked), and "
    "nothing else."
)
ANSWER = re.compile(r"\[[\s\d,]*\]")


@dataclass
class ScoreConfig:
    positives: int = 10
    negatives: int = 10  # of each kind
    batch: int = 5
    neighbours: int = 10  # decoder neighbours whose firing makes a near miss
    seed: int = 0


@dataclass
class Item:
    text: str
    kind: str  # "positive" or the kind of negative


def parse_answer(answer: str, n: int) -> list[int] | None:
    for found in reversed(ANSWER.findall(answer)):
        try:
            values = json.loads(found)
        except json.JSONDecodeError:
            continue
        if len(values) == n and all(v in (0, 1) for v in values):
            return [int(v) for v in values]
    return None


def _context_text(context: Context, pieces: dict[int, str], marks: int, rng: random.Random) -> str:
    shown = [pieces.get(t, "") for t in context.tokens]
    marked = rng.sample(range(len(shown)), min(marks, len(shown))) if marks else []
    return render(shown, marked)


def detection_items(db, latent, contexts, near, cfg) -> list[Item]:
    examples = activating_examples(db, latent, cfg.positives, seed=cfg.seed)
    negatives = {
        "random": silent_contexts(contexts, latent, cfg.negatives, seed=cfg.seed),
        "near_miss": silent_contexts(contexts, latent, cfg.negatives, near=near, seed=cfg.seed) if near else [],
    }
    ids = [t for e in examples for t in e.tokens] + [t for cs in negatives.values() for c in cs for t in c.tokens]
    pieces = db.pieces(ids)
    items = [Item(example_text(e, pieces, mark_active=False), "positive") for e in examples]
    for kind, chosen in negatives.items():
        items += [Item(render([pieces.get(t, "") for t in c.tokens]), kind) for c in chosen]
    return items


def fuzzing_items(db, latent, contexts, near, cfg) -> list[Item]:
    rng = random.Random(f"{cfg.seed}:{latent}:fuzz")
    examples = activating_examples(db, latent, 2 * cfg.positives, seed=cfg.seed)
    correct, wrong = examples[0::2], examples[1::2]
    negatives = {
        "random": silent_contexts(contexts, latent, cfg.negatives, seed=cfg.seed),
        "near_miss": silent_contexts(contexts, latent, cfg.negatives, near=near, seed=cfg.seed) if near else [],
    }
    ids = [t for e in examples for t in e.tokens] + [t for cs in negatives.values() for c in cs for t in c.tokens]
    pieces = db.pieces(ids)
    items = [Item(example_text(e, pieces), "positive") for e in correct]
    marks = max(1, round(sum(sum(a != 0 for a in e.acts) for e in correct) / max(len(correct), 1)))
    for e in wrong:
        silent = [i for i, a in enumerate(e.acts) if a == 0]
        count = max(1, sum(a != 0 for a in e.acts))
        chosen = rng.sample(silent, min(count, len(silent)))
        if chosen:
            items.append(Item(render([pieces.get(t, "") for t in e.tokens], chosen), "mis_marked"))
    for kind, chosen_contexts in negatives.items():
        items += [Item(_context_text(c, pieces, marks, rng), kind) for c in chosen_contexts]
    return items


def score_feature(client: LLMClient, system: str, label: str, items: list[Item], cfg: ScoreConfig, latent: int):
    """Ask about the items in shuffled batches; return metrics per kind of negative and failed batches."""
    order = list(range(len(items)))
    random.Random(f"{cfg.seed}:{latent}:order").shuffle(order)
    predictions: dict[int, int] = {}
    failed = 0
    for start in range(0, len(order), cfg.batch):
        batch = order[start : start + cfg.batch]
        excerpts = "\n".join(f"Excerpt {k + 1}: {items[i].text}" for k, i in enumerate(batch))
        answer = parse_answer(client.chat(system, f"Description: {label}\n\n{excerpts}"), len(batch))
        if answer is None:
            failed += 1
            continue
        predictions.update(zip(batch, answer, strict=True))
    positive = [p for i, p in predictions.items() if items[i].kind == "positive"]
    result: dict[str, Any] = {"failed_batches": failed}
    for kind in sorted({item.kind for item in items} - {"positive"}):
        result[kind] = binary_metrics(positive, [p for i, p in predictions.items() if items[i].kind == kind])
    return result


def llm_scores(
    db: ExamplesDB, client: LLMClient, labels: dict[int, str], neighbours, scorer: str, cfg: ScoreConfig
) -> dict[int, dict[str, Any]]:
    """latent -> metrics for every labelled latent, with `scorer` "detection" or "fuzzing"."""
    contexts = db.contexts()
    build, system = (detection_items, DETECTION_SYSTEM) if scorer == "detection" else (fuzzing_items, FUZZING_SYSTEM)

    def run(latent: int) -> tuple[int, dict[str, Any]]:
        near = [j for j, _ in neighbours.of(latent, cfg.neighbours)]
        return latent, score_feature(
            client, system, labels[latent], build(db, latent, contexts, near, cfg), cfg, latent
        )

    return dict(client.map(run, sorted(labels)))
