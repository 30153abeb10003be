"""WordNet alignment: the edge score on a tiny fake hypernym tree, top nouns by hand, and the
evaluator on the real MiniLM with a tiny SAE (skipped without WordNet)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from hsae.eval.run import EvalContext, Skip
from hsae.eval.wordnet import alignment, ancestors, concept_set, edge_score, random_edges, top_nouns, wordnet

# entity -> animal -> {dog, cat, bird}; dog -> puppy; entity -> artifact -> {car, truck}
TREE = {
    "entity": (),
    "animal": ("entity",),
    "artifact": ("entity",),
    "dog": ("animal",),
    "cat": ("animal",),
    "bird": ("animal",),
    "puppy": ("dog",),
    "car": ("artifact",),
    "truck": ("artifact",),
}


def test_ancestors_and_concept_sets():
    assert ancestors("puppy", TREE, 1) == {"puppy", "dog"}
    assert ancestors("puppy", TREE) == {"puppy", "dog", "animal", "entity"}
    assert concept_set(["dog", "car"], TREE, hops=1) == {"dog", "animal", "car", "artifact"}


def test_edge_score_by_hand():
    # parent's top nouns {dog}: H = {dog, animal} with one hop
    assert edge_score(["dog"], ["puppy", "cat", "car", "truck"], TREE, hops=1) == pytest.approx(0.5)
    assert edge_score(["dog"], ["puppy", "cat", "car", "truck"], TREE, hops=0) == pytest.approx(0.25)  # puppy
    # with two hops H reaches the root, and everything lies under it
    assert edge_score(["dog"], ["car"], TREE, hops=2) == pytest.approx(1.0)
    assert math.isnan(edge_score(["dog"], [], TREE))


def test_alignment_and_random_edges():
    top = {0: ["dog"], 1: ["puppy", "cat"], 2: ["car", "truck"], 3: ["truck"]}
    edges = [(0, 1), (0, 2), (2, 3), (5, 1)]  # latent 5 has no top nouns: not scored
    share, mean, scored = alignment(top, edges, TREE, hops=1)
    # scores: (0,1) -> 1.0; (0,2) -> 0.0; (2,3) -> 1.0
    assert scored == 3 and share == pytest.approx(2 / 3) and mean == pytest.approx(2 / 3)
    pairs = random_edges([0, 1, 2], 50, random.Random(0))
    assert len(pairs) == 50 and all(p != c and {p, c} <= {0, 1, 2} for p, c in pairs)


def test_top_nouns_by_hand():
    codes = torch.tensor([[0.0, 2.0, 0.0], [1.0, 3.0, 0.0], [2.0, 0.0, 0.0], [0.5, 1.0, 4.0]])
    assert top_nouns(codes, k=2, min_nouns=2) == {0: [2, 1], 1: [1, 0]}  # latent 2 fires once only


def _wordnet_or_skip():
    from hsae.sources.text import wordnet_available

    if not wordnet_available():
        pytest.skip("WordNet is not installed (apt-get install wordnet-base wordnet-sense-index)")


class _Source:
    d_in = 384

    def describe(self):
        return {"kind": "test"}


def test_wordnet_evaluator_on_minilm():
    _wordnet_or_skip()
    from hsae.config import from_dict
    from hsae.models import get_family
    from hsae.sources.hf import load_model

    torch.manual_seed(0)
    family = get_family("topk")
    sae = family.from_config(
        from_dict(family.config_class, {"arch": "topk", "d_in": 384, "n_latents": 32, "k": 8}, what="test")
    ).eval()
    options = {
        "base_model": load_model(device="cpu"),
        "hook": "encoder.layer.3",
        "wordnet_nouns": 60,
        "wordnet_min_nouns": 2,
    }
    ctx = EvalContext(sae, None, _Source(), torch.zeros(1, 384), options)
    with pytest.raises(Skip, match="hsae tree"):
        wordnet(ctx)
    parents = torch.full((32,), -1)
    parents[16:] = torch.arange(16)
    sae.set_hierarchy(parents)
    result = wordnet(ctx)
    assert result["nouns"] == 60 and result["edges_total"] == 16
    assert 1 <= result["edges_scored"] <= 16
    assert 0 <= result["edge_alignment"] <= 1 and 0 <= result["random_alignment"] <= 1
