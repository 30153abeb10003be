"""MSAE (Matryoshka over k): the fused nested-k step against the family's own dense `forward` and
against a plain dense per-k reference (losses, codes, reconstruction, all four gradients), the
options (nesting, weighting) and their refusals, `encode(x, k=...)` at any k, and one model that
reconstructs better at small k than a TopK trained at the largest k."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from hsae.config import TrainConfig, from_dict
from hsae.errors import HsaeError
from hsae.models import StepContext, get_family
from hsae.models.codes import to_dense
from hsae.models.msae import default_nesting
from hsae.sources.synthetic import SyntheticConfig, SyntheticSource
from hsae.train import Trainer

GRADS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _msae(n_latents=64, k=8, scale=1.3, **options):
    cfg = from_dict(
        get_family("msae").config_class,
        dict(arch="msae", d_in=16, n_latents=n_latents, k=k, input_scale=scale, **options),
    )
    torch.manual_seed(7)
    model = get_family("msae")(cfg).double().train()
    with torch.no_grad():
        model.b_dec.normal_(0, 0.1)
        model.b_enc.normal_(0, 0.1)
        model.W_enc.add_(0.05 * torch.randn_like(model.W_enc))
    return model


def _run(model, x, dead, fused, probe, step=None):
    """(output, {param: grad}) of one step, fused or dense, backpropagating loss + <x_hat, probe>."""
    model.zero_grad()
    ctx = StepContext(step=0, total_steps=10, dead_mask=dead)
    out = (step or type(model).train_step)(model, x, ctx) if fused else model(x, ctx)
    (out.loss + (out.x_hat * probe).sum()).backward()
    return out, {name: getattr(model, name).grad.clone() for name in GRADS}


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("aux", ["off", "dense-block", "sparse-entries"])
@pytest.mark.parametrize(
    "options",
    [dict(nesting=[2, 4, 8]), dict(nesting=[2, 4, 8], weighting="rw"), dict(nesting=[8]), dict(weighting="0,3,0,1")],
    ids=["uw", "rw", "one-level", "explicit-default-nesting"],
)
def test_fused_step_equals_the_familys_own_forward(options, aux):
    model = _msae(aux_coef=0.0 if aux == "off" else 0.05, **options)
    step = type(model).train_step
    if aux == "sparse-entries":
        step = dataclasses.replace(step, dense_auxk_max_elements=0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64)
    probe = torch.randn(40, 16, generator=g, dtype=torch.float64)  # a gradient through x_hat too
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = aux != "off"
    fused, g_fused = _run(model, x, dead, True, probe, step)
    dense, g_dense = _run(model, x, dead, False, probe)
    assert set(fused.losses) == set(dense.losses)
    assert ("nested_mse" in fused.losses) == (len(model.nesting()) > 1)
    assert ("auxk" in fused.losses) == (aux != "off")
    for name in dense.losses:
        _close(fused.losses[name], dense.losses[name])
    _close(fused.x_hat, dense.x_hat)
    _close(to_dense(fused.codes), to_dense(dense.codes).detach())
    for name in GRADS:
        _close(g_fused[name], g_dense[name])


def _per_k_reference(model, x, ks, weights):
    """The paper's loss written out densely: a TopK mask per k, a dense decoder matmul per k,
    sum_i w_i mse_i / sum_i w_i."""
    xn = x * model.config.input_scale
    pre = (xn - model.b_dec) @ model.W_enc + model.b_enc
    total = 0.0
    for k, w in zip(ks, weights, strict=True):
        _, top = pre.topk(k, dim=-1)
        mask = torch.zeros_like(pre).scatter(1, top, 1.0)
        xn_hat = (pre.relu() * mask) @ model.W_dec + model.b_dec
        total = total + w * (xn_hat - xn).pow(2).sum(-1).mean()
    return total / sum(weights)


@pytest.mark.parametrize(
    "weighting,raw", [("uw", [1, 1, 1, 1]), ("rw", [4, 3, 2, 1]), ("1,0,0,5", [1, 0, 0, 5])], ids=["uw", "rw", "given"]
)
def test_losses_and_gradients_equal_a_dense_per_k_reference(weighting, raw):
    model = _msae(n_latents=96, k=24, nesting=[3, 6, 12, 24], weighting=weighting)
    ref = copy.deepcopy(model)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out = type(model).train_step(model, x, StepContext(step=0, total_steps=1))
    out.loss.backward()
    expected = _per_k_reference(ref, x, [3, 6, 12, 24], raw)
    expected.backward()
    _close(out.loss, expected)
    for name in GRADS:
        _close(getattr(model, name).grad, getattr(ref, name).grad)


def test_float32_and_many_rows_match_the_dense_forward():
    model = _msae(n_latents=128, k=16, nesting=[4, 16]).float()
    x = torch.randn(700, 16, generator=torch.Generator().manual_seed(2))  # > one selection chunk
    probe = torch.zeros_like(x)
    fused, g_fused = _run(model, x, None, True, probe)
    dense, g_dense = _run(model, x, None, False, probe)
    for name in dense.losses:
        torch.testing.assert_close(fused.losses[name], dense.losses[name], rtol=1e-5, atol=1e-5)
    for name in GRADS:
        torch.testing.assert_close(g_fused[name], g_dense[name], rtol=2e-4, atol=2e-5)


def test_a_step_cannot_be_backpropagated_twice():
    model = _msae(nesting=[4, 8])
    out = type(model).train_step(model, torch.randn(8, 16, dtype=torch.float64), StepContext(0, 1))
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.loss.backward()


def test_default_nesting_is_the_papers_doubling_up_to_k():
    assert default_nesting(1024) == [64, 128, 256, 512, 1024]
    assert default_nesting(768) == [64, 128, 256, 512, 768]
    assert default_nesting(32) == [4, 8, 16, 32]
    assert default_nesting(3) == [1, 2, 3]
    assert default_nesting(1) == [1]
    assert _msae(k=8).nesting() == [1, 2, 4, 8]


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(nesting=[2, 4, 16]), "nesting ends at 16 but --k is 8"),
        (dict(nesting=[4, 2, 8]), "strictly increasing"),
        (dict(nesting=[2, 8], weighting="heavy"), "give uw, rw or 2 non-negative weights"),
        (dict(nesting=[2, 8], weighting="1,-1"), "non-negative"),
        (dict(nesting=[2, 8], weighting="0,0"), "not all 0"),
        (dict(nesting=[2, 4, 8], weighting="1,2"), "3 non-negative weights"),
    ],
)
def test_bad_options_are_one_clear_error(options, message):
    with pytest.raises(HsaeError, match=message):
        _msae(**options)


def test_encode_at_any_k_is_the_top_k_of_the_shared_pre_activations():
    model = _msae(nesting=[2, 8]).eval()
    x = torch.randn(20, 16, dtype=torch.float64)
    with torch.no_grad():
        pre = model.pre_activations(model.scale_in(x))
        for k in (1, 5, 8, 30, 64):
            codes = to_dense(model.encode(x, k=k))
            _, top = pre.topk(k, dim=-1)
            expect = torch.zeros_like(pre).scatter(1, top, pre.gather(1, top).relu())
            _close(codes, expect)
        assert torch.equal(to_dense(model.encode(x, k=64)), pre.relu())  # the whole width: the ReLU code
        with pytest.raises(HsaeError, match="k must be between 1 and 64"):
            model.encode(x, k=65)


@pytest.mark.slow
def test_one_msae_beats_a_topk_trained_at_the_largest_k_when_read_at_a_small_k(tmp_path):
    """What the nesting is for: read at k=2, an MSAE over (2, 4, 8) reconstructs better than a TopK
    trained at k=8 only, on the same data and budget (measured 0.21 against 0.45)."""
    source = SyntheticSource(SyntheticConfig(d_in=32, n_roots=16, branching=3, depth=2, seed=1))
    train = TrainConfig(steps=250, batch_size=256, lr=3e-3, log_every=250, checkpoint_every=250)
    x = source.sample(4096)
    fvu_at_2 = {}
    for arch, options in (("msae", dict(nesting=[2, 4, 8])), ("topk", {})):
        cfg = from_dict(get_family(arch).config_class, dict(arch=arch, d_in=32, n_latents=128, k=8, **options))
        model = Trainer(cfg, train, source, tmp_path / arch, show_progress=False).run()
        with torch.no_grad():
            x_hat = model.decode(model.encode(x, k=2))
        fvu_at_2[arch] = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu_at_2["msae"] < 0.8 * fvu_at_2["topk"], fvu_at_2
