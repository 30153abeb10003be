"""Concept naming, search and bias audit (hsae.interpret.concepts) on SAEs whose concepts are set by
hand: names found where the vocabulary holds them and withheld below the threshold, the chance
level of head names, caption words over-represented in top images, search that moves to the raised
concept's images, and an audit that finds the class a concept pushes."""

from __future__ import annotations

import pytest
import torch

from hsae.config import from_dict
from hsae.errors import HsaeError
from hsae.interpret.concepts import (
    TEXT_THRESHOLD,
    caption_words,
    chance_threshold,
    concept_effect,
    concept_search,
    concept_vectors,
    image_activations,
    name_by_head,
    name_by_text,
    name_by_words,
    over_represented,
    zero_shot_classifier,
)
from hsae.models import get_family

D, M = 32, 8


def _sae(directions: torch.Tensor, scale: float = 2.0):
    """An MSAE whose latent j reads and writes the unit direction j (encoder = decoder transpose)."""
    cfg = from_dict(get_family("msae").config_class, dict(arch="msae", d_in=D, n_latents=M, k=2, input_scale=scale))
    model = get_family("msae")(cfg).eval()
    unit = torch.nn.functional.normalize(directions, dim=1)
    with torch.no_grad():
        model.W_dec.copy_(unit)
        model.W_enc.copy_(unit.t())
        model.b_dec.zero_()
        model.b_enc.zero_()
    return model


@pytest.fixture
def directions():
    return torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))[0][:M]  # orthonormal


def test_concept_vectors_are_decoder_rows_plus_b_dec_in_embedding_units(directions):
    model = _sae(directions)
    with torch.no_grad():
        model.b_dec.fill_(0.5)
    torch.testing.assert_close(concept_vectors(model), (directions + 0.5) / 2.0)
    torch.testing.assert_close(concept_vectors(model, with_bias=False), directions / 2.0)


def test_text_names_where_the_vocabulary_holds_the_concept_and_none_below_the_threshold(directions):
    model = _sae(directions)
    g = torch.Generator().manual_seed(1)
    # latents 0..3 have a vocabulary entry near them (cosine ~0.9); 4..7 only unrelated ones
    near = directions[:4] + 0.45 * torch.nn.functional.normalize(torch.randn(4, D, generator=g), dim=1)
    far = torch.randn(6, D, generator=g)
    vocabulary = ["owl", "car", "tree", "boat"] + [f"noise {i}" for i in range(6)]
    names = name_by_text(model, torch.cat([near, far]), vocabulary)
    assert [n.name for n in names[:4]] == ["owl", "car", "tree", "boat"]
    assert all(n.score > 0.8 for n in names[:4])
    assert [n.name for n in names[4:]] == [None] * 4 and all(n.score < TEXT_THRESHOLD for n in names[4:])
    assert all(n.best and n.source == "text" for n in names)
    with pytest.raises(HsaeError, match="width 16 cannot name an SAE of width 32"):
        name_by_text(model, torch.randn(3, 16), ["a", "b", "c"])


def test_head_names_against_chance_level(directions):
    model = _sae(directions)
    g = torch.Generator().manual_seed(2)
    classes = torch.cat([3.0 * directions[:3], torch.randn(7, D, generator=g)])  # classes 0..2 = latents 0..2
    data = torch.randn(500, D, generator=g)
    threshold = chance_threshold(classes, data)
    assert 0.2 < threshold < 0.8 and threshold == chance_threshold(classes, data)  # deterministic
    names = name_by_head(model, classes, [f"class {c}" for c in range(10)], threshold)
    assert [n.name for n in names[:3]] == ["class 0", "class 1", "class 2"]
    assert sum(n.name is not None for n in names[3:]) <= 1  # the rest at chance: at most a stray one
    with pytest.raises(HsaeError, match="_fc:input"):
        name_by_head(model, torch.randn(10, 5), [str(c) for c in range(10)], threshold)


def test_image_activations_take_each_images_peak_row(directions):
    model = _sae(directions, scale=1.0)
    rows = torch.stack([3 * directions[0], 1 * directions[0], 2 * directions[1], 5 * directions[1]])
    acts = image_activations(model, rows, torch.tensor([0, 0, 1, 1]), n_images=2)
    assert acts.shape == (2, M)
    assert acts[0, 0] == pytest.approx(3.0, abs=1e-5) and acts[1, 1] == pytest.approx(5.0, abs=1e-5)
    assert acts[0, 1] == pytest.approx(0.0, abs=1e-5)


def test_caption_words_over_represented_in_top_images_name_the_latent():
    assert caption_words("A frog. The Frog's pond, a frog!") == ["frog", "frog's", "pond"]
    captions = ["A green frog.", "A frog on a log.", "A red car.", "A blue car.", "A frog.", "A tree.", None]
    tops = [[0, 1, 4], [2, 3], [5, 6]]
    found = over_represented(tops, [caption_words(c) for c in captions])
    assert found[0][0] == "frog" and found[1][0] == "car" and found[2] == (None, 0.0)
    acts = torch.zeros(7, 3)
    acts[[0, 1, 4], 0] = torch.tensor([3.0, 2.0, 1.0])
    acts[[2, 3], 1] = 1.0
    names = name_by_words(acts, captions, n_top=3)
    assert [n.name for n in names] == ["frog", "car", None]  # latent 2 never fires: no top images


def test_search_with_a_raised_or_lowered_concept_retrieves_that_concepts_images(directions):
    model = _sae(directions, scale=1.0)
    g = torch.Generator().manual_seed(3)
    noise = 0.3 * torch.randn(10, D, generator=g)
    gallery = torch.cat([4 * directions[0].expand(5, D), 4 * directions[1].expand(5, D)]) + noise  # 0-4, 5-9
    query = gallery[0]
    before, _ = concept_search(model, query, gallery, latent=1, delta=0.0, top=5)
    after, _ = concept_search(model, query, gallery, latent=1, delta=12.0, top=5)
    assert set(before.tolist()) == {0, 1, 2, 3, 4} and set(after.tolist()) == {5, 6, 7, 8, 9}
    both = 3 * directions[0] + 3 * directions[1]  # an image holding both concepts
    without_1, _ = concept_search(model, both, gallery, latent=1, delta=-100.0, top=5)
    without_0, _ = concept_search(model, both, gallery, latent=0, delta=-100.0, top=5)
    assert set(without_1.tolist()) == {0, 1, 2, 3, 4} and set(without_0.tolist()) == {5, 6, 7, 8, 9}


def test_bias_audit_finds_the_class_a_concept_pushes(directions):
    model = _sae(directions, scale=1.0)
    head = torch.cat([directions[2:3], directions[5:6], torch.zeros(2, D)])  # class 0 reads latent 2, class 1 latent 5
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(4))
    shift = concept_effect(model, x, latent=2, delta=4.0, classify=lambda e: e @ head.t())
    assert shift.argmax() == 0 and shift[0] > 0.2 and shift.sum().abs() < 1e-5  # probabilities move, not appear
    assert concept_effect(model, x, latent=2, delta=0.0, classify=lambda e: e @ head.t()).abs().max() < 1e-6
    clip_head = zero_shot_classifier(torch.cat([directions[5:6], directions[6:7]]))
    assert concept_effect(model, x, latent=5, delta=4.0, classify=clip_head).argmax() == 0
