"""Feature absorption on the first-letter task, after SAEBench (Chanin et al., "A is for Absorption",
arXiv 2409.14507; SAEBench, arXiv 2503.09532), for the base model the SAE was trained on.

Data. Words: WordNet lemmas that are lower-case alphabetic (2+ letters) and a single token of the
base model's tokenizer inside the template; without WordNet, the tokenizer's own alphabetic
vocabulary (the result's `vocabulary` says which). Each word is placed in SAEBench's template
"{word} has the first letter:" and the activation at the hook is read at the word's token. A seeded
sample of `absorption_words` words (default 6000) is split 80/20 into probe-training and test words.

1. Ground-truth probes: 26 one-vs-rest logistic-regression probes ("starts with letter L") on the
   model activations (SAEBench's `train_multi_probe`: BCE with positive weight n_neg/n_pos, Adam,
   learning rate decaying exponentially from 1e-2 to 1e-5, weight decay 1e-4; full batch here).
   A test word is a *probe true positive* for L when it starts with L and the probe's logit is > 0.
   The probe direction p_L is the unit vector of its weights (inputs are centred and scaled by one
   scalar before training, which leaves directions unchanged).
2. Main latents (SAEBench's k-sparse probing): an L1-regularised one-vs-rest probe on the SAE's
   codes (L1 weight 0.01) ranks latents per letter by weight; for k = 1..`absorption_max_k`
   (default 5; SAEBench uses 10) a logistic probe on the top-k latents is trained and its F1 on the
   test words measured. The main latents are the top-k set for the largest k reached while each
   step raises F1 by more than 0.03 (k = 1 always counts) — SAEBench's feature-splitting rule.
3. Absorption, per probe true positive of letter L, with a_j the SAE code of latent j (normalised
   units), proj_j = a_j * (W_dec[j] . p_L) / input_scale (latent j's share of the reconstruction
   projected on p_L, in raw units, since decode(codes) = b_dec + codes @ W_dec / input_scale) and
   P = x . p_L (the activation's projection on the probe):
   - full absorption (SAEBench `is_full_absorption`): every main latent is silent (|a_j| < 1e-8),
     the top-projecting latent j* = argmax_j proj_j has cos(W_dec[j*], p_L) >= 0.025, P > 0 and
     proj_j* >= 0.4 * P: another latent carries the letter instead.
   - absorption fraction (SAEBench, after Demian Till): M = sum of proj over the main latents, A =
     sum of the (up to 3) largest positive proj among other latents with cosine >= 0.1. It is 0 when
     M >= P or A < 0.4 * P, 1 when M <= 0, else min(A, P - M) / (min(A, P - M) + M).
   Per letter: `full_absorption_rate` = full absorptions / probe true positives (SAEBench's
   denominator), `absorption_fraction` = mean fraction over the true positives, `main_silent_rate`
   = true positives with every main latent silent / true positives, and `absorbed_when_silent` =
   full absorptions / those silent cases (how often, when the main latents fail, another absorbs).
   The headline `mean_full_absorption` and `mean_absorption_fraction` average the letters.

Letters with fewer than `absorption_min_tokens` (default 10) probe true positives, or whose probe
F1 on the test words is below `absorption_min_probe_f1`, are skipped; with fewer than 3 letters
left the section is skipped.

Simplifications against SAEBench, said plainly: one template without in-context examples (an
encoder such as MiniLM reads the whole template at once, so ICL prompts buy little); WordNet lemmas
rather than the whole alphabetic vocabulary; full-batch training with fixed step counts; max k 5.
The probe F1 gate defaults to 0.2, not SAEBench's 0.6: first letters are only weakly linear in a
small encoder's middle layer (all-MiniLM-L6-v2 at encoder.layer.3: one-vs-rest probe F1 about
0.05-0.4, 26-way accuracy about 0.3), and with 0.6 nothing would be measured. Read `mean_probe_f1`
beside the absorption numbers; pass absorption_min_probe_f1=0.6 for SAEBench's gate.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hsae.eval.run import EvalContext, Skip, evaluator
from hsae.eval.splice import BaseModel, base_model_for
from hsae.models.codes import Codes, as_sparse, encode_rows

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = "{word} has the first letter:"
DEFAULT_WORDS = 6000
DEFAULT_MIN_TOKENS = 10
DEFAULT_MIN_PROBE_F1 = 0.2
DEFAULT_MAX_K = 5
MIN_LETTERS = 3
F1_JUMP = 0.03
FULL_COS = 0.025
FRACTION_COS = 0.1
PROPORTION = 0.4
MAX_ABSORBERS = 3
EPS = 1e-8

# Words, activations and ground-truth probes do not depend on the SAE: one per (model, hook, words).
_PROBE_DATA: dict[str, LetterData] = {}


# ----- metric functions ----------------------------------------------------------------------------
@dataclass
class TokenAbsorption:
    main_silent: Tensor  # (n,) bool: every main latent silent
    full: Tensor  # (n,) bool: full absorption
    fraction: Tensor  # (n,) float: absorption fraction


def absorption_scores(
    act_proj: Tensor,
    codes: Tensor,
    latent_proj: Tensor,
    probe_cos: Tensor,
    main: list[int],
    *,
    full_cos: float = FULL_COS,
    fraction_cos: float = FRACTION_COS,
    proportion: float = PROPORTION,
    max_absorbers: int = MAX_ABSORBERS,
    eps: float = EPS,
) -> TokenAbsorption:
    """Absorption of one letter on its probe true positives (see the module docstring, step 3).

    act_proj (n,): x . p; codes (n, m): SAE codes; latent_proj (n, m): proj_j per token;
    probe_cos (m,): cos(W_dec[j], p); main: the letter's main latents.
    """
    n, m = codes.shape
    main_t = torch.as_tensor(main, dtype=torch.long)
    main_silent = (codes[:, main_t].abs() < eps).all(dim=1) if len(main) else torch.ones(n, dtype=torch.bool)
    top_proj, top = latent_proj.max(dim=1)
    full = main_silent & (probe_cos[top] >= full_cos) & (act_proj > 0)
    full &= top_proj >= proportion * act_proj
    # absorption fraction
    main_proj = latent_proj[:, main_t].sum(1) if len(main) else torch.zeros(n)
    candidates = torch.ones(m, dtype=torch.bool)
    candidates[main_t] = False
    candidates &= probe_cos >= fraction_cos
    other = torch.where(candidates[None, :] & (latent_proj > 0), latent_proj, torch.zeros_like(latent_proj))
    absorbed = other.topk(min(max_absorbers, m), dim=1).values.sum(1) if m else torch.zeros(n)
    fraction = torch.zeros(n)
    for i in range(n):
        p, mp, a = float(act_proj[i]), float(main_proj[i]), float(absorbed[i])
        if mp >= p or a < proportion * p:
            continue
        if mp <= 0:
            fraction[i] = 1.0
        else:
            share = min(a, p - mp)
            fraction[i] = min(1.0, max(0.0, share / (share + mp)))
    return TokenAbsorption(main_silent, full, fraction)


def f1_scores(pred: Tensor, truth: Tensor) -> Tensor:
    """Per-column F1 of boolean predictions (n, c) against boolean truth (n, c); 0 where undefined."""
    pred, truth = pred.bool(), truth.bool()
    tp = (pred & truth).sum(0).float()
    denom = pred.sum(0).float() + truth.sum(0).float()
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))


def train_logistic(
    x: Tensor,
    y: Tensor,
    *,
    steps: int = 300,
    lr: float = 1e-2,
    end_lr: float = 1e-5,
    weight_decay: float = 1e-4,
    l1: float = 0.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """One-vs-rest logistic regression, full batch: x (n, d) dense or sparse, y (n, c) in {0, 1}.
    BCE with positive weight n_neg / n_pos per column, Adam with exponential decay lr -> end_lr,
    L2 `weight_decay`, and `l1` * mean over columns of sum |w|. Returns W (c, d), b (c,)."""
    torch.manual_seed(seed)
    n, d = x.shape
    c = y.shape[1]
    y = y.float()
    pos = y.sum(0)
    pos_weight = ((n - pos) / pos.clamp_min(1)).clamp_max(1e4)
    W = torch.zeros(d, c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=lr, weight_decay=weight_decay)
    gamma = math.exp(math.log(end_lr / lr) / max(1, steps))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
    sparse = x.is_sparse
    with torch.enable_grad():
        for _ in range(steps):
            logits = (torch.sparse.mm(x, W) if sparse else x @ W) + b
            loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
            if l1:
                loss = loss + l1 * W.abs().sum(0).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return W.detach().T.contiguous(), b.detach()


def main_latents(
    codes_train: Codes,
    y_train: Tensor,
    codes_test: Codes,
    y_test: Tensor,
    *,
    max_k: int = DEFAULT_MAX_K,
    f1_jump: float = F1_JUMP,
    l1: float = 0.01,
    steps: int = 300,
) -> tuple[list[list[int]], Tensor]:
    """SAEBench's k-sparse probing (module docstring, step 2). codes (n, m), sparse or dense; y (n, c)
    bool. Returns the main latents per column and the F1 table (c, max_k) on the test rows."""
    train, test = as_sparse(codes_train).to("cpu"), as_sparse(codes_test).to("cpu")
    active = train.csr().values
    scale = active.abs().mean().clamp_min(1e-12) if active.numel() else 1.0
    xs = train.to_torch_sparse() / scale
    W, _ = train_logistic(xs, y_train, steps=steps, l1=l1, weight_decay=0.0)
    c = y_train.shape[1]
    ranked = W.topk(max_k, dim=1).indices  # (c, max_k): by weight, not |weight| (predict the label)
    # the ranked latents' columns only: (n, c, max_k)
    ranked_train = (train.columns(ranked.reshape(-1)) / scale).view(-1, c, max_k)
    ranked_test = (test.columns(ranked.reshape(-1)) / scale).view(-1, c, max_k)
    f1 = torch.zeros(c, max_k)
    for k in range(1, max_k + 1):
        xtr, xte = ranked_train[:, :, :k], ranked_test[:, :, :k]  # (n, c, k)
        w, b = _train_batched(xtr, y_train.float(), steps=steps)
        pred = (xte * w).sum(-1) + b > 0  # (n_test, c)
        f1[:, k - 1] = f1_scores(pred, y_test)
    chosen = []
    for letter in range(c):
        best, k_used = -100.0, 1
        for k in range(1, max_k + 1):
            if f1[letter, k - 1] > best + f1_jump:
                best, k_used = float(f1[letter, k - 1]), k
            else:
                break
        chosen.append(ranked[letter, :k_used].tolist())
    return chosen, f1


def _train_batched(x: Tensor, y: Tensor, steps: int, lr: float = 5e-2) -> tuple[Tensor, Tensor]:
    """c independent logistic regressions at once: x (n, c, k), y (n, c) -> w (c, k), b (c,)."""
    n, c, k = x.shape
    pos = y.sum(0)
    pos_weight = ((n - pos) / pos.clamp_min(1)).clamp_max(1e4)
    w = torch.zeros(c, k, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits((x * w).sum(-1) + b, y, pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach(), b.detach()


# ----- data ----------------------------------------------------------------------------------------
@dataclass
class LetterData:
    words: list[str]
    x: Tensor  # (n, d) activations at the word token
    labels: Tensor  # (n,) letter index
    train: Tensor  # (n,) bool
    probe_w: Tensor  # (26, d) raw-space probe weights
    probe_b: Tensor  # (26,)
    probe_f1: Tensor  # (26,) on the test words
    vocabulary: str


def candidate_words(tokenizer, use_wordnet: bool = True) -> tuple[list[str], str]:
    """Lower-case alphabetic words: WordNet lemmas if available, else the tokenizer's vocabulary."""
    if use_wordnet:
        from hsae.sources.text import wordnet_available

        if wordnet_available():
            return list(_wordnet_words()), "wordnet"
    words = set()
    for token in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([token]).strip()
        if re.fullmatch(r"[a-z]{2,}", text):
            words.add(text)
    return sorted(words), "tokenizer"


@lru_cache(maxsize=1)
def _wordnet_words() -> tuple[str, ...]:
    from hsae.sources.text import wordnet_reader

    names = wordnet_reader().all_lemma_names()
    return tuple(sorted({w for w in names if re.fullmatch(r"[a-z]{2,}", w)}))


def word_positions(tokenizer, words: list[str], template: str = TEMPLATE) -> tuple[list[str], list[int]]:
    """The words that are exactly one token inside the template, and that token's position."""
    prefix = template.index("{word}")
    texts = [template.format(word=w) for w in words]
    enc = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True)
    kept, positions = [], []
    for word, offsets in zip(words, enc["offset_mapping"], strict=False):
        start, end = prefix, prefix + len(word)
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if len(inside) == 1 and tuple(offsets[inside[0]]) == (start, end):
            kept.append(word)
            positions.append(inside[0])
    return kept, positions


def word_activations(
    base: BaseModel, words: list[str], positions: list[int], template: str = TEMPLATE, batch: int = 512
) -> Tensor:
    from hsae.sources.hf import HookedModel

    hooked = HookedModel(base.loaded, [base.hook])
    rows = []
    for start in range(0, len(words), batch):
        texts = [template.format(word=w) for w in words[start : start + batch]]
        enc = base.loaded.tokenizer(texts, padding=True, return_tensors="pt")
        out = hooked({k: v.to(base.loaded.device) for k, v in enc.items()})[base.hook].float().cpu()
        pos = torch.tensor(positions[start : start + batch])
        rows.append(out[torch.arange(len(pos)), pos])
    return torch.cat(rows)


def letter_data(base: BaseModel, n_words: int = DEFAULT_WORDS, seed: int = 0, steps: int = 300) -> LetterData:
    """Words, activations and ground-truth probes for `base` (cached per process)."""
    key = f"{base.key}|{n_words}|{seed}|{steps}"
    if key in _PROBE_DATA:
        return _PROBE_DATA[key]
    tokenizer = base.loaded.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise Skip("the base model's tokenizer is not a fast tokenizer (token offsets are needed)")
    candidates, vocabulary = candidate_words(tokenizer)
    random.Random(seed).shuffle(candidates)  # a seeded sample: check candidates until n_words are kept
    words, positions = [], []
    for start in range(0, len(candidates), 4096):
        kept, pos = word_positions(tokenizer, candidates[start : start + 4096])
        words += kept
        positions += pos
        if len(words) >= n_words:
            break
    words, positions = words[:n_words], positions[:n_words]
    if len(words) < 2 * len(LETTERS):
        raise Skip(f"only {len(words)} single-token words for the first-letter task")
    x = word_activations(base, words, positions)
    labels = torch.tensor([LETTERS.index(w[0]) for w in words])
    train = torch.zeros(len(words), dtype=torch.bool)
    train[: int(0.8 * len(words))] = True
    # centre and scale by one scalar (directions unchanged), then one-vs-rest probes
    scale = math.sqrt(x.shape[1]) / float(x[train].norm(dim=1).mean().clamp_min(1e-12))
    mean = x[train].mean(0)
    y = F.one_hot(labels, len(LETTERS)).bool()
    W, b = train_logistic((x[train] - mean) * scale, y[train], steps=steps, seed=seed)
    W_raw = W * scale
    b_raw = b - W_raw @ mean
    pred = x[~train] @ W_raw.T + b_raw > 0
    data = LetterData(words, x, labels, train, W_raw, b_raw, f1_scores(pred, y[~train]), vocabulary)
    _PROBE_DATA[key] = data
    return data


# ----- the evaluator ------------------------------------------------------------------------------
def _figures(ctx: EvalContext, metrics: dict[str, Any]) -> list[tuple[str, str]]:
    rows = metrics.get("per_letter") or []
    if not rows:
        return []
    import matplotlib.pyplot as plt

    from hsae.eval.plots import to_svg

    fig, ax = plt.subplots(figsize=(7, 3))
    letters = [r["letter"] for r in rows]
    ax.bar(letters, [r["full_absorption_rate"] for r in rows], color="#3b6ea8", label="full absorption")
    ax.plot(letters, [r["absorption_fraction"] for r in rows], "o", color="#a8553b", label="absorption fraction")
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate")
    ax.legend(fontsize=8)
    ax.set_title("First-letter absorption per letter")
    return [("first-letter absorption per letter", to_svg(fig))]


@evaluator("absorption", figures=_figures)
def absorption(ctx: EvalContext) -> dict[str, Any]:
    base = base_model_for(ctx)
    opts = ctx.options
    n_words = int(opts.get("absorption_words", DEFAULT_WORDS))
    min_tokens = int(opts.get("absorption_min_tokens", DEFAULT_MIN_TOKENS))
    min_f1 = float(opts.get("absorption_min_probe_f1", DEFAULT_MIN_PROBE_F1))
    max_k = int(opts.get("absorption_max_k", DEFAULT_MAX_K))
    steps = int(opts.get("absorption_steps", 300))
    data = letter_data(base, n_words, int(opts.get("seed", 0)), steps)
    sae = ctx.model
    codes = encode_rows(sae, data.x, 4096)
    y = F.one_hot(data.labels, len(LETTERS)).bool()
    train, test = data.train, ~data.train
    codes_test = codes.select_rows(test)
    mains, k_f1 = main_latents(
        codes.select_rows(train), y[train], codes_test, y[test], max_k=min(max_k, sae.n_latents), steps=steps
    )
    with torch.no_grad():
        W_dec = sae.W_dec.detach().float().cpu()
    scale = float(sae.config.input_scale)
    x_test, labels_test = data.x[test], data.labels[test]
    probe_scores = x_test @ data.probe_w.T + data.probe_b
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for li, letter in enumerate(LETTERS):
        tp = (labels_test == li) & (probe_scores[:, li] > 0)
        n_tp = int(tp.sum())
        if n_tp < min_tokens:
            skipped[letter] = f"{n_tp} probe true positives"
            continue
        if float(data.probe_f1[li]) < min_f1:
            skipped[letter] = f"probe F1 {float(data.probe_f1[li]):.2f}"
            continue
        p = F.normalize(data.probe_w[li], dim=0)
        dec_dot = W_dec @ p
        probe_cos = dec_dot / W_dec.norm(dim=1).clamp_min(1e-12)
        c = codes_test.select_rows(tp).dense()  # this letter's probe true positives only
        result = absorption_scores(x_test[tp] @ p, c, c * dec_dot[None, :] / scale, probe_cos, mains[li])
        silent = int(result.main_silent.sum())
        full = int(result.full.sum())
        rows.append(
            {
                "letter": letter,
                "probe_true_positives": n_tp,
                "probe_f1": float(data.probe_f1[li]),
                "main_latents": mains[li],
                "main_latents_f1": float(k_f1[li, len(mains[li]) - 1]),
                "full_absorption_rate": full / n_tp,
                "absorption_fraction": float(result.fraction.sum()) / n_tp,
                "main_silent_rate": silent / n_tp,
                "absorbed_when_silent": full / silent if silent else float("nan"),
                "full_absorptions": full,
                "main_silent": silent,
            }
        )
    if len(rows) < MIN_LETTERS:
        raise Skip(
            f"only {len(rows)} letters have at least {min_tokens} probe true positives and probe F1 >= "
            f"{min_f1} (of {len(data.words)} words); need {MIN_LETTERS}"
        )
    silent_total = sum(r["main_silent"] for r in rows)
    return {
        "mean_full_absorption": sum(r["full_absorption_rate"] for r in rows) / len(rows),
        "mean_absorption_fraction": sum(r["absorption_fraction"] for r in rows) / len(rows),
        "mean_main_silent_rate": sum(r["main_silent_rate"] for r in rows) / len(rows),
        "absorbed_when_silent": (
            sum(r["full_absorptions"] for r in rows) / silent_total if silent_total else float("nan")
        ),
        "mean_split_latents": sum(len(r["main_latents"]) for r in rows) / len(rows),
        "mean_probe_f1": sum(r["probe_f1"] for r in rows) / len(rows),
        "letters_evaluated": len(rows),
        "words": len(data.words),
        "vocabulary": data.vocabulary,
        "letters_skipped": ", ".join(f"{k} ({v})" for k, v in skipped.items()) or "none",
        "per_letter": rows,
    }


__all__ = [
    "absorption_scores",
    "TokenAbsorption",
    "f1_scores",
    "train_logistic",
    "main_latents",
    "candidate_words",
    "word_positions",
    "letter_data",
    "absorption",
]
