"""First-letter absorption: the scoring rule on hand-built tokens, probes and k-sparse probing on
separable toy data, and the evaluator on the real MiniLM with a tiny SAE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hsae.eval.absorption import absorption, absorption_scores, f1_scores, main_latents, word_positions
from hsae.eval.run import EvalContext, Skip


def test_absorption_scores_by_hand():
    # 3 latents; latent 0 is the letter's main latent; latent 1 is aligned with the probe (cos 0.9),
    # latent 2 nearly orthogonal (cos 0.01). Four probe true positives with P = x . p = 1.
    probe_cos = torch.tensor([0.95, 0.9, 0.01])
    codes = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # main fires: no absorption
            [0.0, 0.8, 0.0],  # main silent, latent 1 carries 0.72 >= 0.4: full absorption, fraction 1
            [0.0, 0.0, 5.0],  # main silent, only an unaligned latent: not absorption
            [0.5, 0.5, 0.0],  # partial: main carries 0.475, latent 1 0.45 -> fraction 0.45 / (0.45 + 0.475)
        ]
    )
    latent_proj = codes * probe_cos  # unit decoder rows, input_scale 1
    act_proj = torch.ones(4)
    out = absorption_scores(act_proj, codes, latent_proj, probe_cos, [0])
    assert out.main_silent.tolist() == [False, True, True, False]
    # token 2: the top-projecting latent is latent 2 (0.05) with cosine 0.01 < 0.025: not full absorption
    assert out.full.tolist() == [False, True, False, False]
    expected = [0.0, 1.0, 0.0, 0.45 / (0.45 + 0.475)]
    assert out.fraction.tolist() == pytest.approx(expected)


def test_absorption_needs_a_positive_probe_projection():
    codes = torch.tensor([[0.0, 1.0]])
    out = absorption_scores(torch.tensor([-1.0]), codes, codes * 0.9, torch.tensor([0.9, 0.9]), [0])
    assert out.full.tolist() == [False] and out.fraction.tolist() == [0.0]


def test_f1_scores_by_hand():
    pred = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 1]]).bool()
    truth = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]]).bool()
    # column 0: tp 1, fp 1, fn 1 -> 0.5; column 1: tp 1, fn 1 -> 2/3
    assert f1_scores(pred, truth).tolist() == pytest.approx([0.5, 2 / 3])


def test_k_sparse_probing_finds_the_indicator_latents():
    torch.manual_seed(0)
    n, m = 400, 12
    labels = torch.randint(0, 2, (n,))
    y = F.one_hot(labels, 2).bool()
    codes = torch.rand(n, m) * (torch.rand(n, m) < 0.2)  # noise latents
    codes[:, 3] = (labels == 0).float() * (1 + torch.rand(n))  # letter 0's latent
    codes[:, 7] = (labels == 1).float() * (1 + torch.rand(n))  # letter 1's latent
    mains, f1 = main_latents(codes[:300], y[:300], codes[300:], y[300:], max_k=3, steps=200)
    assert mains == [[3], [7]]
    assert f1[:, 0].tolist() == pytest.approx([1.0, 1.0])


@pytest.fixture(scope="module")
def minilm():
    from hsae.sources.hf import load_model

    return load_model(device="cpu")


def test_word_positions_keep_single_token_words(minilm):
    words, positions = word_positions(minilm.tokenizer, ["dog", "house", "xqzvbwords"])
    assert words == ["dog", "house"] and positions == [1, 1]  # after [CLS]


class _Source:
    d_in = 384

    def describe(self):
        return {"kind": "test"}


def test_absorption_evaluator_on_minilm(minilm):
    from hsae.config import from_dict
    from hsae.models import get_family

    torch.manual_seed(0)
    family = get_family("topk")
    sae = family.from_config(
        from_dict(family.config_class, {"arch": "topk", "d_in": 384, "n_latents": 128, "k": 8}, what="test")
    ).eval()
    options = {
        "base_model": minilm,
        "hook": "encoder.layer.3",
        "absorption_words": 400,
        "absorption_min_tokens": 1,
        "absorption_min_probe_f1": 0.0,
        "absorption_steps": 60,
        "absorption_max_k": 2,
    }
    result = absorption(EvalContext(sae, None, _Source(), torch.zeros(1, 384), options))
    assert result["words"] == 400 and result["letters_evaluated"] >= 3
    assert 0 <= result["mean_full_absorption"] <= 1 and 0 <= result["mean_absorption_fraction"] <= 1
    row = result["per_letter"][0]
    assert {"letter", "probe_true_positives", "main_latents", "full_absorption_rate"} <= set(row)
    strict = dict(options, absorption_min_probe_f1=1.01)
    with pytest.raises(Skip, match="letters"):
        absorption(EvalContext(sae, None, _Source(), torch.zeros(1, 384), strict))
