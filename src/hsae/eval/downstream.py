"""Downstream fidelity: what the base model loses when the SAE's reconstruction replaces its
activations at the hook.

The reconstruction `sae.decode(sae.encode(h))` replaces the hooked module's output `h` at every
real, non-special token (the positions harvesting keeps; see `hsae.eval.splice`), and the rest of
the network runs on. Two baselines frame the number: the clean run (nothing replaced) and the
zero-ablated run (the same positions set to zero).

Causal language models (SAEBench's "model behavior preservation" metrics):
- `ce_clean`, `ce_sae`, `ce_zero`: mean next-token cross-entropy (nats) over every predicted
  position whose target is a real token, for the three runs.
- `loss_recovered` = (ce_zero - ce_sae) / (ce_zero - ce_clean): 1 when the splice costs nothing,
  0 when it is as bad as deleting the activations (NaN when ce_zero == ce_clean).
- `kl_sae`, `kl_zero`: mean KL(clean || spliced) of the next-token distributions over the same
  positions; `kl_div_score` = (kl_zero - kl_sae) / kl_zero.

Encoders such as the sentence-transformer all-MiniLM-L6-v2 (no language-model head):
- A sentence embedding is the model's final hidden states pooled as its sentence-transformers
  folder says (`1_Pooling/config.json`: mean over the attention mask — CLS and SEP included, as
  sentence-transformers does — or the CLS token), then L2-normalised.
- `embedding_cosine`: mean over sentences of cos(e_clean(s), e_sae(s)); `embedding_cosine_zero`
  the same for the zero-ablated run; `cosine_recovered` = (cos_sae - cos_zero) / (1 - cos_zero),
  the encoder analogue of loss recovered.
- `nn_kept`: the held-out sentences form a retrieval index of clean embeddings. For each sentence
  s, its nearest neighbour among the *other* sentences is found once with the clean query e_clean(s)
  and once with the spliced query e_sae(s); nn_kept is the fraction of sentences for which the two
  agree (cosine similarity, the index stays clean). `nn_kept_zero` the same for zero ablation.
- `self_retrieval`: the fraction of sentences whose spliced query's nearest clean embedding
  (itself included) is its own clean embedding.

Held-out text: `options["texts"]` (a list of strings), else `options["corpus"]` ('wordnet' or a
path, as `hsae harvest --corpus`), else the corpus the SAE's training data was harvested from. When
that corpus is the training corpus and the training data is a store, the documents the store used
(doc ids up to its largest) are skipped, so the sentences are held out; the result's `heldout` says
whether they are known to be (False when the training corpus is not recorded). `options["sentences"]`
(default 256) sentences are used; fewer than `MIN_SENTENCES` -> skipped.
"""

from __future__ import annotations

import hashlib
import json
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hsae.errors import HsaeError
from hsae.eval.run import EvalContext, Skip, evaluator
from hsae.eval.splice import BaseModel, base_model_for, run_model, sae_replacement, zero_replacement

DEFAULT_SENTENCES = 256
MIN_SENTENCES = 8
MAX_TOKENS = 128  # per sentence: glosses are short, and CPU evaluation should stay quick
BATCH = 64

# Clean and zero-ablated results do not depend on the SAE: computed once per (model, hook, texts).
_BASELINES: dict[str, Any] = {}


# ----- metric functions (tensors in, numbers out) --------------------------------------------------
def loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """(ce_zero - ce_sae) / (ce_zero - ce_clean); NaN when the zero ablation costs nothing or even
    lowers the loss (e.g. a random model): the ratio then measures nothing."""
    denom = ce_zero - ce_clean
    return float("nan") if denom < 1e-12 else (ce_zero - ce_sae) / denom


def kl_div_score(kl_sae: float, kl_zero: float) -> float:
    """(kl_zero - kl_sae) / kl_zero (SAEBench); NaN when kl_zero is 0."""
    return float("nan") if abs(kl_zero) < 1e-12 else (kl_zero - kl_sae) / kl_zero


def next_token_losses(
    logits: Tensor, input_ids: Tensor, attention_mask: Tensor, ref_logits: Tensor | None = None
) -> tuple[float, float, int]:
    """Summed next-token cross-entropy, summed KL(ref || logits) (0 without ref) and the number of
    predicted positions: position t predicts token t+1 wherever token t+1 is real."""
    pred = logits[:, :-1].float()
    target = input_ids[:, 1:]
    valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    logp = F.log_softmax(pred, dim=-1)
    ce = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    kl = torch.zeros_like(ce)
    if ref_logits is not None:
        ref = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
        kl = (ref.exp() * (ref - logp)).sum(-1)
    return float(ce[valid].sum()), float(kl[valid].sum()), int(valid.sum())


def pool_embeddings(hidden: Tensor, attention_mask: Tensor, mode: str = "mean") -> Tensor:
    """Sentence embeddings (n, d), L2-normalised: masked mean of the hidden states, or CLS."""
    if mode == "cls":
        pooled = hidden[:, 0]
    elif mode == "mean":
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    else:
        raise HsaeError(f"unknown pooling {mode!r} (mean or cls)")
    return F.normalize(pooled.float(), dim=-1)


def embedding_cosines(a: Tensor, b: Tensor) -> Tensor:
    """(n,) cosine of each row of a with the same row of b."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def nearest_neighbours(queries: Tensor, index: Tensor, exclude_self: bool = True) -> Tensor:
    """(n,) index of each query's most cosine-similar row of `index` (row i of `index` is query i's
    own sentence, left out when `exclude_self`)."""
    sims = F.normalize(queries.float(), dim=-1) @ F.normalize(index.float(), dim=-1).T
    if exclude_self:
        sims.fill_diagonal_(float("-inf"))
    return sims.argmax(dim=1)


def nn_kept(clean: Tensor, spliced: Tensor) -> float:
    """Fraction of sentences whose nearest other sentence in the clean index is the same for the
    clean and the spliced query."""
    if clean.shape[0] < 2:
        raise HsaeError("nearest neighbours need at least two sentences")
    return float((nearest_neighbours(clean, clean) == nearest_neighbours(spliced, clean)).float().mean())


def self_retrieval(clean: Tensor, spliced: Tensor) -> float:
    """Fraction of spliced queries whose nearest clean embedding (self included) is their own."""
    hits = nearest_neighbours(spliced, clean, exclude_self=False) == torch.arange(clean.shape[0])
    return float(hits.float().mean())


def cosine_recovered(cos_sae: float, cos_zero: float) -> float:
    """(cos_sae - cos_zero) / (1 - cos_zero); NaN when zero ablation leaves embeddings unchanged."""
    denom = 1.0 - cos_zero
    return float("nan") if abs(denom) < 1e-12 else (cos_sae - cos_zero) / denom


# ----- held-out text -------------------------------------------------------------------------------
def _store_documents_used(record: dict[str, Any]) -> int | None:
    """Documents of the corpus a store's rows came from (its largest doc id + 1), if readable."""
    if record.get("kind") != "store" or not record.get("path"):
        return None
    try:
        from hsae.store import ActivationStore

        store = ActivationStore.open(record["path"], hook=record.get("hook"))
        return int(store.read_shard(len(store.shards) - 1)["doc_ids"].max()) + 1
    except (HsaeError, OSError, ValueError):
        return None


def heldout_texts(ctx: EvalContext, base: BaseModel, n: int) -> tuple[list[str], dict[str, Any]]:
    """Up to n held-out sentences and a description of where they came from (see module docstring)."""
    if ctx.options.get("texts") is not None:
        texts = [t for t in ctx.options["texts"] if isinstance(t, str) and t.strip()][:n]
        return texts, {"text_source": "given", "heldout": True}
    from hsae.sources.text import file_corpus, open_corpus, wordnet_available, wordnet_corpus

    record = base.record
    trained_on = record.get("corpus") or {}
    skip, heldout = 0, False
    try:
        if ctx.options.get("corpus"):
            corpus = open_corpus(str(ctx.options["corpus"]))
        elif trained_on.get("kind") == "wordnet":
            corpus = wordnet_corpus(trained_on.get("pos"))
        elif trained_on.get("kind") in ("files", "hf_dataset") and trained_on.get("path"):
            corpus = file_corpus(trained_on["path"], text_field=trained_on.get("text_field", "text"))
        elif wordnet_available():
            corpus = wordnet_corpus()
        else:
            raise Skip(
                "no held-out text: the training data names no corpus and WordNet is not installed; "
                "pass the corpus or texts option"
            )
    except HsaeError as err:
        raise Skip(f"cannot open the held-out corpus: {err}") from None
    if corpus.describe() == trained_on:
        used = _store_documents_used(record)
        if used is not None:
            skip, heldout = used, True
    elif trained_on.get("kind") in ("wordnet", "files", "hf_dataset"):
        heldout = True  # a known training corpus, and this is another one
    # else: the training corpus is unknown (in-memory texts), so held-out cannot be promised
    texts = [t for t in islice(corpus, skip, skip + n) if t.strip()]
    info = {"text_source": corpus.describe().get("kind", "corpus"), "first_document": skip, "heldout": heldout}
    return texts, info


# ----- running the base model ----------------------------------------------------------------------
def _pooling_mode(base: BaseModel) -> str:
    path = base.loaded.path
    if path:
        config = Path(path) / "1_Pooling" / "config.json"
        if config.is_file():
            try:
                pooling = json.loads(config.read_text())
            except json.JSONDecodeError:
                pooling = {}
            if pooling.get("pooling_mode_cls_token"):
                return "cls"
    return "mean"


def _batches(base: BaseModel, texts: list[str]):
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding
    for start in range(0, len(order), BATCH):
        idx = order[start : start + BATCH]
        yield idx, base.tokenize([texts[i] for i in idx], MAX_TOKENS)


def sentence_embeddings(base: BaseModel, texts: list[str], replace=None) -> Tensor:
    """(n, d) normalised sentence embeddings of `texts`, optionally with a splice at the hook."""
    mode = _pooling_mode(base)
    out = torch.empty(0)
    for idx, inputs in _batches(base, texts):
        hidden = run_model(base, inputs, replace).last_hidden_state
        emb = pool_embeddings(hidden.cpu(), inputs["attention_mask"], mode)
        if out.numel() == 0:
            out = torch.empty(len(texts), emb.shape[1])
        out[idx] = emb
    return out


def lm_losses(base: BaseModel, texts: list[str], replace) -> tuple[float, float, float]:
    """(mean CE clean, mean CE spliced, mean KL(clean || spliced)) over the texts' predicted positions.
    The clean logits are recomputed batch by batch rather than kept (a vocabulary-sized tensor per
    token would not fit in memory for real models)."""
    ce_clean = ce_spliced = kl_sum = 0.0
    count = 0
    for _, inputs in _batches(base, texts):
        ref = run_model(base, inputs).logits.float().cpu()
        logits = run_model(base, inputs, replace).logits.float().cpu()
        ce0, _, _ = next_token_losses(ref, inputs["input_ids"], inputs["attention_mask"])
        ce, kl, n = next_token_losses(logits, inputs["input_ids"], inputs["attention_mask"], ref)
        ce_clean, ce_spliced, kl_sum, count = ce_clean + ce0, ce_spliced + ce, kl_sum + kl, count + n
    if count == 0:
        raise Skip("the held-out texts give no next-token predictions (every text is one token)")
    return ce_clean / count, ce_spliced / count, kl_sum / count


def _texts_key(base: BaseModel, texts: list[str]) -> str:
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:16]
    return f"{base.key}|{digest}"


@evaluator("downstream")
def downstream(ctx: EvalContext) -> dict[str, Any]:
    base = base_model_for(ctx)
    n = int(ctx.options.get("sentences", DEFAULT_SENTENCES))
    texts, info = heldout_texts(ctx, base, n)
    if len(texts) < MIN_SENTENCES:
        raise Skip(f"only {len(texts)} held-out sentences (need {MIN_SENTENCES}); pass more with the corpus option")
    sae = sae_replacement(ctx.model)
    key = _texts_key(base, texts)
    result: dict[str, Any] = {"sentences": len(texts), **info}
    if base.is_causal_lm():
        if key not in _BASELINES:
            _BASELINES[key] = lm_losses(base, texts, zero_replacement)
        ce_clean, ce_zero, kl_zero = _BASELINES[key]
        _, ce_sae, kl_sae = lm_losses(base, texts, sae)
        result.update(
            {
                "model_kind": "causal_lm",
                "ce_clean": ce_clean,
                "ce_sae": ce_sae,
                "ce_zero": ce_zero,
                "loss_recovered": loss_recovered(ce_clean, ce_sae, ce_zero),
                **(
                    {}
                    if ce_zero > ce_clean
                    else {
                        "loss_recovered_note": f"meaningless here: the zero-ablated loss ({ce_zero:.4g}) is not above "
                        f"the clean loss ({ce_clean:.4g}), so the hook does not matter to this model's loss"
                    }
                ),
                "kl_sae": kl_sae,
                "kl_zero": kl_zero,
                "kl_div_score": kl_div_score(kl_sae, kl_zero),
            }
        )
        return result
    if key not in _BASELINES:
        clean = sentence_embeddings(base, texts)
        zero = sentence_embeddings(base, texts, zero_replacement)
        _BASELINES[key] = (clean, zero)
    clean, zero = _BASELINES[key]
    spliced = sentence_embeddings(base, texts, sae)
    cos_sae = float(embedding_cosines(clean, spliced).mean())
    cos_zero = float(embedding_cosines(clean, zero).mean())
    result.update(
        {
            "model_kind": "encoder",
            "pooling": _pooling_mode(base),
            "embedding_cosine": cos_sae,
            "embedding_cosine_min": float(embedding_cosines(clean, spliced).min()),
            "embedding_cosine_zero": cos_zero,
            "cosine_recovered": cosine_recovered(cos_sae, cos_zero),
            "nn_kept": nn_kept(clean, spliced),
            "nn_kept_zero": nn_kept(clean, zero),
            "self_retrieval": self_retrieval(clean, spliced),
        }
    )
    return result


__all__ = [
    "loss_recovered",
    "kl_div_score",
    "next_token_losses",
    "pool_embeddings",
    "embedding_cosines",
    "nearest_neighbours",
    "nn_kept",
    "self_retrieval",
    "cosine_recovered",
    "heldout_texts",
    "sentence_embeddings",
    "downstream",
]
