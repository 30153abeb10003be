"""Labels from an LLM, prompted (as delphi's explainer is) with a feature's examples drawn across its
activation quantiles, the tokens it fires on marked <<like this>>.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from hsae.interpret.examples_db import ExamplesDB
from hsae.interpret.llm import LLMClient
from hsae.interpret.samples import activating_examples, example_text

SYSTEM = (
    "You are studying one feature of a neural network. You are shown excerpts of text where the feature is "
    "active: the tokens it fires on are marked <<like this>>, and each excerpt ends with its strongest "
    "activation. Work out what the marked tokens have in common (the words themselves, what they mean, or "
    "the context around them) and name it in a short phrase of a few words. Finish with one line of the form\n"
    "[EXPLANATION]: <the phrase>"
)
EXPLANATION = re.compile(r"\[EXPLANATION\]:\s*(.+)", re.IGNORECASE)


def label_prompt(db: ExamplesDB, latent: int, n_examples: int, seed: int) -> tuple[str, int]:
    """The user message for one feature and the number of excerpts in it."""
    examples = activating_examples(db, latent, n_examples, top=min(5, n_examples // 3), seed=seed)
    pieces = db.pieces(t for e in examples for t in e.tokens)
    lines = [f"Excerpt {i + 1}: {example_text(e, pieces)} ({e.value:.2f})" for i, e in enumerate(examples)]
    return "\n".join(lines), len(examples)


def parse_label(answer: str) -> str | None:
    """The phrase after the last [EXPLANATION]: (else the last line), without quotes, at most 200 chars."""
    found = EXPLANATION.findall(answer)
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    text = found[-1] if found else (lines[-1] if lines else "")
    text = text.strip().strip("\"'`*").strip()
    return text[:200] or None


def llm_labels(
    db: ExamplesDB,
    client: LLMClient,
    latents: Iterable[int],
    *,
    n_examples: int = 20,
    seed: int = 0,
    on_label: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[int, dict[str, Any]]:
    """latent -> {"label", "examples"} for each latent with examples, asking the LLM once per latent."""

    def ask(latent: int) -> tuple[int, dict[str, Any] | None]:
        prompt, n = label_prompt(db, latent, n_examples, seed)
        if n == 0:
            return latent, None
        label = parse_label(client.chat(SYSTEM, prompt))
        return latent, ({"label": label, "examples": n} if label else None)

    out: dict[int, dict[str, Any]] = {}
    for latent, entry in client.map(ask, list(latents)):
        if entry is not None:
            out[latent] = entry
            if on_label is not None:
                on_label(latent, entry)
    return out
