"""Hierarchy metrics on hand-made forests and activations (hsae.eval.hierarchy)."""

import pytest
import torch

from hsae.errors import HsaeError
from hsae.eval.hierarchy import absorption, depths, edge_scores, parent_coverage, tree_stats


def test_tree_stats_counts_roots_depth_branching_orphans():
    # 0 -> 1 -> 3, 0 -> 2, 4 alone, 5 -> 6
    parents = torch.tensor([-1, 0, 0, 1, -1, -1, 5])
    s = tree_stats(parents)
    assert (s.roots, s.orphans, s.edges, s.depth, s.max_branching) == (2, 1, 4, 2, 2)
    assert s.mean_branching == pytest.approx(4 / 3)
    assert depths(parents).tolist() == [0, 1, 1, 2, 0, 0, 1]


def test_tree_stats_of_flat_model_and_cycle():
    s = tree_stats(torch.full((5,), -1))
    assert (s.roots, s.orphans, s.edges, s.depth) == (0, 5, 0, 0)
    with pytest.raises(HsaeError, match="cycle"):
        depths(torch.tensor([1, 0]))


def test_edge_scores():
    true_parents = torch.tensor([-1, 0, 0])  # features 0 -> 1, 0 -> 2
    latent_of = torch.tensor([5, 2, 7])  # feature f is latent latent_of[f]
    parents = torch.full((8,), -1)
    parents[2] = 5  # correct
    parents[7] = 2  # wrong (7's true parent is 5)
    parents[3] = 5  # 3 matches no feature: ignored
    s = edge_scores(parents, true_parents, latent_of)
    assert (s.reported, s.correct) == (2, 1)
    assert s.precision == 0.5 and s.recall == 0.5 and s.f1 == 0.5


def test_absorption_counts_parent_silent_while_child_fires():
    true_parents = torch.tensor([-1, 0])
    true_acts = torch.tensor([[1.0, 1.0]] * 4 + [[1.0, 0.0]] * 2)
    latent_of = torch.tensor([0, 1])
    active = torch.tensor([[1, 1], [0, 1], [0, 1], [0, 0], [1, 0], [1, 0]]).bool()
    a = absorption(active, true_acts, true_parents, latent_of)
    # 4 samples with both on; the child latent fires in 3; the parent is silent in 2 of those
    assert a.pairs == 4 and a.rate == pytest.approx(2 / 3) and a.child_silent == pytest.approx(1 / 4)
    # one latent for both: every firing counts as absorbed
    merged = absorption(active, true_acts, true_parents, torch.tensor([1, 1]))
    assert merged.rate == 1.0


def test_parent_coverage():
    parents = torch.tensor([-1, 0])
    active = torch.tensor([[1, 1], [0, 1], [1, 0], [1, 1]]).bool()
    assert parent_coverage(parents, active) == pytest.approx(2 / 3)
