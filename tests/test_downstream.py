"""Downstream fidelity: metric functions against hand-computed values, the splice hook, and the
evaluator on the real MiniLM (and a tiny random causal LM) with a tiny SAE."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hsae.eval.downstream import (
    cosine_recovered,
    downstream,
    embedding_cosines,
    kl_div_score,
    loss_recovered,
    nearest_neighbours,
    next_token_losses,
    nn_kept,
    pool_embeddings,
    self_retrieval,
)
from hsae.eval.run import EvalContext, Skip
from hsae.eval.splice import splice_mask, spliced

TEXTS = [
    "a domesticated carnivorous mammal that typically has a long snout",
    "a large natural stream of water",
    "a building for public worship",
    "the lower part of a wall",
    "a round fruit with red or green skin",
    "a four-wheeled motor vehicle",
    "a person who plays a musical instrument",
    "the season of the year between summer and winter",
    "an instrument for measuring time",
    "a flat-bottomed boat used on rivers",
    "a sweet baked food made of flour and sugar",
    "the act of moving quickly on foot",
]


def test_loss_recovered_and_scores_by_hand():
    assert loss_recovered(2.0, 2.5, 4.0) == pytest.approx(0.75)
    assert loss_recovered(2.0, 2.0, 4.0) == pytest.approx(1.0)
    assert loss_recovered(2.0, 4.0, 4.0) == pytest.approx(0.0)
    assert math.isnan(loss_recovered(2.0, 2.5, 2.0))
    assert math.isnan(loss_recovered(2.0, 1.9, 1.5))  # ablation lowers the loss: no meaningful ratio
    assert kl_div_score(0.1, 0.4) == pytest.approx(0.75)
    assert cosine_recovered(0.9, 0.5) == pytest.approx(0.8)


def test_next_token_losses_by_hand():
    # vocabulary of 2, uniform logits: every predicted position costs ln 2; the last token is padding
    logits = torch.zeros(1, 4, 2)
    ids = torch.tensor([[0, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    ce, kl, n = next_token_losses(logits, ids, mask)
    assert n == 2 and ce == pytest.approx(2 * math.log(2)) and kl == 0.0
    # a confident wrong reference: KL(ref || uniform) = sum p log(p / 0.5)
    ref = torch.tensor([[[10.0, -10.0]] * 4])
    _, kl, _ = next_token_losses(logits, ids, mask, ref)
    p = torch.softmax(torch.tensor([10.0, -10.0]), 0)
    assert kl == pytest.approx(2 * float((p * (p / 0.5).log()).sum()), rel=1e-4)


def test_pooling_and_neighbours_by_hand():
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    emb = pool_embeddings(hidden, mask)  # mean of the two real tokens (0.5, 0.5), normalised
    assert torch.allclose(emb, torch.tensor([[2**-0.5, 2**-0.5]]))
    assert torch.allclose(pool_embeddings(hidden, mask, "cls"), torch.tensor([[1.0, 0.0]]))
    clean = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert nearest_neighbours(clean, clean).tolist() == [1, 0, 3, 2]
    spliced_emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 0.2]])  # the last one moved
    assert nn_kept(clean, spliced_emb) == pytest.approx(0.75)
    assert self_retrieval(clean, spliced_emb) == pytest.approx(0.75)
    assert embedding_cosines(clean, clean).tolist() == pytest.approx([1.0] * 4)


def test_splice_replaces_only_masked_positions():
    module = nn.Identity()
    x = torch.arange(12.0).reshape(1, 4, 3)
    mask = splice_mask(torch.tensor([[1, 1, 1, 0]]), torch.tensor([[1, 0, 0, 0]]))
    assert mask.tolist() == [[False, True, True, False]]
    with spliced(module, lambda rows: -rows, mask):
        out = module(x)
    assert torch.equal(out[0, 0], x[0, 0]) and torch.equal(out[0, 3], x[0, 3])
    assert torch.equal(out[0, 1:3], -x[0, 1:3])
    assert torch.equal(module(x), x)  # the hook is gone after the context


class _Identity:
    """An 'SAE' that reconstructs perfectly."""

    d_in = 384

    def encode(self, x):
        return x

    def decode(self, c):
        return c


class _Source:
    def __init__(self, d_in=384, describe=None):
        self.d_in = d_in
        self._describe = describe or {"kind": "test"}

    def describe(self):
        return dict(self._describe)


@pytest.fixture(scope="module")
def minilm():
    from hsae.sources.hf import load_model

    return load_model(device="cpu")


def _tiny_topk(d_in=384, n_latents=64, k=8):
    from hsae.config import from_dict
    from hsae.models import get_family

    torch.manual_seed(0)
    family = get_family("topk")
    return family.from_config(
        from_dict(family.config_class, {"arch": "topk", "d_in": d_in, "n_latents": n_latents, "k": k}, what="test")
    ).eval()


def _ctx(model, minilm, **options):
    opts = {"base_model": minilm, "hook": "encoder.layer.3", "texts": TEXTS, **options}
    return EvalContext(model=model, model_dir=None, source=_Source(), x=torch.zeros(1, 384), options=opts)


def test_downstream_on_minilm(minilm):
    perfect = downstream(_ctx(_Identity(), minilm))
    assert perfect["model_kind"] == "encoder" and perfect["sentences"] == len(TEXTS)
    assert perfect["embedding_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert perfect["nn_kept"] == 1.0 and perfect["self_retrieval"] == 1.0
    assert perfect["cosine_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["embedding_cosine_zero"] < 0.99
    tiny = downstream(_ctx(_tiny_topk(), minilm))
    assert -1 <= tiny["embedding_cosine"] < perfect["embedding_cosine"]
    assert 0 <= tiny["nn_kept"] <= 1


def test_downstream_skips_without_a_base_model():
    ctx = EvalContext(model=_tiny_topk(), model_dir=None, source=_Source(), x=torch.zeros(1, 384))
    with pytest.raises(Skip, match="no base model"):
        downstream(ctx)


def test_downstream_skips_on_a_width_mismatch(minilm):
    with pytest.raises(Skip, match="width 384"):
        downstream(_ctx(_tiny_topk(d_in=32), minilm))


def test_downstream_on_a_tiny_causal_lm(minilm):
    from transformers import GPT2Config, GPT2LMHeadModel

    from hsae.sources.hf import LoadedModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=minilm.tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    lm = GPT2LMHeadModel(config).eval().requires_grad_(False)
    loaded = LoadedModel(lm, minilm.tokenizer, "tiny-gpt2", None, None, "GPT2LMHeadModel")

    class Identity32(_Identity):
        d_in = 32

    opts = {"base_model": loaded, "hook": "transformer.h.0", "texts": TEXTS}
    perfect = downstream(EvalContext(Identity32(), None, _Source(32), torch.zeros(1, 32), dict(opts)))
    assert perfect["model_kind"] == "causal_lm"
    assert perfect["ce_sae"] == pytest.approx(perfect["ce_clean"], abs=1e-5)
    assert perfect["kl_sae"] == pytest.approx(0.0, abs=1e-5)
    assert perfect["ce_zero"] != pytest.approx(perfect["ce_clean"])
    assert perfect["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    tiny = downstream(EvalContext(_tiny_topk(32, 16, 4), None, _Source(32), torch.zeros(1, 32), dict(opts)))
    assert tiny["kl_sae"] > 0


def test_loss_recovered_is_flagged_when_zero_ablation_does_not_hurt(minilm, monkeypatch):
    """On a model whose loss does not rise when the hook is zeroed (a random model, say), loss
    recovered is no number but a note saying why."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import hsae.eval.downstream as downstream_module
    from hsae.sources.hf import LoadedModel

    config = GPT2Config(vocab_size=minilm.tokenizer.vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    loaded = LoadedModel(GPT2LMHeadModel(config).eval(), minilm.tokenizer, "tiny-gpt2-b", None, None, "GPT2LMHeadModel")
    # clean 3.0, zero-ablated 2.9 (lower), the SAE's splice 3.1
    monkeypatch.setattr(
        downstream_module,
        "lm_losses",
        lambda base, texts, replace: (3.0, 3.1 if replace.__name__ != "zero_replacement" else 2.9, 0.1),
    )
    opts = {"base_model": loaded, "hook": "transformer.h.0", "texts": TEXTS}
    result = downstream(EvalContext(_tiny_topk(32, 16, 4), None, _Source(32), torch.zeros(1, 32), dict(opts)))
    assert math.isnan(result["loss_recovered"])
    assert "meaningless" in result["loss_recovered_note"] and "2.9" in result["loss_recovered_note"]
