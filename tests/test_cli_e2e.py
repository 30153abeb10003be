"""End-to-end: the CLI as a user runs it, on the embedded MiniLM."""

import json

import pytest
import torch

import hsae
from hsae.cli import main
from hsae.sources.text import wordnet_available
from hsae.store import ActivationStore


def test_train_on_the_fly_from_model_and_corpus(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(
            f"The {w} sat on the mat near the {v} by the river."
            for w, v in [("cat", "dog"), ("bird", "tree"), ("child", "house"), ("fish", "boat")] * 20
        )
    )
    out = tmp_path / "m"
    assert (
        main(
            [
                "train",
                "--arch",
                "topk",
                "--corpus",
                str(corpus),
                "--n-latents",
                "96",
                "--k",
                "4",
                "--steps",
                "6",
                "--batch-size",
                "128",
                "-q",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads((out / "config.json").read_text())
    assert record["sae"]["d_in"] == 384 and record["data"]["hook"] == "encoder.layer.3"
    sae = hsae.load(out)
    assert sae.decode(sae.encode(torch.randn(3, 384))).shape == (3, 384)


def test_data_and_corpus_together_are_refused(tmp_path, capsys):
    rc = main(
        [
            "train",
            "--arch",
            "topk",
            "--data",
            "synthetic",
            "--corpus",
            "wordnet",
            "--n-latents",
            "8",
            "--k",
            "2",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2 and "not both" in capsys.readouterr().err


@pytest.mark.skipif(not wordnet_available(), reason="Debian's wordnet-base is not installed (scripts/setup.sh)")
def test_demo_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--tokens",
        "3000",
        "--steps",
        "20",
        "--n-latents",
        "256",
        "--k",
        "8",
        "--batch-size",
        "256",
        "--eval-tokens",
        "1024",
    ]
    assert main(args) == 0
    said = capsys.readouterr()
    assert "passes over the" in said.out and "training reads the data" not in said.err  # said once, as a choice
    report = json.loads((out / "topk" / "eval" / "report.json").read_text())
    core = report["sections"]["core"]
    heldout_rows = ActivationStore.open(out / "store", split="heldout").epoch_rows()
    assert core["heldout"] is True and core["tokens"] == min(1024, heldout_rows) > 0
    assert (out / "topk" / "eval" / "report.html").exists()
    # A second run reuses the store and the finished model.
    before = (out / "topk" / "weights.safetensors").read_bytes()
    assert main(args) == 0
    assert (out / "topk" / "weights.safetensors").read_bytes() == before
