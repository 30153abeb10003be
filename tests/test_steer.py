"""Steering: the added vector is the feature's decoder direction; on MiniLM the sentence embedding moves
(nearest WordNet glosses before and after); on a causal LM the continuation changes."""

from __future__ import annotations

import pytest
import torch

import hsae
from hsae.cli import main
from hsae.errors import HsaeError
from hsae.interpret.steering import Steerer, steer, steered, steering_vector
from hsae.sources.hf import load_model
from hsae.sources.text import wordnet_available
from interpret_fixtures import gpt2_model, minilm_model


def test_the_vector_is_the_decoder_direction_scaled():
    sae = hsae.load(minilm_model())
    v = steering_vector(sae, 7, 3.0)
    assert torch.nn.functional.cosine_similarity(v, sae.W_dec[7].detach().float(), dim=0) > 0.9999
    assert torch.allclose(steering_vector(sae, 7, 6.0), 2 * v, atol=1e-5)
    with pytest.raises(HsaeError, match="does not exist"):
        steering_vector(sae, 96, 1.0)


@pytest.mark.slow
@pytest.mark.skipif(not wordnet_available(), reason="Debian's wordnet-base is not installed (scripts/setup.sh)")
def test_minilm_sentence_embedding_moves_and_glosses_are_listed(capsys):
    model_dir = minilm_model()
    steerer = Steerer(hsae.load(model_dir), load_model(None), "encoder.layer.3", glosses=100)
    still = steerer.run(4, 0.0, "a dog ran across the field")
    assert still.kind == "embedding" and still.cosine == pytest.approx(1.0, abs=1e-4)
    assert still.before == still.after and len(still.before) == 5
    moved = steerer.run(4, 40.0, "a dog ran across the field")
    assert moved.cosine < 0.99 and moved.before == still.before and moved.after != moved.before
    assert all(set(g) == {"synset", "gloss", "cosine"} for g in moved.after)
    args = ["steer", str(model_dir), "--feature", "4", "--scale", "40", "--text", "a dog ran", "--glosses", "50"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "nearest WordNet glosses before" in out and "after" in out


def test_causal_lm_generates_with_and_without(capsys):
    model_dir = gpt2_model()
    plain = steer(model_dir, 3, 0.0, "the dog was", max_new_tokens=8)
    assert plain.kind == "generation" and plain.plain == plain.steered_text
    pushed = steer(model_dir, 3, 80.0, "the dog was", max_new_tokens=8)
    assert pushed.plain == plain.plain and pushed.steered_text != pushed.plain
    assert main(["steer", str(model_dir), "--feature", "3", "--scale", "80", "--text", "the dog was"]) == 0
    out = capsys.readouterr().out
    assert "without:" in out and "with:" in out


def test_an_input_site_is_steered_before_the_module():
    loaded = load_model(str(gpt2_model().parent / "gpt2-base"))
    inputs = loaded.tokenizer("the dog was", return_tensors="pt")
    with torch.no_grad():
        clean = loaded.model(**inputs).logits
        with steered(loaded.model, "transformer.h.1.mlp:input", torch.full((32,), 3.0)):
            moved = loaded.model(**inputs).logits
        again = loaded.model(**inputs).logits
    assert not torch.allclose(clean, moved) and torch.equal(clean, again)  # and the hook is gone after
