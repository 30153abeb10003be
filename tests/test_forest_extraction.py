"""Post-hoc forest extraction (hsae.interpret.forest) and the `hsae tree` command."""

import torch

import hsae
from hsae.cli import main
from hsae.interpret.forest import ForestOptions, extract_forest
from hsae.sources.synthetic import SyntheticConfig, SyntheticForest

SYN = ["--synthetic", "d_in=16", "--synthetic", "n_roots=4", "--synthetic", "branching=2", "--synthetic", "p_root=0.2"]


class Oracle:
    """A stand-in model whose latents are exactly the true features."""

    def __init__(self, forest):
        self.forest = forest
        self.W_dec = forest.directions
        self.n_latents = forest.n_features
        self.acts = None

    def encode(self, x):
        assert x.shape[0] == self.acts.shape[0]  # one batch (batch_size above the sample size)
        return self.acts


def test_extraction_recovers_the_true_forest_from_perfect_latents():
    forest = SyntheticForest(SyntheticConfig(d_in=24, n_roots=6, branching=3, p_root=0.2, seed=1))
    batch = forest.sample(6000, torch.Generator().manual_seed(0))
    model = Oracle(forest)
    model.acts = batch.true_acts
    found = extract_forest(model, batch.x, ForestOptions(batch_size=100_000))
    assert torch.equal(found.parents, forest.parents)
    has = found.parents >= 0
    assert (found.coverage[has] == 1).all()


def test_thresholds_are_options():
    forest = SyntheticForest(SyntheticConfig(d_in=24, n_roots=6, branching=3, p_root=0.2, seed=1))
    batch = forest.sample(3000, torch.Generator().manual_seed(0))
    model = Oracle(forest)
    model.acts = batch.true_acts
    # children have cosine 0.5 with their parent: a 0.6 cosine threshold rejects every edge
    found = extract_forest(model, batch.x, ForestOptions(min_cosine=0.6, batch_size=100_000))
    assert (found.parents == -1).all()


def test_hsae_tree_cli_extracts_prints_and_saves(tmp_path, capsys):
    out = tmp_path / "m"
    assert (
        main(
            [
                "train",
                "--arch",
                "topk",
                "--data",
                "synthetic",
                *SYN,
                "--n-latents",
                "24",
                "--k",
                "3",
                "--steps",
                "60",
                "--batch-size",
                "256",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    assert main(["tree", str(out), "--data", "synthetic", *SYN, "--n-samples", "2000", "--save"]) == 0
    text = capsys.readouterr().out
    assert "statistics: n_latents 24" in text and "against the true forest" in text and "saved the parents" in text
    saved = hsae.load(out).hierarchy()
    assert saved.shape == (24,)
    # without --data the saved forest is printed
    assert main(["tree", str(out), "--max-trees", "0"]) == 0
    assert "saved in the model folder" in capsys.readouterr().out


def test_hsae_tree_cli_errors(tmp_path, capsys):
    out = tmp_path / "m"
    assert (
        main(
            [
                "train",
                "--arch",
                "topk",
                "--data",
                "synthetic",
                *SYN,
                "--n-latents",
                "24",
                "--k",
                "3",
                "--steps",
                "5",
                "--batch-size",
                "64",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    assert main(["tree", str(out)]) == 2  # flat, nothing saved, no data
    assert "pass --data" in capsys.readouterr().err
    assert main(["tree", str(tmp_path / "missing")]) == 2
