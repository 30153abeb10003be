"""The example sets the LLM labeller and the scorers show, and how an excerpt reads as text.

- Activating examples: the feature's quantile examples spread evenly over its quantiles (delphi's
  sampling), after its few top examples where asked.
- Non-activating contexts, from the pass's uniform sample of windows: "random" ones (the feature is
  silent everywhere in the window) and "near-miss" ones (silent, but one of its nearest latents by
  decoder cosine fires somewhere in the window: the contexts most easily confused with it).
- An excerpt's text is its pieces joined, with chosen tokens marked <<like this>> (runs merged).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

from hsae.interpret.examples_db import Context, Example, ExamplesDB


def render(pieces: Sequence[str], marked: Iterable[int] = ()) -> str:
    marks = set(marked)
    out: list[str] = []
    for i, piece in enumerate(pieces):
        if i in marks and i - 1 not in marks:  # the mark opens after the piece's leading space
            text = piece.lstrip()
            out.append(piece[: len(piece) - len(text)] + "<<" + text)
        else:
            out.append(piece)
        if i in marks and i + 1 not in marks:
            out.append(">>")
    return "".join(out).strip()


def example_text(example: Example, pieces: dict[int, str], mark_active: bool = True) -> str:
    return render(
        [pieces.get(t, "") for t in example.tokens],
        [i for i, a in enumerate(example.acts) if a != 0] if mark_active else [],
    )


def activating_examples(db: ExamplesDB, latent: int, n: int, *, top: int = 0, seed: int = 0) -> list[Example]:
    """Up to n examples: the `top` strongest, then quantile examples taken round-robin from the highest
    quantile down, a random one from each in turn."""
    chosen = db.examples(latent, "top")[:top]
    by_quantile: dict[int, list[Example]] = {}
    for example in db.examples(latent, "quantile"):
        by_quantile.setdefault(example.quantile or 0, []).append(example)
    rng = random.Random(f"{seed}:{latent}")
    for group in by_quantile.values():
        rng.shuffle(group)
    order = sorted(by_quantile, reverse=True)
    while len(chosen) < n and any(by_quantile[q] for q in order):
        for q in order:
            if by_quantile[q] and len(chosen) < n:
                chosen.append(by_quantile[q].pop())
    return chosen


def silent_contexts(
    contexts: Sequence[Context], latent: int, n: int, *, near: Iterable[int] = (), seed: int = 0
) -> list[Context]:
    """Up to n contexts where `latent` is silent; with `near`, only those where one of those latents fires."""
    near = set(near)
    pool = [c for c in contexts if latent not in c.active and (not near or not near.isdisjoint(c.active))]
    rng = random.Random(f"{seed}:{latent}:{bool(near)}")
    return rng.sample(pool, min(n, len(pool)))
