"""Hierarchical families: end-to-end CLI training, save/load round trips, their structural
guarantees, MP-SAE's Gram path against the naive loop, and the papers' claim in kind on a small
synthetic forest: less absorption than flat TopK at the same L0, and (where it holds) more true edges
than TopK's post-hoc forest."""

import pytest
import torch

import hsae
from hsae.cli import main
from hsae.config import TrainConfig
from hsae.errors import HsaeError
from hsae.eval.hierarchy import hierarchy_report
from hsae.interpret.forest import extract_forest, has_builtin_hierarchy
from hsae.models import get_family
from hsae.models.codes import to_dense
from hsae.models.mp import argmax_rows, merge_repeats, mp_gram, mp_naive
from hsae.sources.synthetic import SyntheticConfig, SyntheticSource
from hsae.train import Trainer

SYN = ["--synthetic", "d_in=16", "--synthetic", "n_roots=4", "--synthetic", "branching=2"]

# (arch, n_latents, k, options)
FAMILIES = [
    ("matryoshka", 32, 3, []),
    ("matryoshka", 32, 3, ["sampled_groups=true", "n_sampled_prefixes=3"]),
    ("mp", 32, 3, []),
    ("h-sae", 30, 2, ["m_low=4", "subspace_dim=2"]),
    ("forest", 32, 2, ["level_fractions=1,3"]),
    ("forest", 32, 2, ["level_fractions=1,3", "activation=topk"]),
    ("tree", 32, 3, []),
    ("tree", 32, 3, ["selection=gate", "reparent=false", "capacity_mode=batch", "aux_coef_children=0"]),
]
# Tree SAE as its paper has it (hsae's defaults add the candidate pool, row capacity, re-parenting and
# AuxK on the child layers: src/hsae/models/tree.py).
TREE_PAPER = {"selection": "gate", "reparent": False, "capacity_mode": "batch", "aux_coef_children": 0.0}


@pytest.mark.parametrize("arch,n,k,opts", FAMILIES, ids=lambda v: str(v) if not isinstance(v, list) else "-".join(v))
def test_trains_from_cli_and_round_trips(tmp_path, arch, n, k, opts):
    out = tmp_path / "m"
    args = [
        "train",
        "--arch",
        arch,
        "--data",
        "synthetic",
        *SYN,
        "--n-latents",
        str(n),
        "--k",
        str(k),
        "--steps",
        "30",
        "--batch-size",
        "128",
        "--out",
        str(out),
        "-q",
        "-o",
        "dead_window_tokens=1024",
        "-o",
        "lr_warmup_steps=5",
    ]
    for o in opts:
        args += ["-o", o]
    assert main(args) == 0
    model = hsae.load(out)
    again = hsae.load(out)
    assert model.arch == arch
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), again.state_dict().items(), strict=False):
        assert ka == kb and torch.equal(va, vb)
    x = SyntheticSource(SyntheticConfig(d_in=16, n_roots=4, branching=2)).sample(64)
    with torch.no_grad():
        codes = model.encode(x)
        x_hat = model.decode(codes)
        out_fwd = model(x)
    assert x_hat.shape == x.shape and torch.isfinite(x_hat).all()
    assert torch.allclose(out_fwd.x_hat, x_hat, atol=1e-5)
    assert model.W_dec.shape == (n, 16)
    # decode is linear in the codes through W_dec: the uniform view evaluators rely on
    dense = to_dense(codes)
    assert torch.allclose(dense @ model.W_dec + model.b_dec, x_hat * model.config.input_scale, atol=1e-4)
    parents = model.hierarchy()
    assert parents.shape == (n,) and parents.dtype == torch.long
    assert (parents < n).all() and (parents >= -1).all()


def _fresh(arch, n, k, **opts):
    fam = get_family(arch)
    cfg = fam.config_class(arch=arch, d_in=16, n_latents=n, k=k, **opts)
    cfg.validate()
    torch.manual_seed(0)
    return fam(cfg)


def test_hsae_layout_and_gating():
    m = _fresh("h-sae", 30, 2, m_low=4, subspace_dim=2)
    n_top = 6
    expect = torch.full((30,), -1)
    expect[n_top:] = torch.arange(n_top).repeat_interleave(4)
    assert torch.equal(m.hierarchy(), expect)
    x = torch.randn(50, 16)
    active = to_dense(m.encode(x)) != 0
    kids = torch.arange(n_top, 30)
    assert not (active[:, kids] & ~active[:, expect[kids]]).any()  # no child without its parent
    assert (active[:, n_top:].sum(1) <= 2).all()  # at most one child per active parent
    with pytest.raises(HsaeError):
        m.set_hierarchy(torch.full((30,), -1))


def test_hsae_k_counts_parents_and_children():
    m = _fresh("h-sae", 60, 4, m_low=4, subspace_dim=2)  # 12 parents
    x = torch.randn(50, 16)
    for k, parents, children in ((4, 2, 2), (3, 2, 1), (1, 1, 0)):
        active = to_dense(m.encode(x, k=k)) != 0
        assert (active[:, :12].sum(1) <= parents).all() and (active[:, 12:].sum(1) <= children).all()
        assert (active.sum(1) <= k).all()
        assert (active[:, :12].sum(1) == parents).float().mean() > 0.9  # relu leaves a slot empty now and then
    with pytest.raises(HsaeError, match="parents and children"):
        _fresh("h-sae", 60, 24, m_low=4)  # 12 parents would be every top latent


def test_forest_k_is_the_l0_of_all_levels():
    m = _fresh("forest", 64, 6, level_fractions=[1.0, 3.0], activation="topk")
    assert m.config.level_k() == [3, 3]
    active = to_dense(m.encode(torch.randn(50, 16))) != 0
    per_level = torch.stack([active[:, m.level == lv].sum(1) for lv in range(2)], 1)
    assert (per_level <= 3).all() and (per_level == 3).float().mean() > 0.9
    assert _fresh("forest", 64, 7, level_fractions=[1.0, 1.0, 2.0], activation="topk").config.level_k() == [2, 2, 3]
    # fewer than one per level: each level still keeps one
    assert _fresh("forest", 64, 2, level_fractions=[1.0, 1.0, 2.0]).config.level_k() == [1, 1, 1]


def test_hsae_n_latents_must_fit_layout():
    from hsae.errors import HsaeError

    with pytest.raises(HsaeError, match="multiple of 1 \\+ m_low"):
        _fresh("h-sae", 32, 2, m_low=4)


@pytest.mark.parametrize("selection", ["gate", "pool"])
def test_tree_activation_condition(selection):
    m = _fresh("tree", 32, 6, selection=selection)
    parents = m.hierarchy()
    layer = m.layer
    kids = torch.nonzero(parents >= 0).flatten()
    assert (layer[parents[kids]] < layer[kids]).all()  # parents sit in earlier layers
    active = to_dense(m.encode(torch.randn(200, 16))) != 0
    assert not (active[:, kids] & ~active[:, parents[kids]]).any()


def test_tree_pool_selection_keeps_the_activation_condition_and_fills_k():
    m = _fresh("tree", 32, 4, selection="pool")
    parents = m.hierarchy()
    kids = torch.nonzero(parents >= 0).flatten()
    x = torch.randn(200, 16)
    codes = m.encode(x)
    active = to_dense(codes) != 0
    assert not (active[:, kids] & ~active[:, parents[kids]]).any()
    assert codes.indices.shape == (200, 4)
    # distinct picks per row, and each pick is the largest eligible pre-activation at its turn
    assert (codes.indices.sort(1).values.diff(1) != 0).all()
    with torch.no_grad():
        pre = m.pre_activations(m.scale_in(x))
    first = pre.masked_fill((parents >= 0)[None, :], float("-inf")).argmax(1)
    assert torch.equal(codes.indices[:, 0], first)


def test_tree_reparent_follows_coactivation():
    from hsae.models.codes import SparseCodes

    m = _fresh("tree", 32, 2, reparent=True)
    child, parent = 20, 3  # layer 2 and layer 1 (bounds 0, 8, 32)
    m.parents[child] = -1
    idx = torch.tensor([[parent, child]] * 10 + [[1, 2]] * 10)
    codes = SparseCodes(idx, torch.ones(20, 2), 32)
    m._count_coactivation(codes.indices, codes.values != 0)
    m.reparent(torch.zeros(32, dtype=torch.bool))
    assert int(m.parents[child]) == parent
    # a dead would-be parent is not taken
    m.parents[child] = -1
    m._count_coactivation(codes.indices, codes.values != 0)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[parent] = True
    m.reparent(dead)
    assert int(m.parents[child]) == -1


def test_forest_hierarchy_links_consecutive_levels():
    m = _fresh("forest", 32, 2, level_fractions=[1.0, 3.0])
    m.update_hierarchy()
    parents = m.hierarchy()
    kids = torch.nonzero(parents >= 0).flatten()
    assert (m.level[kids] == 1).all() and (m.level[parents[kids]] == 0).all()
    assert kids.numel() == 24 - int(0.2 * 24)  # the weakest 20% stay unassigned


def test_matryoshka_sampled_groups_are_nested_prefixes():
    m = _fresh("matryoshka", 64, 4, sampled_groups=True, n_sampled_prefixes=4)
    m.train()
    for _ in range(20):
        b = m.group_bounds()
        assert b[0] == 0 and b[-1] == 64 and len(b) == 5 and b == sorted(set(b))
    m.eval()
    assert m.group_bounds() == m.config.fixed_bounds()


# ----- MP-SAE: the Gram form equals the naive loop ---------------------------------------------------
@pytest.mark.parametrize("nonneg", [True, False])
def test_mp_gram_equals_naive(nonneg):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 12, generator=g, dtype=torch.float64)
    W /= W.norm(dim=1, keepdim=True)
    x = torch.randn(30, 12, generator=g, dtype=torch.float64)
    i_n, v_n, r = mp_naive(x, W, 8, nonneg)
    i_g, v_g = mp_gram(x, W, 8, nonneg)
    assert torch.equal(i_n, i_g)
    assert torch.allclose(v_n, v_g, atol=1e-10)
    # the residual is what the codes leave unexplained
    dense = torch.zeros(30, 40, dtype=torch.float64).scatter_add(1, i_n, v_n)
    assert torch.allclose(x - dense @ W, r, atol=1e-10)


def test_mp_gram_gradients_equal_naive():
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(20, 8, generator=g, dtype=torch.float64)
    W0 /= W0.norm(dim=1, keepdim=True)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64)
    grads = []
    for fn in ("naive", "gram"):
        W = W0.clone().requires_grad_(True)
        if fn == "naive":
            i, v, _ = mp_naive(x, W, 5)
        else:
            i, v = mp_gram(x, W, 5)
        codes = torch.zeros(16, 20, dtype=torch.float64).scatter_add(1, i, v)
        (x - codes @ W).pow(2).sum().backward()
        grads.append(W.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-9)


@pytest.mark.parametrize("nonneg,threshold", [(True, 0.0), (True, 0.6), (False, 0.6)])
def test_mp_adaptive_stop(nonneg, threshold):
    """The official synthetic code's data-dependent stop: a row stops after re-selecting an atom (that
    step's coefficient still counts), on a zero step, or once ||r|| < threshold ||x||; both encoders agree,
    with and without gradients, and a stopped row's later slots are 0."""
    g = torch.Generator().manual_seed(2)
    W = torch.randn(40, 12, generator=g, dtype=torch.float64)
    W /= W.norm(dim=1, keepdim=True)
    x = torch.randn(30, 12, generator=g, dtype=torch.float64)
    opts = {"adaptive_stop": True, "stop_threshold": threshold}
    i_n, v_n, r = mp_naive(x, W, 10, nonneg, **opts)
    with torch.no_grad():
        i_g, v_g = mp_gram(x, W, 10, nonneg, **opts)
    assert torch.equal(i_n, i_g)
    assert torch.allclose(v_n, v_g, atol=1e-10)
    dense = torch.zeros(30, 40, dtype=torch.float64).scatter_add(1, i_n, v_n)
    assert torch.allclose(x - dense @ W, r, atol=1e-10)
    i_f, v_f, _ = mp_naive(x, W, 10, nonneg)  # fixed steps: the same until a row stops
    stopped_any = False
    for row in range(30):
        live = v_n[row] != 0
        t = int(live.sum())  # steps taken (no live step has coefficient exactly 0)
        assert live[:t].all() and not live[t:].any()
        assert torch.equal(i_n[row, :t], i_f[row, :t]) and torch.allclose(v_n[row, :t], v_f[row, :t])
        if t < 10:
            stopped_any = True
            repeat = bool((i_n[row, : t - 1] == i_n[row, t - 1]).any())
            res = x[row] - v_n[row, :t] @ W[i_n[row, :t]]
            assert repeat or float(res.norm()) <= threshold * float(x[row].norm()) + 1e-12
    assert stopped_any
    W2 = W.clone().requires_grad_(True)
    i_gg, v_gg = mp_gram(x, W2, 10, nonneg, **opts)  # the autograd path
    assert torch.equal(i_gg, i_n) and torch.allclose(v_gg, v_n, atol=1e-10)


def test_mp_adaptive_stop_options_validate():
    cfg = get_family("mp").config_class(arch="mp", d_in=8, n_latents=16, k=4, stop_threshold=0.1)
    with pytest.raises(HsaeError, match="adaptive_stop"):
        cfg.validate()
    cfg = get_family("mp").config_class(arch="mp", d_in=8, n_latents=16, k=4, adaptive_stop=True, stop_threshold=1.5)
    with pytest.raises(HsaeError, match="stop_threshold"):
        cfg.validate()


def test_mp_model_encoders_agree_and_k_at_inference():
    m = _fresh("mp", 48, 4).double().eval()
    x = torch.randn(25, 16, dtype=torch.float64)
    gram = to_dense(m.encode(x))
    m.config.encoder = "naive"
    naive = to_dense(m.encode(x))
    assert torch.allclose(gram, naive, atol=1e-10)
    m.config.encoder = "gram"
    for k in (1, 4, 10):
        codes = m.encode(x, k=k)
        assert codes.indices.shape == (25, k) and ((to_dense(codes) != 0).sum(1) <= k).all()
    # more pursuit steps never reconstruct worse
    errs = [(m.decode(m.encode(x, k=k)) - x).pow(2).sum() for k in (1, 2, 4, 8)]
    assert all(a >= b - 1e-9 for a, b in zip(errs, errs[1:], strict=False))


@pytest.mark.parametrize("m", [37, 128, 200, 4096])
def test_argmax_rows_equals_argmax(m):
    g = torch.Generator().manual_seed(m)
    for _ in range(5):
        c = torch.randn(33, m, generator=g)
        c[:, torch.randint(0, m, (3,), generator=g)] = 5.0  # ties: the first index wins, as argmax
        assert torch.equal(argmax_rows(c), c.argmax(1))
    c = torch.randint(0, 3, (33, m), generator=g).float()
    assert torch.equal(argmax_rows(c), c.argmax(1))


def test_merge_repeats():
    idx = torch.tensor([[3, 1, 3, 3]])
    val = torch.tensor([[1.0, 2.0, 0.5, 0.25]])
    assert merge_repeats(idx, val).tolist() == [[1.75, 2.0, 0.0, 0.0]]


# ----- the papers' claim, in kind ------------------------------------------------------------------------
CLAIM_DATA = SyntheticConfig(d_in=32, n_roots=8, branching=3, p_root=0.15, p_child=0.9, seed=0)
# The training seed must differ from the data seed: the forest draws its directions with
# torch.Generator().manual_seed(seed).randn and the model's init draws randn after
# torch.manual_seed(seed), so with equal seeds every family starts with the true root directions
# (and the children's random parts) as decoder rows (mean best cosine 0.89 at init, 1.0 for roots).
CLAIM_TRAIN_SEED = 1


def test_claim_models_do_not_start_at_the_truth():
    source = SyntheticSource(CLAIM_DATA)
    torch.manual_seed(CLAIM_TRAIN_SEED)
    fam = get_family("topk")
    model = fam(fam.config_class(arch="topk", d_in=32, n_latents=64, k=2))
    w = model.W_dec.detach() / model.W_dec.detach().norm(dim=1, keepdim=True)
    assert float((source.forest.directions @ w.T).max(1).values.mean()) < 0.6


def _train_and_score(arch, n, k, data=CLAIM_DATA, steps=300, lr=3e-3, **opts):
    source = SyntheticSource(data)
    fam = get_family(arch)
    cfg = fam.config_class(arch=arch, d_in=data.d_in, n_latents=n, k=k, **opts)
    cfg.validate()
    train = TrainConfig(
        steps=steps,
        batch_size=256,
        lr=lr,
        lr_warmup_steps=20,
        seed=CLAIM_TRAIN_SEED,
        checkpoint_every=10_000,
        log_every=10_000,
        dead_window_tokens=5120,
    )
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        model = Trainer(cfg, train, source, out, show_progress=False).run()
    held = source.sample_with_truth(8192)
    parents = None
    if not has_builtin_hierarchy(model):
        parents = extract_forest(model, source.sample_with_truth(8192, stream=-2).x).parents
    report = hierarchy_report(
        model, held.x, held.true_acts, source.forest.directions, source.forest.parents, parents=parents
    )
    with torch.no_grad():
        report["l0"] = float((to_dense(model.encode(held.x)) != 0).sum(1).float().mean())
    return report


@pytest.fixture(scope="module")
def topk_baseline():
    return _train_and_score("topk", 64, 2)


_CLAIM_RESULTS: dict[str, dict] = {}


def _claimant(arch, n, k, opts):
    """One training per claimant, shared by the absorption and the edge test."""
    key = repr((arch, n, k, sorted(opts.items())))
    if key not in _CLAIM_RESULTS:
        _CLAIM_RESULTS[key] = _train_and_score(arch, n, k, **opts)
    return _CLAIM_RESULTS[key]


# Measured over training seeds 1, 2, 3 with the post-hoc forest's default criterion (coverage >= 0.3, lift
# >= 2, best lift), at L0 2 (TopK: absorption 0.789, 0.796, 0.809, edge F1 0.629, 0.571, 0.571; at AuxK's
# earlier weight 1/32 0.739, 0.819, 0.787 / 0.737, 0.529, 0.545); docs/hierarchy.md has the table.
# Absorption / edge F1: matryoshka 0.25, 0.38, 0.47 / 0.88, 0.75, 0.72 (AuxK weight 1/32: 0.35, 0.41, 0.38 /
# 0.81, 0.72, 0.73; with that and the paper's prefix_weight 1: 0.37, 0.46, 0.32 / 0.72, 0.65, 0.70); forest
# (TopK levels) 0.30, 0.35, 0.40 / 0.743, 0.525, 0.579; tree 0.33, 0.58, 0.52 / 0.47, 0.41, 0.65; tree with
# the paper's method 0.681, 0.776, 0.667 / 0.15, 0.08, 0.0; h-sae 0.76, 0.73, 0.66 / 0.44, 0.41, 0.46; h-sae
# with the paper's beta 0.99, 0.80, 0.82 / 0.06, 0.24, 0.20; mp 0.90, 0.79, 0.91 / 0.21, 0.36, 0.14.
# A claim is a plain test only where it holds on all three seeds. Training is deterministic at a seed,
# and the tests train at seed 1 only, so a claim that holds at seed 1 but not at another seed is a
# non-strict xfail that XPASSes here (`_seed_dependent`); one that fails at seed 1 XFAILs (`_fails`).
def _fails(what, numbers):
    return pytest.mark.xfail(reason=f"{what} ({numbers}; seeds 1, 2, 3)", strict=False)


def _seed_dependent(what, numbers):
    return pytest.mark.xfail(
        reason=f"seed-dependent, holds at the tests' seed 1 (XPASS expected): {what} ({numbers})", strict=False
    )


ABSORPTION = [
    pytest.param("matryoshka", 64, 2, {"group_fractions": [0.25, 0.75]}, id="matryoshka"),
    pytest.param("forest", 64, 2, {"level_fractions": [1.0, 3.0], "activation": "topk"}, id="forest"),
    pytest.param("tree", 64, 2, {}, id="tree"),
    pytest.param(
        "tree", 64, 2, TREE_PAPER, id="tree-paper",
        marks=_seed_dependent(
            "the paper's Tree SAE absorbs less than TopK - 0.05 at seeds 1 and 3 but not at seed 2, where its "
            "children die under the gate",
            "0.681 vs 0.739, 0.776 vs 0.746, 0.667 vs 0.759 at seeds 1, 2, 3",
        ),
    ),
    pytest.param(
        "h-sae", 60, 2, {"m_low": 4, "subspace_dim": 3}, id="h-sae",
        marks=_fails("h-sae absorbs less than TopK at seed 1, but not by 0.05 (0.762 vs 0.789)", "0.76, 0.73, 0.66"),
    ),
    pytest.param(
        "h-sae", 60, 2, {"m_low": 4, "subspace_dim": 3, "beta": 0.1}, id="h-sae-paper",
        marks=_fails(
            "h-sae with the paper's beta spends each expert's child slot on a second root", "0.99, 0.80, 0.82"
        ),
    ),
    pytest.param("mp", 64, 2, {}, id="mp", marks=_fails("MP-SAE absorbs more than TopK", "0.90, 0.79, 0.91")),
]  # fmt: skip

EDGES = [
    pytest.param("matryoshka", 64, 2, {"group_fractions": [0.25, 0.75]}, id="matryoshka"),
    pytest.param(
        "forest", 64, 2, {"level_fractions": [1.0, 3.0], "activation": "topk"}, id="forest",
        marks=_seed_dependent(
            "more edges than TopK's post-hoc forest at seeds 1 and 3, fewer at seed 2",
            "0.743 vs 0.629, 0.525 vs 0.571, 0.579 vs 0.571 at seeds 1, 2, 3",
        ),
    ),
    pytest.param(
        "tree", 64, 2, {}, id="tree",
        marks=_fails("below TopK's post-hoc forest on seeds 1 and 2", "0.47, 0.41, 0.65 vs 0.63, 0.57, 0.57"),
    ),
    pytest.param(
        "h-sae", 60, 2, {"m_low": 4, "subspace_dim": 3}, id="h-sae",
        marks=_fails("below TopK's post-hoc forest", "0.44, 0.41, 0.46 vs 0.63, 0.57, 0.57"),
    ),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("arch,n,k,opts", ABSORPTION)
def test_hierarchical_family_absorbs_less_than_topk(topk_baseline, arch, n, k, opts):
    ours = _claimant(arch, n, k, opts)
    assert topk_baseline["absorption"] > 0.1  # the flat baseline does absorb in this configuration
    assert ours["absorption"] < topk_baseline["absorption"] - 0.05


@pytest.mark.slow
@pytest.mark.parametrize("arch,n,k,opts", EDGES)
def test_hierarchical_family_recovers_more_edges_than_topk(topk_baseline, arch, n, k, opts):
    assert _claimant(arch, n, k, opts)["edge_f1"] > topk_baseline["edge_f1"]


# ----- MP-SAE in its own paper's toy regime ------------------------------------------------------------------
# The official MP-SAE toy (tree.json, toy_model.py): one top-level concept per sample (mutually exclusive),
# at most one child of it (3 mutually exclusive children, none with probability 0.4), near-orthogonal
# directions, every magnitude 1.5 + 0.25 N(0, 1) independently; MP with non-negative selection and the
# data-dependent stop. Here: 8 roots x 3 children in d 32, one root per sample, p_child 0.6, children
# orthogonal to their parent (parent_cos 0), so the true L0 is 1.6 (1 or 2 per sample); trained longer
# than the forest claim (1000 steps at lr 1e-2) so that both dictionaries converge.
CLAIM_DATA_MP_TOY = SyntheticConfig(
    d_in=32,
    n_roots=8,
    branching=3,
    p_root=0.125,
    p_child=0.6,
    parent_cos=0.0,
    exclusive_roots=True,
    mag_dist="normal",
    mag_mean=1.5,
    mag_std=0.25,
    seed=0,
)
MP_TOY_TRAIN = {"data": CLAIM_DATA_MP_TOY, "steps": 1000, "lr": 1e-2}


@pytest.fixture(scope="module")
def topk_baseline_mp_toy():
    return _train_and_score("topk", 64, 2, **MP_TOY_TRAIN)


# Measured (seeds 1, 2, 3; absorption / edge F1 / L0): TopK k=2 0.002, 0.002, 0.003 / 0.93, 0.93, 0.93 /
# 1.72, 1.83, 1.65 (ReLU leaves a slot empty on one-feature samples); MP with the adaptive stop and at most
# 2 steps 0.36, 0.46, 0.57 / 0.77, 0.70, 0.65 / 1.59, 1.65, 1.75, so at the same L0 MP absorbs far more.
# MP with 2 fixed steps: 0.42, 0.60, 0.61 / 0.70, 0.57, 0.61 / 2.0. At 300 steps and lr 3e-3 (the forest
# claim's schedule): TopK 0.38, 0.35, 0.60 / 0.78, 0.65, 0.32, MP 0.58, 0.52, 0.46 / 0.54, 0.54, 0.43.
# MP does learn the pure atoms (best cosine ~1.0 for most true features), but with 64 atoms it also keeps
# merged parent+child atoms, and greedy selection picks a merged atom first whenever it has one.
# A deeper variant (4 roots, depth 3, p_child 0.618, so a true L0 of 2 that k=2 cannot always cover):
# TopK k=2 0.46, 0.44, 0.43 / 0.62, 0.73, 0.62; MP with the adaptive stop and at most 4 steps 0.38, 0.35,
# 0.13 / 0.50, 0.32, 0.48 but at L0 2.35-2.89, not TopK's 2; MP with 2 fixed steps 0.67, 0.72, 0.72.
@pytest.mark.slow
@pytest.mark.xfail(
    reason="in its own paper's toy regime MP-SAE absorbs more than TopK at the same L0 (0.36-0.57 "
    "vs 0.002-0.003 at L0 1.6-1.8) with lower edge F1 (0.65-0.77 vs 0.93)",
    strict=False,
)
def test_mp_in_its_papers_toy_regime(topk_baseline_mp_toy):
    ours = _train_and_score("mp", 64, 2, adaptive_stop=True, stop_threshold=0.05, **MP_TOY_TRAIN)
    assert ours["l0"] <= topk_baseline_mp_toy["l0"] + 0.1  # the same L0 (MP stops early, TopK's ReLU may too)
    assert ours["absorption"] < topk_baseline_mp_toy["absorption"] - 0.05
    assert ours["edge_f1"] > topk_baseline_mp_toy["edge_f1"]
