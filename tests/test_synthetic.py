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
    a = [b for _, b in zip(range(3), src.batches(16), strict=False)]
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


def test_exclusive_roots_and_normal_magnitudes():
    cfg = SyntheticConfig(
        d_in=32,
        n_roots=8,
        branching=3,
        p_root=0.1,
        p_child=0.6,
        parent_cos=0.0,
        exclusive_roots=True,
        mag_dist="normal",
        mag_mean=1.5,
        mag_std=0.25,
    )
    forest = SyntheticForest(cfg)
    batch = forest.sample(20000, torch.Generator().manual_seed(0))
    on = batch.true_acts != 0
    roots_on = on[:, :8].sum(1)
    assert (roots_on <= 1).all()  # mutually exclusive roots
    assert abs(float((roots_on == 0).float().mean()) - 0.2) < 0.02  # none with 1 - 8 * 0.1
    assert abs(float(on[:, :8].float().mean()) - 0.1) < 0.01
    # a child only under its parent, siblings exclusive, a child with probability p_child
    child = torch.arange(8, forest.n_features)
    assert not (on[:, child] & ~on[:, forest.parents[child]]).any()
    kids_on = on[:, 8:].view(-1, 8, 3).sum(2)
    assert (kids_on <= 1).all()
    assert abs(float(kids_on[on[:, :8]].float().mean()) - 0.6) < 0.02
    a = batch.true_acts[on]
    assert abs(float(a.mean()) - 1.5) < 0.01 and abs(float(a.std()) - 0.25) < 0.01 and float(a.min()) > 0
    torch.testing.assert_close(batch.x, batch.true_acts @ forest.directions)
    cos = (forest.directions[8:] * forest.directions[forest.parents[8:]]).sum(1)
    assert float(cos.abs().max()) < 1e-5
    # the defaults, spelled out, draw the very same numbers
    base = dict(d_in=16, n_roots=4, branching=2, seed=4)
    s0 = SyntheticSource(SyntheticConfig(**base)).sample_with_truth(64)
    s1 = SyntheticSource(
        SyntheticConfig(**base, exclusive_roots=False, mag_dist="uniform", mag_std=0.5)
    ).sample_with_truth(64)
    assert torch.equal(s0.x, s1.x) and torch.equal(s0.true_acts, s1.true_acts)


def test_new_synthetic_options_validate():
    import pytest

    from hsae.errors import HsaeError

    for bad, match in [
        ({"exclusive_roots": True, "n_roots": 8, "p_root": 0.2}, "n_roots \\* p_root"),
        ({"mag_dist": "gamma"}, "mag_dist"),
        ({"mag_std": -1.0}, "mag_std"),
        ({"mag_mean": 0.0}, "mag_mean"),
        ({"mag_floor": 0.0}, "mag_floor"),
        ({"exclusive_roots": "yes"}, "exclusive_roots"),
    ]:
        with pytest.raises(HsaeError, match=match):
            SyntheticConfig(**bad).validate()
    SyntheticConfig(exclusive_roots=True, n_roots=8, p_root=0.125).validate()
