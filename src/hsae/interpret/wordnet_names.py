"""The most specific WordNet noun that a feature's words share: a natural name for a parent feature.

Each word (morphy-reduced, its first `senses` noun senses) stands for the synsets it can mean and all
their hypernyms (instance hypernyms too). The name is the deepest such synset that covers at least
`min_share` of the words' weight and at least two distinct words, and is not one of WordNet's top
abstractions (depth below `min_depth`: entity, object, whole, abstraction, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class SharedHypernym:
    synset: str  # e.g. "bird.n.01"
    name: str  # its first lemma, readable: "bird"
    share: float  # the fraction of the words' weight it covers
    words: tuple[str, ...]  # the covered words, heaviest first


@lru_cache(maxsize=65536)
def _meanings(word: str, senses: int) -> frozenset[str]:
    from hsae.sources.text import wordnet_reader

    reader = wordnet_reader()
    out: set[str] = set()
    for synset in reader.synsets(word, pos="n")[:senses]:
        out.add(synset.name())
        out.update(s.name() for s in synset.closure(lambda s: s.hypernyms() + s.instance_hypernyms()))
    return frozenset(out)


@lru_cache(maxsize=65536)
def _depth(name: str) -> int:
    from hsae.sources.text import wordnet_reader

    return wordnet_reader().synset(name).min_depth()


def shared_hypernym(
    words: dict[str, float], *, senses: int = 3, min_share: float = 0.5, min_depth: int = 5
) -> SharedHypernym | None:
    """The shared hypernym of `words` (word -> weight), or None when no synset covers enough of them."""
    from hsae.sources.text import wordnet_reader

    words = {w: v for w, v in words.items() if w.isalpha() and len(w) > 2 and v > 0}
    total = sum(words.values())
    if len(words) < 2 or total <= 0:
        return None
    cover: dict[str, list[str]] = {}
    for word in words:
        for synset in _meanings(word.lower(), senses):
            cover.setdefault(synset, []).append(word)
    best: tuple[int, float, str] | None = None
    for synset, covered in cover.items():
        share = sum(words[w] for w in covered) / total
        if len(covered) < 2 or share < min_share:
            continue
        depth = _depth(synset)
        if depth >= min_depth and (best is None or (depth, share) > best[:2]):
            best = (depth, share, synset)
    if best is None:
        return None
    _, share, synset = best
    name = wordnet_reader().synset(synset).lemma_names()[0].replace("_", " ")
    return SharedHypernym(synset, name, round(share, 3), tuple(sorted(cover[synset], key=lambda w: -words[w])))
