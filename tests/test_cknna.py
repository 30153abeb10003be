"""CKNNA (hsae.eval.cknna) on a case worked by hand, its limits, and one model evaluated over k
(hsae.eval.over_k and the `over_k` evaluator)."""

from __future__ import annotations

import pytest
import torch

from hsae.config import from_dict
from hsae.errors import HsaeError
from hsae.eval.cknna import EPS, batched_cknna, cknna, hsic_unbiased, neighbour_mask
from hsae.eval.core import fvu
from hsae.eval.over_k import doubling_ks, evaluate_over_k
from hsae.eval.over_k_evaluator import over_k
from hsae.eval.run import EvalContext, Skip
from hsae.models import get_family


def test_cknna_of_a_case_worked_by_hand():
    """Four points on a line, A = (1, 2, 3, 4) and B = A reversed, 2 neighbours, linear kernels
    K_ij = i j and L_ij = (5 - i)(5 - j).
    Neighbours (largest kernel value, self excluded): under K rows 1..4 pick {3,4} {3,4} {2,4} {2,3};
    under L {2,3} {1,3} {1,2} {1,2}; both: {3} {3} {2} {2}.
    HSIC(M K, M L): the masked kernels hold (1,3) (2,3) (3,2) (4,2) = 3 6 6 8 and 8 6 6 3;
    tr(X Y) = sum X_ij Y_ji = 6*6 + 6*6 = 72; sums 23 * 23 / 6; 1'XY1 = (0,14,9,0).(8,6,6,3) = 138;
    (72 + 529/6 - 2 * 138 / 2) / 4 = 133/24.
    HSIC(M_K K, M_K K): X = K on {(1,3),(1,4),(2,3),(2,4),(3,2),(3,4),(4,2),(4,3)}: tr(XX) = 2 (36 + 64
    + 144) = 488; 1'X1 = 59; column sums (0,14,21,24) . row sums (7,14,18,20) = 1054;
    (488 + 59*59/6 - 1054) / 4 = 85/24, and the same for L (its mirror image).
    CKNNA = (133/24) / (85/24 + eps) = 133/85 (the unbiased estimator's ratio is not bounded by 1)."""
    A = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    B = A.flip(0)
    K, L = (A @ A.T).double(), (B @ B.T).double()
    mask_k, mask_l = neighbour_mask(K, 2), neighbour_mask(L, 2)
    assert mask_k.nonzero().tolist() == [[0, 2], [0, 3], [1, 2], [1, 3], [2, 1], [2, 3], [3, 1], [3, 2]]
    both = mask_k * mask_l
    assert both.nonzero().tolist() == [[0, 2], [1, 2], [2, 1], [3, 1]]
    assert float(hsic_unbiased(both * K, both * L)) == pytest.approx(133 / 24, rel=1e-12)
    assert float(hsic_unbiased(mask_k * K, mask_k * K)) == pytest.approx(85 / 24, rel=1e-12)
    assert cknna(A, B, neighbours=2) == pytest.approx((133 / 24) / (85 / 24 + EPS), rel=1e-12)


def test_cknna_is_one_for_the_same_representation_and_small_for_unrelated_ones():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 20, generator=g)
    assert cknna(a, a) == pytest.approx(1.0, abs=1e-5)
    assert cknna(a, 3 * a) == pytest.approx(1.0, abs=1e-5)  # linear kernels: the scale cancels
    assert abs(cknna(a, torch.randn(300, 8, generator=g))) < 0.1
    noisy = a @ torch.randn(20, 30, generator=g) + 0.5 * torch.randn(300, 30, generator=g)
    assert 0.2 < cknna(a, noisy) < 0.9


def test_batched_cknna_averages_whole_batches_and_drops_a_tail_too_small_for_neighbourhoods():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(205, 6, generator=g), torch.randn(205, 6, generator=g)
    expect = (cknna(a[:100], b[:100]) + cknna(a[100:200], b[100:200])) / 2  # the last 5 rows are left out
    assert batched_cknna(a, b, batch=100) == pytest.approx(expect, rel=1e-12)


def test_cknna_refuses_what_it_cannot_compute():
    with pytest.raises(HsaeError, match="same items"):
        cknna(torch.randn(10, 3), torch.randn(11, 3))
    with pytest.raises(HsaeError, match="neighbours < rows"):
        cknna(torch.randn(10, 3), torch.randn(10, 3), neighbours=10)
    with pytest.raises(HsaeError, match="at least 4 rows"):
        hsic_unbiased(torch.eye(3), torch.eye(3))


def _msae():
    cfg = from_dict(get_family("msae").config_class, dict(arch="msae", d_in=12, n_latents=48, k=8))
    torch.manual_seed(0)
    return get_family("msae")(cfg).eval()


def test_evaluate_over_k_reads_one_model_at_every_k():
    model = _msae()
    x = torch.randn(134, 12, generator=torch.Generator().manual_seed(2))
    rows = evaluate_over_k(model, x, [48, 4, 16], batch_size=64)
    assert [r["k"] for r in rows] == [4, 16, 48]
    with torch.no_grad():
        x_hat = model.decode(model.encode(x, k=16))
    assert rows[1]["fvu"] == pytest.approx(fvu(x, x_hat), rel=1e-9)
    assert rows[1]["l0"] <= 16 and rows[1]["zero_fraction"] == pytest.approx(1 - rows[1]["l0"] / 48)
    # two whole batches of 64 score CKNNA; the tail of 6 rows (<= 10 neighbours) counts in FVU only
    expect = (cknna(x[:64], x_hat[:64]) + cknna(x[64:128], x_hat[64:128])) / 2
    assert rows[1]["cknna_recon"] == pytest.approx(expect, rel=1e-9)
    with torch.no_grad():  # k = the width: the ReLU code, every positive pre-activation
        positive = (model.pre_activations(model.scale_in(x)) > 0).float()
    assert rows[2]["l0"] == pytest.approx(float(positive.sum(1).mean()))
    assert rows[2]["dead_fraction"] == pytest.approx(float((positive.sum(0) == 0).float().mean()))


def test_the_over_k_evaluator_runs_for_nested_families_and_explains_when_it_skips():
    run = over_k
    x = torch.randn(40, 12)
    result = run(EvalContext(model=_msae(), model_dir=None, source=None, x=x))
    assert doubling_ks(48) == [16, 32, 48]
    assert result["ks"] == [1, 2, 4, 8, 16, 32, 48]  # its nested k (default for k = 8), then the paper's
    assert {"fvu@16", "cknna_codes@48", "zero_fraction@32"} <= set(result)
    topk = get_family("topk")(from_dict(get_family("topk").config_class, dict(arch="topk", d_in=12, n_latents=48)))
    with pytest.raises(Skip, match="-o ks="):
        run(EvalContext(model=topk, model_dir=None, source=None, x=x))
    asked = run(EvalContext(model=topk, model_dir=None, source=None, x=x, options={"ks": "2,8"}))
    assert asked["ks"] == [2, 8]
    with pytest.raises(HsaeError, match="between 1 and the model's 48 latents"):
        run(EvalContext(model=topk, model_dir=None, source=None, x=x, options={"ks": "0,8"}))
