"""The SAE interface, for every registered family."""

import pytest
import torch

import hsae
from hsae.config import from_dict
from hsae.errors import HsaeError
from hsae.models import SparseCodes, StepContext, families, get_family, to_dense
from hsae.models.codes import l0_per_row

FLAT = ["relu", "topk", "batchtopk", "jumprelu"]
# Options a family needs at the tiny test size (h-sae: n_latents a multiple of 1 + m_low).
TINY_OPTIONS = {"h-sae": {"m_low": 3}}


def make(name, d=16, m=64, k=4, **extra):
    fam = get_family(name)
    return fam(from_dict(fam.config_class, {"arch": name, "d_in": d, "n_latents": m, "k": k, **extra}))


def test_flat_families_are_registered():
    assert set(FLAT) <= set(families())


def test_unknown_family_suggests_close_names():
    with pytest.raises(HsaeError, match="did you mean topk"):
        get_family("topkk")


@pytest.mark.parametrize("name", sorted(families()))
def test_interface_shapes_and_save_load(name, tmp_path):
    torch.manual_seed(0)
    sae = make(name, **TINY_OPTIONS.get(name, {}))
    x = torch.randn(20, 16)
    out = sae(x, StepContext(step=0, total_steps=10, dead_mask=torch.ones(64, dtype=torch.bool)))
    assert out.x_hat.shape == x.shape
    assert torch.isfinite(out.loss) and "mse" in out.losses
    out.loss.backward()
    assert sae.W_dec.shape == (64, 16)
    parents = sae.hierarchy()
    assert parents.dtype == torch.long and parents.shape == (64,)
    sae.eval()
    codes = sae.encode(x)
    x_hat = sae.decode(codes)
    sae.save(tmp_path / "m")
    loaded = hsae.load(tmp_path / "m")
    assert type(loaded) is type(sae)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), x_hat)
    torch.testing.assert_close(loaded.hierarchy(), parents)


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_topk_codes_are_sparse_with_k_active(name):
    sae = make(name).eval()
    codes = sae.encode(torch.randn(10, 16), k=4)
    assert isinstance(codes, SparseCodes)
    assert (l0_per_row(codes) <= 4).all()
    dense = to_dense(codes)
    assert dense.shape == (10, 64) and ((dense != 0).sum(1) <= 4).all()


def test_batchtopk_uses_k_times_batch_while_training_and_threshold_after():
    torch.manual_seed(0)
    sae = make("batchtopk", k=3)
    out = sae(torch.randn(50, 16))
    codes = out.codes
    assert codes.is_ragged
    assert int(codes.values.numel()) == 150 and float(l0_per_row(codes).mean()) == pytest.approx(3.0)
    assert float(sae.threshold) == pytest.approx(float(codes.values.detach().min()))
    sae.eval()
    pre = sae.pre_activations(sae.scale_in(torch.randn(8, 16)))
    dense = to_dense(sae.activate(pre))
    torch.testing.assert_close(dense, pre * (pre > sae.threshold))


def test_input_scale_is_undone_by_decode():
    sae = make("topk", input_scale=0.25).eval()
    x = torch.randn(5, 16)
    xn = sae.scale_in(x)
    torch.testing.assert_close(xn, x * 0.25)
    torch.testing.assert_close(sae.decode(sae.encode(x)), sae.decode_normalized(sae.encode_normalized(xn)) * 4)


def test_wrong_width_is_a_clear_error():
    with pytest.raises(HsaeError, match="width 16"):
        make("topk").encode(torch.randn(3, 17))


def test_dtype_of_weights_file_is_kept(tmp_path):
    sae = make("topk").half()
    sae.save(tmp_path / "h")
    loaded = hsae.load(tmp_path / "h")
    assert loaded.W_dec.dtype == torch.float16
    assert loaded.encode(torch.randn(2, 16)).values.dtype == torch.float16  # float32 input is cast


def test_unit_norm_rule():
    sae = make("topk")
    x = torch.randn(30, 16)
    sae(x).loss.backward()
    sae.remove_parallel_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5
    with torch.no_grad():
        sae.W_dec.mul_(3)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    assert not get_family("relu").unit_norm_decoder


def test_jumprelu_threshold_gets_straight_through_gradient():
    torch.manual_seed(0)
    sae = make("jumprelu", threshold_init=0.5, bandwidth=2.0)
    out = sae(torch.randn(64, 16), StepContext(step=100, total_steps=100))
    out.loss.backward()
    assert sae.log_threshold.grad is not None and sae.log_threshold.grad.abs().sum() > 0
    codes = out.codes.detach()
    assert ((codes == 0) | (codes > sae.threshold().detach())).all()


def test_penalty_controller_moves_towards_target():
    sae = make("relu", k=2)
    ctx = StepContext(step=0, total_steps=10)
    out = sae(torch.randn(32, 16), ctx)  # fresh ReLU SAE: about half the latents fire
    before = float(sae.sparsity_coef)
    sae.after_step(out, ctx)
    assert float(sae.sparsity_coef) > before


def test_load_errors(tmp_path):
    with pytest.raises(HsaeError, match="no hsae model"):
        hsae.load(tmp_path)
    (tmp_path / "config.json").write_text('{"sae": {"arch": "topk", "d_in": 4, "n_latents": 8, "k": 2}}')
    with pytest.raises(HsaeError, match="weights.safetensors"):
        hsae.load(tmp_path)


def test_bounds_from_fractions():
    from hsae.models.partition import bounds_from_fractions

    assert bounds_from_fractions(512, [0.25, 0.75]) == [0, 128, 512]
    assert bounds_from_fractions(100, [1, 1, 2]) == [0, 25, 50, 100]
    assert bounds_from_fractions(3, [0.01, 0.99]) == [0, 3]  # a group that rounds to nothing vanishes


def test_group_of_latents():
    from hsae.models.partition import group_of_latents

    assert group_of_latents([0, 2, 5]).tolist() == [0, 0, 1, 1, 1]
