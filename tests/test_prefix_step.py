"""The fused sparse Matryoshka step (hsae.models.sparse.prefix_step) against the dense formulation: every
loss, the reconstruction and all four parameter gradients, with fixed, sampled and single groups,
prefixes without entries of their own, AuxK on and off, and a gradient through x_hat."""

import dataclasses

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


def _sparse_and_dense(m, x, dead, loss_of, seed=None, dense_auxk=True):
    """[(output, gradients by parameter name; None where a parameter got none)] of one step of `m`
    on the fused sparse step, then on the dense `forward`, backpropagating loss_of(output)."""
    step = type(m).train_step
    if not dense_auxk:  # AuxK as sparse entries, never a dense block
        step = dataclasses.replace(step, dense_auxk_max_elements=0)
    results = []
    for run in (step, m):
        m.zero_grad()
        if seed is not None:
            torch.manual_seed(seed)
        ctx = StepContext(step=0, total_steps=10, dead_mask=dead)
        out = step(m, x, ctx) if run is step else m(x, ctx)
        loss_of(out).backward()
        results.append((out, {n: (p.grad.clone() if p.grad is not None else None) for n, p in m.named_parameters()}))
    return results


@pytest.mark.parametrize("with_dead", [False, True])
@pytest.mark.parametrize("groups", ["fixed", "sampled", "one"])
@pytest.mark.parametrize("add_rows", [512, 7])
@pytest.mark.parametrize("dense_auxk", [True, False])
def test_matryoshka_sparse_training_path_equals_dense(with_dead, groups, add_rows, dense_auxk, monkeypatch):
    import hsae.models.sparse.prefix_step as prefix_step

    monkeypatch.setattr(prefix_step, "ADD_ROWS", add_rows)  # 7: row blocks, the last one partial
    monkeypatch.setattr(prefix_step, "WDEC_BLOCK", 5 if add_rows == 7 else 512)  # latent blocks too
    opts = {
        "fixed": dict(group_fractions=[0.25, 0.25, 0.5], prefix_weight=0.25),
        "sampled": dict(sampled_groups=True, n_sampled_prefixes=6),
        "one": dict(group_fractions=[1.0]),
    }[groups]
    m = _fresh(64, 4, **opts).double().train()
    with torch.no_grad():
        m.b_dec.normal_()
        m.b_enc.normal_(0, 0.1)
        m.b_enc[:16] -= 10.0  # the first group never fires: prefixes with no entries of their own
    x = torch.randn(40, 16, dtype=torch.float64)
    probe = torch.randn(40, 16, dtype=torch.float64)  # a gradient through x_hat too
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = with_dead
    # the same seed on both paths: the same sampled cut points
    (sp, g_sp), (de, g_de) = _sparse_and_dense(
        m, x, dead, lambda out: out.loss + (out.x_hat * probe).sum(), seed=5, dense_auxk=dense_auxk
    )
    expect = {"mse"} | ({"prefix_mse"} if groups != "one" else set()) | ({"auxk"} if with_dead else set())
    assert set(sp.losses) == set(de.losses) == expect
    for key in sp.losses:
        assert torch.allclose(sp.losses[key], de.losses[key], atol=1e-10)
    assert torch.allclose(sp.x_hat, de.x_hat, atol=1e-10)
    assert torch.equal(to_dense(sp.codes) != 0, to_dense(de.codes) != 0)
    for name in g_de:
        assert torch.allclose(g_sp[name], g_de[name], atol=1e-10), name


@pytest.mark.parametrize(
    "weights",
    [(2.0, 0.3, 5.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)],
    ids=["weighted", "mse-only", "auxk-only", "prefix-only"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dense_auxk", [True, False])
def test_prefix_step_scaled_inputs_and_each_loss_alone(weights, dtype, dense_auxk):
    """input_scale != 1 (every scale factor of x_hat, S and grad W_enc), unequal weights on the loss
    terms (mse and prefix_mse swapped would show), and terms left out of the loss (their incoming
    gradient is None), in float64 and float32, AuxK as a dense block and as sparse entries."""
    w_mse, w_prefix, w_aux = weights
    m = _fresh(64, 4, group_fractions=[0.25, 0.25, 0.5]).to(dtype).train()
    m.config.input_scale = 1.3
    with torch.no_grad():
        m.b_dec.normal_()
        m.b_enc.normal_(0, 0.1)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(600, 16, generator=g, dtype=torch.float64).to(dtype)  # > one row block
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True

    def loss_of(out):
        terms = ((w_mse, "mse"), (w_prefix, "prefix_mse"), (w_aux, "auxk"))
        loss = sum(w * out.losses[key] for w, key in terms if w)  # a term left out gets no gradient
        return loss + out.x_hat.sum() if w_mse == 2.0 else loss

    (sp, g_sp), (de, g_de) = _sparse_and_dense(m, x, dead, loss_of, dense_auxk=dense_auxk)
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    for key in de.losses:
        torch.testing.assert_close(sp.losses[key], de.losses[key], **tol)
    torch.testing.assert_close(sp.x_hat, de.x_hat, **tol)
    for name in g_de:
        if g_de[name] is None:
            assert g_sp[name] is None or not g_sp[name].any(), name
        else:
            torch.testing.assert_close(g_sp[name], g_de[name], **tol, msg=name)
