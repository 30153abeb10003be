"""Core metrics against values computed by hand on tiny inputs."""

import pytest
import torch

from hsae.eval.core import CoreAccumulator, fvu, mean_cosine, mse
from hsae.models.codes import SparseCodes


def test_fvu_mse_cosine_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0): total variance 1 + 1 = 2
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0]])  # squared error 1
    assert fvu(x, x_hat) == pytest.approx(0.5)
    assert mse(x, x_hat) == pytest.approx(0.25)
    assert mean_cosine(x, x_hat) == pytest.approx((1 / 2**0.5 + 1) / 2)


def test_accumulator_over_batches_equals_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 2.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0], [2.0, 0.0]])
    codes = SparseCodes(torch.tensor([[0, 1], [0, 2], [1, 3]]), torch.tensor([[1.0, 0.0], [2.0, 1.0], [1.0, 1.0]]), 5)
    acc = CoreAccumulator(5)
    acc.update(x[:2], x_hat[:2], SparseCodes(codes.indices[:2], codes.values[:2], 5))
    acc.update(x[2:], x_hat[2:], SparseCodes(codes.indices[2:], codes.values[2:], 5))
    r = acc.result()
    # mean (2, 2/3); total variance = (1+0+1) + (4/9 + 4/9 + 16/9) = 2 + 24/9; squared error 1 + 4 = 5
    assert r["fvu"] == pytest.approx(5 / (2 + 24 / 9))
    assert r["mse"] == pytest.approx(5 / 6)
    assert r["l0"] == pytest.approx((1 + 2 + 2) / 3)
    assert r["l0_histogram"] == [0, 1, 2]
    # latent 0 fires in 2 rows, 1 in 1, 2 in 1, 3 in 1, 4 never: 1 dead; >10% of 3 tokens = all that fired
    assert r["dead_latents"] == 1 and r["dead_fraction"] == pytest.approx(0.2)
    assert r["dense_latents"] == 4
    assert r["density"] == pytest.approx([2 / 3, 1 / 3, 1 / 3, 1 / 3, 0.0])
