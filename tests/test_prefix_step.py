"""The fused sparse Matryoshka step (hsae.models.prefix_step) against the dense formulation: every
loss, the reconstruction and all four parameter gradients, with fixed, sampled and single groups,
prefixes without entries of their own, AuxK on and off, and a gradient through x_hat."""

import pytest
import torch

from hsae.models import get_family
from hsae.models.base import StepContext
from hsae.models.codes import to_dense


def _fresh(n, k, **opts):
    fam = get_family("matryoshka")
    cfg = fam.config_class(arch="matryoshka", d_in=16, n_latents=n, k=k, **opts)
    cfg.validate()
    torch.manual_seed(0)
    return fam(cfg)


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("groups", ["fixed", "sampled", "one"])
@pytest.mark.parametrize("add_rows", [512, 7])
def test_matryoshka_sparse_training_path_equals_dense(with_dead, groups, add_rows, monkeypatch):
    import hsae.models.prefix_step as prefix_step

    monkeypatch.setattr(prefix_step, "_ADD_ROWS", add_rows)  # 7: row blocks, the last one partial
    monkeypatch.setattr(prefix_step, "_WDEC_BLOCK", 5 if add_rows == 7 else 512)  # latent blocks too
    opts = {"fixed": dict(group_fractions=[0.25, 0.25, 0.5]),
            "sampled": dict(sampled_groups=True, n_sampled_prefixes=6),
            "one": dict(group_fractions=[1.0])}[groups]
    m = _fresh(64, 4, **opts).double().train()
    with torch.no_grad():
        m.b_dec.normal_()
        m.b_enc.normal_(0, 0.1)
        m.b_enc[:16] -= 10.0  # the first group never fires: prefixes with no entries of their own
    x = torch.randn(40, 16, dtype=torch.float64)
    probe = torch.randn(40, 16, dtype=torch.float64)  # a gradient through x_hat too
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = with_dead
    results = []
    for sparse in (True, False):
        m.sparse_training = sparse
        m.zero_grad()
        torch.manual_seed(5)  # the same sampled cut points on both paths
        out = m(x, StepContext(step=0, total_steps=10, dead_mask=dead))
        (out.loss + (out.x_hat * probe).sum()).backward()
        results.append((out, {n: p.grad.clone() for n, p in m.named_parameters()}))
    (sp, g_sp), (de, g_de) = results
    expect = {"mse"} | ({"prefix_mse"} if groups != "one" else set()) | ({"auxk"} if with_dead else set())
    assert set(sp.losses) == set(de.losses) == expect
    for key in sp.losses:
        assert torch.allclose(sp.losses[key], de.losses[key], atol=1e-10)
    assert torch.allclose(sp.x_hat, de.x_hat, atol=1e-10)
    assert torch.equal(to_dense(sp.codes) != 0, to_dense(de.codes) != 0)
    for name in g_de:
        assert torch.allclose(g_sp[name], g_de[name], atol=1e-10), name


