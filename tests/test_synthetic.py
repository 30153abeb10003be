import torch

from hsae.sources.synthetic import SyntheticConfig, SyntheticForest, SyntheticSource


def test_forest_structure_and_sampling_rules():
    cfg = SyntheticConfig(d_in=48, n_roots=10, branching=3, depth=3, p_root=0.3, p_child=0.9, parent_cos=0.5)
    forest = SyntheticForest(cfg)
    assert forest.n_features == cfg.n_features == 10 * (1 + 3 + 9)
    parents = forest.parents
    assert (parents[:10] == -1).all() and (parents[10:] >= 0).all()
    cos = (forest.directions[10:] * forest.directions[parents[10:]]).sum(1)
    torch.testing.assert_close(cos, torch.full_like(cos, 0.5), atol=1e-5, rtol=0)
    batch = forest.sample(4000, torch.Generator().manual_seed(0))
    on = batch.true_acts > 0
    child = torch.arange(10, forest.n_features)
    # a child fires only with its parent
    assert not (on[:, child] & ~on[:, parents[child]]).any()
    # siblings are exclusive
    for p in range(10):
        kids = (parents == p).nonzero().squeeze(1)
        assert (on[:, kids].sum(1) <= 1).all()
    torch.testing.assert_close(batch.x, batch.true_acts @ forest.directions)
    assert abs(float(on[:, :10].float().mean()) - 0.3) < 0.02


def test_source_is_deterministic_per_step():
    src = SyntheticSource(SyntheticConfig(seed=3))
    a = [b for _, b in zip(range(3), src.batches(16))]
    b = next(src.batches(16, start_step=2))
    torch.testing.assert_close(a[2], b)
    assert not torch.equal(a[0], a[1])
    torch.testing.assert_close(src.sample(8), src.sample(8))


def test_forest_is_not_the_init_of_a_model_with_the_same_seed():
    """The forest's directions must not be what torch.manual_seed(seed) + randn gives a model."""
    from hsae.eval.groundtruth import mean_best_cosine
    from hsae.models.topk import TopKConfig, TopKSAE

    forest = SyntheticForest(SyntheticConfig(seed=0))
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(arch="topk", d_in=96, n_latents=512, k=4))
    assert mean_best_cosine(sae.W_dec, forest.directions) < 0.6
