"""Labels: the offline labeller (over-represented tokens, WordNet's shared hypernym) and the LLM
labeller against a local OpenAI-compatible test server (no network); the key is never written."""

from __future__ import annotations

import json
import shutil

import pytest

from hsae.cli import main
from hsae.interpret.examples_db import open_examples
from hsae.interpret.labels import best_labels, read_labels
from hsae.interpret.llm_labels import parse_label
from hsae.interpret.offline_labels import word_at
from hsae.interpret.samples import render
from hsae.interpret.tokens import normalise
from hsae.interpret.wordnet_names import shared_hypernym
from hsae.sources.text import wordnet_available
from interpret_fixtures import FakeLLM, minilm_model

KEY = "sk-test-0123456789abcdef"


@pytest.fixture
def model_copy(tmp_path):
    return shutil.copytree(minilm_model(), tmp_path / "model")


def test_words_are_rebuilt_from_pieces_and_marks_wrap_runs():
    pieces = [" the", " gall", "s", ",", " big", "gest"]
    assert word_at(pieces, 1) == "galls" and word_at(pieces, 2) == "galls"
    assert word_at(pieces, 3) == "," and word_at(pieces, 5) == "biggest"
    assert render(pieces, [1, 2]) == "the <<galls>>, biggest"
    assert render(pieces, [4]) == "the galls, <<big>>gest"


@pytest.mark.skipif(not wordnet_available(), reason="Debian's wordnet-base is not installed (scripts/setup.sh)")
def test_shared_hypernym_is_the_most_specific_common_noun():
    found = shared_hypernym({"dog": 2, "cat": 1, "wolf": 1})
    assert found.name == "canine" and found.words == ("dog", "wolf") and found.share == 0.75
    assert shared_hypernym({"guitar": 1, "piano": 1, "violin": 1}).name == "stringed instrument"
    assert shared_hypernym({"dog": 3}) is None  # one word names nothing shared
    assert shared_hypernym({"dog": 1, "piano": 1}) is None  # only WordNet's top abstractions in common


def test_offline_labels_name_tokens_the_feature_fires_on():
    model_dir = minilm_model()
    db = open_examples(model_dir)
    labels = read_labels(model_dir)["labellers"]["offline"]["labels"]
    fired = [i for i in range(db.n_latents) if db.feature(i)["fires"]]
    assert set(map(int, labels)) == set(fired)
    for latent in fired:
        examples = db.examples(latent)
        pieces = db.pieces(t for e in examples for t in e.tokens)
        active = {normalise(pieces[t]) for e in examples for t, a in zip(e.tokens, e.acts, strict=True) if a != 0}
        tokens = [t for t, _ in labels[str(latent)]["tokens"]]
        assert tokens and set(tokens) <= active
        assert labels[str(latent)]["label"] == ", ".join(tokens)  # no WordNet name: this text is not WordNet's


def test_llm_labels_come_from_the_endpoint_and_the_key_stays_out_of_every_file(model_copy, monkeypatch, capsys):
    monkeypatch.setenv("HSAE_LLM_API_KEY", KEY)
    with FakeLLM() as llm:
        assert main(["label", str(model_copy)]) == 0
        assert llm.requests == []  # no network unless asked
        args = ["label", str(model_copy), "--no-offline", "--llm", "--llm-base-url", llm.base_url]
        assert main([*args, "--llm-model", "fake-model", "--features", "8", "--concurrency", "2"]) == 0
        asked = len(llm.requests)
        assert asked == 8
        assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in llm.requests)
        assert all(r["body"]["model"] == "fake-model" for r in llm.requests)
        # run again with the same settings: every label is there already, nothing is asked
        assert main([*args, "--llm-model", "fake-model", "--features", "8"]) == 0
        assert len(llm.requests) == asked
    data = read_labels(model_copy)
    section = data["labellers"]["llm"]
    assert section["complete"] and section["settings"]["model"] == "fake-model" and len(section["labels"]) == 8
    prompts = [r["body"]["messages"] for r in llm.requests]
    assert all("<<" in user["content"] for _, user in prompts)  # active tokens marked, as delphi's explainer shows
    answers = sorted(parse_label(FakeLLM().answer(system["content"], user["content"])) for system, user in prompts)
    assert sorted(e["label"] for e in section["labels"].values()) == answers
    shown = best_labels(data)
    assert all(shown[int(i)] == e["label"] for i, e in section["labels"].items())  # LLM labels win
    for path in model_copy.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"the API key was written to {path}"
    assert KEY not in capsys.readouterr().out


def test_an_unreachable_endpoint_is_one_line_without_the_key(model_copy, capsys):
    code = main(
        ["label", str(model_copy), "--no-offline", "--llm", "--llm-base-url", "http://127.0.0.1:9/v1",
         "--llm-model", "m", "--llm-api-key", KEY, "--features", "1"]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "LLM endpoint http://127.0.0.1:9/v1 failed" in err and KEY not in err
    assert "llm" not in json.loads((model_copy / "labels.json").read_text())["labellers"]


def test_llm_options_are_required(model_copy, monkeypatch, capsys):
    for name in ("HSAE_LLM_BASE_URL", "OPENAI_BASE_URL", "HSAE_LLM_MODEL"):
        monkeypatch.delenv(name, raising=False)
    assert main(["label", str(model_copy), "--no-offline", "--llm"]) == 2
    assert "--llm-base-url" in capsys.readouterr().err


def test_parse_label_reads_the_explanation_line():
    assert parse_label('thinking...\n[EXPLANATION]: "dog breeds"') == "dog breeds"
    assert parse_label("just a phrase") == "just a phrase"
    assert parse_label("") is None
