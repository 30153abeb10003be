"""Scores: the metrics, the MiniLM embedding scorer for real, and delphi's detection and fuzzing scorers
against a local OpenAI-compatible test server."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest

import hsae
from hsae.cli import main
from hsae.interpret.embed import SentenceEmbedder
from hsae.interpret.embedding_score import EmbeddingScoreConfig, embedding_scores
from hsae.interpret.examples_db import open_examples
from hsae.interpret.labels import best_labels, read_labels
from hsae.interpret.llm_scores import parse_answer
from hsae.interpret.neighbours import DecoderNeighbours
from hsae.interpret.scores import auroc, binary_metrics
from interpret_fixtures import FakeLLM, minilm_model


@pytest.fixture
def model_copy(tmp_path):
    return shutil.copytree(minilm_model(), tmp_path / "model")


def test_metrics():
    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1], [1]) == 0.5 and auroc([1, 2], []) is None
    m = binary_metrics([1, 1, 0, 1], [0, 1, 0, 0])
    assert m["accuracy"] == 0.75 and m["precision"] == 0.75 and m["recall"] == 0.75 and m["f1"] == 0.75
    assert m["auc"] == 0.75  # (TPR + TNR) / 2 for 0/1 predictions
    assert parse_answer("sure: [1, 0, 1]", 3) == [1, 0, 1]
    assert parse_answer("[1, 0]", 3) is None and parse_answer("no idea", 2) is None


def test_embedding_scorer_on_minilm_prefers_a_features_own_label():
    model_dir = minilm_model()
    db = open_examples(model_dir)
    labels = dict(sorted(best_labels(read_labels(model_dir)).items())[:24])
    neighbours = DecoderNeighbours(hsae.load(model_dir).W_dec)
    embedder = SentenceEmbedder()
    cfg = EmbeddingScoreConfig(positives=10, negatives=30)
    own = embedding_scores(db, labels, neighbours, embedder, cfg)
    ids = sorted(labels)
    swapped = {i: labels[ids[(k + 12) % len(ids)]] for k, i in enumerate(ids)}  # another feature's label
    other = embedding_scores(db, swapped, neighbours, embedder, cfg)
    assert set(own) == set(labels) and all(0 <= v["auroc"] <= 1 and v["n_positive"] > 0 for v in own.values())
    mean_own = statistics.mean(v["auroc"] for v in own.values())
    mean_other = statistics.mean(v["auroc"] for v in other.values())
    assert mean_own > 0.6 and mean_own > mean_other + 0.1, (mean_own, mean_other)


def test_score_cli_writes_embedding_and_llm_scores(model_copy):
    with FakeLLM() as llm:
        args = ["score", str(model_copy), "--features", "12", "--llm", "--llm-base-url", llm.base_url]
        assert main([*args, "--llm-model", "judge", "--llm-features", "6"]) == 0
        assert llm.requests and all(r["body"]["model"] == "judge" for r in llm.requests)
    scores = json.loads((model_copy / "scores.json").read_text())["scorers"]
    embedding = scores["embedding"]
    assert embedding["summary"]["features"] == 12 and 0 <= embedding["summary"]["auroc"] <= 1
    detection, fuzzing = scores["detection"], scores["fuzzing"]
    assert detection["summary"]["features"] == 6 and detection["summary"]["failed_batches"] == 0
    assert set(detection["summary"]) >= {"random", "near_miss"} and "mis_marked" in fuzzing["summary"]
    # The judge says "active" when the label's first token is in the excerpt: labels naming the tokens a
    # feature fires on find its contexts, and seldom the random ones.
    random_negatives = detection["summary"]["random"]
    assert random_negatives["accuracy"] > 0.6 and random_negatives["auc"] > 0.6
    for entry in detection["features"].values():
        assert entry["random"]["n_positive"] > 0 and entry["random"]["n_negative"] > 0
    assert "judge" == detection["settings"]["model"] and "api_key" not in json.dumps(scores)


def test_unreadable_answers_count_as_failed_batches(model_copy):
    with FakeLLM() as llm:
        llm.garbage = True
        args = ["score", str(model_copy), "--no-embedding", "--llm", "--llm-base-url", llm.base_url]
        assert main([*args, "--llm-model", "judge", "--llm-features", "2"]) == 0
        asked = len(llm.requests)
    detection = json.loads((model_copy / "scores.json").read_text())["scorers"]["detection"]
    assert detection["summary"]["failed_batches"] > 0 and asked > 0
    assert all(v["random"] is None for v in detection["features"].values())


def test_score_needs_labels(tmp_path, capsys):
    model = shutil.copytree(minilm_model(), tmp_path / "m")
    (model / "labels.json").unlink()
    assert main(["score", str(model)]) == 2
    assert "hsae label" in capsys.readouterr().err
