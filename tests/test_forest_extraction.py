"""Post-hoc forest extraction (hsae.interpret.forest) and the `hsae tree` command."""

import pytest
import torch

import hsae
from hsae.cli import main
from hsae.errors import HsaeError
from hsae.interpret.forest import ForestOptions, coactivation, extract_forest, forest_from_coactivation
from hsae.models.codes import SparseCodes
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


def _with_dense_latent(density=0.7, seed=0):
    """An oracle of the true features plus one latent (the last) that fires on `density` of the rows
    independently of them, as a near-dense latent of a real SAE does ("the", "of", "a")."""
    forest = SyntheticForest(SyntheticConfig(d_in=24, n_roots=6, branching=3, p_root=0.2, seed=1))
    batch = forest.sample(6000, torch.Generator().manual_seed(seed))
    model = Oracle(forest)
    dense = (torch.rand(6000, 1, generator=torch.Generator().manual_seed(seed + 1)) < density).float()
    model.acts = torch.cat([batch.true_acts, dense], 1)
    model.W_dec = torch.cat([forest.directions, torch.randn(1, 24, generator=torch.Generator().manual_seed(2))])
    model.n_latents = forest.n_features + 1
    return forest, batch, model


def test_a_near_dense_latent_is_no_parent_by_default():
    forest, batch, model = _with_dense_latent()
    dense = model.n_latents - 1
    # coverage alone: every root (P(dense on | root on) ~ 0.7 >= 0.6) hangs under the dense latent
    no_base_rate = ForestOptions(min_lift=0.0, max_parent_density=1.0, min_cosine=-1.0, batch_size=100_000)
    before = extract_forest(model, batch.x, no_base_rate)
    roots = torch.nonzero(forest.parents < 0).flatten()
    assert (before.parents[roots] == dense).all()
    # against the base rate (the default): the dense latent fires with a root no more than anywhere
    found = extract_forest(model, batch.x, ForestOptions(batch_size=100_000))
    assert torch.equal(found.parents[:-1], forest.parents)
    assert found.parents[-1] == -1 and not (found.parents == dense).any()
    has = found.parents >= 0
    assert (found.lift[has] > 1).all()


def test_lift_and_density_cap_each_reject_the_dense_parent():
    forest, batch, model = _with_dense_latent()
    dense = model.n_latents - 1
    for opt in (
        ForestOptions(min_lift=1.5, max_parent_density=1.0, batch_size=100_000),
        ForestOptions(min_lift=0.0, max_parent_density=0.5, batch_size=100_000),
    ):
        found = extract_forest(model, batch.x, opt)
        assert not (found.parents == dense).any()
        assert torch.equal(found.parents[:-1], forest.parents)


def test_forest_from_coactivation_equals_extract_forest():
    forest, batch, model = _with_dense_latent()
    counts, co = coactivation(model, batch.x, 100_000)
    assert co.shape == (model.n_latents, model.n_latents)
    a = extract_forest(model, batch.x, ForestOptions(batch_size=100_000))
    b = forest_from_coactivation(counts, co, batch.x.shape[0], model.W_dec)
    assert torch.equal(a.parents, b.parents)
    # counts from sparse codes: the diagonal of the co-occurrence is each latent's fire count
    codes = SparseCodes.from_dense(model.acts)
    counts2, co2 = coactivation(model, batch.x, codes=codes)
    assert torch.equal(counts, counts2) and torch.equal(co, co2)
    assert torch.equal(co.diagonal().double(), counts)


@pytest.mark.parametrize(
    "bad",
    [{"min_coverage": 1.5}, {"min_lift": -1.0}, {"max_parent_density": 0.0}, {"rank": "best"}, {"min_cosine": 2.0}],
)
def test_options_are_validated(bad):
    forest, batch, model = _with_dense_latent()
    with pytest.raises(HsaeError):
        extract_forest(model, batch.x, ForestOptions(**bad))


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
    assert "lift >=" in text  # the criterion is printed
    # the criterion's options: no test against the base rate, and a cap on how dense a parent may be
    cli = ["tree", str(out), "--data", "synthetic", *SYN, "--n-samples", "2000", "--max-trees", "0"]
    assert main([*cli, "--min-lift", "0", "--max-parent-density", "0.05", "--rank", "coverage"]) == 0
    text = capsys.readouterr().out
    assert "parent density <= 0.05" in text and "best coverage" in text and "lift >=" not in text
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
    assert main(["tree", str(out), "--data", "synthetic", *SYN, "--max-parent-density", "0"]) == 2
    assert "max_parent_density" in capsys.readouterr().err
    assert main(["tree", str(tmp_path / "missing")]) == 2
