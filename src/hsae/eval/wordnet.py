"""WordNet alignment: does the SAE's forest (`model.hierarchy()`) agree with WordNet's noun
hypernym tree?

Data. A seeded sample of `wordnet_nouns` (default 4000) noun synsets: noun lemmas drawn at random
from WordNet's index, each giving its first (most frequent) sense, duplicates dropped. Each synset
gives one occurrence of one of its lemmas (underscores read as spaces) in context: the first of the synset's example
sentences that contains one of its lemmas as a whole word (case-insensitive), else the gloss
context "{lemma}: {gloss}". The base model's activation at the hook is averaged over the tokens of
that occurrence and encoded by the SAE: one code vector per noun.

Top nouns. For each latent j, top(j) = the synsets of the `wordnet_top` (default 10) nouns with the
highest code value among those where j fires (code > 0). A latent is *active* here when it fires on
at least `wordnet_min_nouns` (default 3) nouns; only active latents have a top set.

Concept set of a parent. H(p) = every synset within `wordnet_hops` (default 2) hypernym steps above
a synset of top(p), those synsets included (hypernyms and instance hypernyms both count). Bounding
the climb keeps H(p) specific: the full closure always reaches entity.n.01, under which every noun
falls.

Edge score. For an edge p -> c of the forest, score(p, c) = the fraction of top(c) whose synsets lie
under H(p): a noun t lies under H(p) when t or any of its hypernyms (at any height) is in H(p). The
edge is *aligned* when score >= `wordnet_threshold` (default 0.5).

Metrics. Over the forest's edges whose two latents are both active:
- `edge_alignment`: the share of aligned edges; `edge_mean_score`: the mean score;
- `random_alignment` (and `random_mean_score`): the same for random edges — as many ordered pairs
  (p, c), p != c, drawn uniformly among the active latents as there are scored edges — averaged over
  `wordnet_draws` (default 5) seeded draws, with `random_alignment_std` across draws;
- `lift` = edge_alignment / random_alignment (NaN when the random share is 0).
A forest with no edges is skipped (extract one first: `hsae tree DIR --data STORE --save`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from hsae.eval.run import EvalContext, Skip, evaluator
from hsae.eval.splice import BaseModel, base_model_for
from hsae.models.codes import Codes, as_sparse, encode_rows

DEFAULT_NOUNS = 4000
DEFAULT_TOP = 10
DEFAULT_MIN_NOUNS = 3
DEFAULT_HOPS = 2
DEFAULT_THRESHOLD = 0.5
DEFAULT_DRAWS = 5
MIN_EDGES = 1

_NOUN_DATA: dict[str, tuple[list[str], Tensor]] = {}  # (model, hook, sample) -> (synsets, activations)

Parents = Mapping[str, Sequence[str]]


# ----- metric functions ----------------------------------------------------------------------------
def ancestors(synset: str, parents_of: Parents, hops: int | None = None) -> set[str]:
    """`synset` and its hypernyms up to `hops` steps above it (all of them when hops is None)."""
    seen = {synset}
    frontier = [synset]
    step = 0
    while frontier and (hops is None or step < hops):
        nxt = []
        for s in frontier:
            for p in parents_of.get(s, ()):
                if p not in seen:
                    seen.add(p)
                    nxt.append(p)
        frontier = nxt
        step += 1
    return seen


def concept_set(top: Sequence[str], parents_of: Parents, hops: int = DEFAULT_HOPS) -> set[str]:
    """H(p): the synsets within `hops` hypernym steps above (and including) each synset of `top`."""
    out: set[str] = set()
    for s in top:
        out |= ancestors(s, parents_of, hops)
    return out


def edge_score(
    parent_top: Sequence[str], child_top: Sequence[str], parents_of: Parents, hops: int = DEFAULT_HOPS, closure=None
) -> float:
    """Fraction of the child's top synsets lying under the parent's concept set."""
    if not child_top:
        return float("nan")
    h = concept_set(parent_top, parents_of, hops)
    full = closure or (lambda s: ancestors(s, parents_of))
    return sum(1 for t in child_top if full(t) & h) / len(child_top)


def alignment(
    top: Mapping[int, Sequence[str]],
    edges: Sequence[tuple[int, int]],
    parents_of: Parents,
    *,
    hops: int = DEFAULT_HOPS,
    threshold: float = DEFAULT_THRESHOLD,
    closure=None,
) -> tuple[float, float, int]:
    """(share of aligned edges, mean score, edges scored) over edges (parent, child) whose two latents
    have a top set."""
    scores = [edge_score(top[p], top[c], parents_of, hops, closure) for p, c in edges if p in top and c in top]
    if not scores:
        return float("nan"), float("nan"), 0
    return sum(s >= threshold for s in scores) / len(scores), sum(scores) / len(scores), len(scores)


def random_edges(latents: Sequence[int], n: int, rng: random.Random) -> list[tuple[int, int]]:
    """n ordered pairs of distinct latents, uniformly at random."""
    latents = list(latents)
    out = []
    for _ in range(n):
        p, c = rng.sample(latents, 2)
        out.append((p, c))
    return out


def top_nouns(codes: Codes, k: int = DEFAULT_TOP, min_nouns: int = DEFAULT_MIN_NOUNS) -> dict[int, list[int]]:
    """Latent -> indices of its top-k rows by code value among rows where it fires (code > 0), for
    latents firing on at least `min_nouns` rows (from sparse codes: no (rows x latents) tensor)."""
    csr = as_sparse(codes).to("cpu").csr()
    rows, lat, val = csr.row_ids(), csr.indices, csr.values
    pos = val > 0
    rows, lat, val = rows[pos], lat[pos], val[pos]
    by_value = val.argsort(descending=True, stable=True)
    order = by_value[lat[by_value].argsort(stable=True)]  # by latent, then by value (largest first)
    rows, lat = rows[order], lat[order]
    fires = torch.bincount(lat, minlength=csr.n_latents)
    starts = torch.cumsum(fires, 0) - fires
    out = {}
    for j in torch.nonzero(fires >= min_nouns).flatten().tolist():
        s = int(starts[j])
        out[j] = rows[s : s + min(k, int(fires[j]))].tolist()
    return out


# ----- data ----------------------------------------------------------------------------------------
def noun_contexts(n: int, seed: int = 0) -> list[tuple[str, str, int, int]]:
    """(synset, text, start, end) for a seeded sample of up to n noun synsets (module docstring):
    noun lemmas are drawn from WordNet's index and each gives its first (most frequent) sense,
    duplicates dropped — reading a few thousand synsets by offset rather than parsing all 82k."""
    from hsae.sources.text import wordnet_reader

    reader = wordnet_reader()
    lemmas_all = sorted(reader.all_lemma_names("n"))
    rng = random.Random(seed)
    rng.shuffle(lemmas_all)
    out: list[tuple[str, str, int, int]] = []
    seen: set[str] = set()
    for lemma_name in lemmas_all:
        if len(out) >= n:
            break
        senses = reader.synsets(lemma_name, "n")
        if not senses or senses[0].name() in seen:
            continue
        synset = senses[0]
        seen.add(synset.name())
        lemmas = [lemma.replace("_", " ") for lemma in synset.lemma_names()]
        found = None
        for example in synset.examples():
            for lemma in lemmas:
                match = re.search(rf"(?<![\w-]){re.escape(lemma)}(?![\w-])", example, flags=re.IGNORECASE)
                if match:
                    found = (synset.name(), example, match.start(), match.end())
                    break
            if found:
                break
        if found is None:
            text = f"{lemmas[0]}: {synset.definition()}"
            found = (synset.name(), text, 0, len(lemmas[0]))
        out.append(found)
    return out


class ReaderParents(Mapping):
    """synset name -> its hypernyms and instance hypernyms, read lazily from nltk's WordNet reader
    (the same parents as `hsae.sources.text.wordnet_noun_tree`, without parsing every synset)."""

    def __init__(self):
        from hsae.sources.text import wordnet_reader

        self.reader = wordnet_reader()
        self._cache: dict[str, tuple[str, ...]] = {}

    def __getitem__(self, name: str) -> tuple[str, ...]:
        if name not in self._cache:
            synset = self.reader.synset(name)
            self._cache[name] = tuple(p.name() for p in synset.hypernyms() + synset.instance_hypernyms())
        return self._cache[name]

    def __iter__(self):
        return iter(self._cache)

    def __len__(self) -> int:
        return len(self._cache)


def span_activations(base: BaseModel, contexts: list[tuple[str, str, int, int]], batch: int = 256) -> Tensor:
    """(n, d): the hook's activation averaged over the tokens of each context's span."""
    from hsae.sources.hf import HookedModel

    hooked = HookedModel(base.loaded, [base.hook])
    tokenizer = base.loaded.tokenizer
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i][1]))
    out = torch.zeros(len(contexts), 0)
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        enc = tokenizer(
            [contexts[i][1] for i in idx],
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="pt",
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        offsets = enc.pop("offset_mapping")
        special = enc.pop("special_tokens_mask").bool()
        hidden = hooked({k: v.to(base.loaded.device) for k, v in enc.items()})[base.hook].float().cpu()
        if out.shape[1] == 0:
            out = torch.zeros(len(contexts), hidden.shape[-1])
        for row, i in enumerate(idx):
            s, e = contexts[i][2], contexts[i][3]
            a, b = offsets[row, :, 0], offsets[row, :, 1]
            mask = (b > a) & (a < e) & (b > s) & enc["attention_mask"][row].bool() & ~special[row]
            if not mask.any():  # the span was truncated away: use the sentence's real tokens
                mask = enc["attention_mask"][row].bool() & ~special[row]
            out[i] = hidden[row][mask].mean(0)
    return out


def noun_data(base: BaseModel, n: int, seed: int = 0) -> tuple[list[str], Tensor]:
    key = f"{base.key}|{n}|{seed}"
    if key not in _NOUN_DATA:
        contexts = noun_contexts(n, seed)
        _NOUN_DATA[key] = ([c[0] for c in contexts], span_activations(base, contexts))
    return _NOUN_DATA[key]


# ----- the evaluator ------------------------------------------------------------------------------
@evaluator("wordnet")
def wordnet(ctx: EvalContext) -> dict[str, Any]:
    from hsae.sources.text import wordnet_available

    parents = torch.as_tensor(ctx.model.hierarchy(), dtype=torch.long).cpu()
    edges = [(int(p), c) for c, p in enumerate(parents.tolist()) if p >= 0]
    if not edges:
        raise Skip("the model's forest has no edges: extract one first with `hsae tree DIR --data STORE --save`")
    if not wordnet_available():
        raise Skip("WordNet is not installed (apt-get install wordnet-base wordnet-sense-index)")
    base = base_model_for(ctx)
    opts = ctx.options
    n = int(opts.get("wordnet_nouns", DEFAULT_NOUNS))
    k = int(opts.get("wordnet_top", DEFAULT_TOP))
    min_nouns = int(opts.get("wordnet_min_nouns", DEFAULT_MIN_NOUNS))
    hops = int(opts.get("wordnet_hops", DEFAULT_HOPS))
    threshold = float(opts.get("wordnet_threshold", DEFAULT_THRESHOLD))
    draws = int(opts.get("wordnet_draws", DEFAULT_DRAWS))
    seed = int(opts.get("seed", 0))
    synsets, acts = noun_data(base, n, seed)
    top_rows = top_nouns(encode_rows(ctx.model, acts, 4096), k, min_nouns)
    top = {j: [synsets[r] for r in rows] for j, rows in top_rows.items()}
    if len(top) < 2:
        raise Skip(f"only {len(top)} latents fire on at least {min_nouns} of the {len(synsets)} nouns")
    parents_of = ReaderParents()
    closure = lru_cache(maxsize=None)(lambda s: frozenset(ancestors(s, parents_of)))
    share, mean_score, scored = alignment(top, edges, parents_of, hops=hops, threshold=threshold, closure=closure)
    if scored < MIN_EDGES:
        raise Skip(
            f"none of the forest's {len(edges)} edges joins two latents that fire on at least {min_nouns} WordNet nouns"
        )
    rng = random.Random(seed)
    shares, means = [], []
    for _ in range(draws):
        pairs = random_edges(sorted(top), scored, rng)
        s, m, _ = alignment(top, pairs, parents_of, hops=hops, threshold=threshold, closure=closure)
        shares.append(s)
        means.append(m)
    random_share = sum(shares) / len(shares)
    std = (sum((s - random_share) ** 2 for s in shares) / max(1, len(shares) - 1)) ** 0.5
    return {
        "edge_alignment": share,
        "edge_mean_score": mean_score,
        "random_alignment": random_share,
        "random_alignment_std": std,
        "random_mean_score": sum(means) / len(means),
        "lift": share / random_share if random_share > 0 else float("nan"),
        "edges_scored": scored,
        "edges_total": len(edges),
        "active_latents": len(top),
        "nouns": len(synsets),
    }


__all__ = [
    "ancestors",
    "concept_set",
    "edge_score",
    "alignment",
    "random_edges",
    "top_nouns",
    "noun_contexts",
    "span_activations",
    "wordnet",
]
