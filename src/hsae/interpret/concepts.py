"""Concepts of an SAE trained on image embeddings: naming, concept search and a bias audit (the uses of
MSAE in Zaigrajew et al. 2025, arXiv 2502.20578), as functions of tensors and models.

Naming (Discover-then-Name, as the paper uses it): a latent's concept vector is its decoder row in the
embedding's own units plus the SAE's b_dec (the authors add the data mean; b_dec starts there),
`concept_vectors`. It is compared by cosine with the embeddings of a vocabulary:
- `name_by_text`: a text encoder's embeddings of words or phrases (CLIP/SigLIP: the same space as
  the image embeddings); a latent stays unnamed below `TEXT_THRESHOLD` (0.42 in the paper).
- `name_by_head`: a classifier head's class weight vectors (EfficientNet's ImageNet head: the SAE
  then reads the head's input). The decoder row alone is compared (the head is linear: adding the
  concept moves the logits along W_head d). Head weights are not text embeddings, so the paper's
  0.42 means nothing here; the threshold is chance level instead, `chance_threshold`: the 99th
  percentile of the best cosine that random directions drawn like the data (a Gaussian with its
  covariance) reach with any class.
- `name_by_words`: the caption words over-represented in a latent's top images, scored as in the
  offline token labels (p log(p / base) against all captions, add-one smoothed); with labels (a folder
  path per image) the same gives each latent's most over-represented label.

Search (`concept_search`): an image's code with one concept raised (or lowered) by `delta`, decoded,
and the nearest images of a gallery by cosine. Bias audit (`concept_effect`): how raising a concept
in every code shifts a downstream classifier's mean class probabilities, against the unedited
reconstructions (so the SAE's own error cancels).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from hsae.errors import HsaeError
from hsae.models.codes import to_dense

# The file `hsae concepts` writes beside a model (read by the browser).
CONCEPTS_FILE = "concepts.json"
TEXT_THRESHOLD = 0.42  # the paper's similarity threshold for text-encoder names
CHANCE_QUANTILE = 0.99
STOPWORDS = frozenset(
    "a an the of and or in on at to for with by from as is are be it its this that these those his her their "
    "some two three one".split()
)


@dataclass(frozen=True)
class ConceptName:
    latent: int
    name: str | None  # None: below the threshold (unnamed)
    score: float  # cosine (text, head) or p log(p / base) (words)
    best: str  # the best candidate, named or not
    source: str  # "text", "head" or "words"


def concept_vectors(model, with_bias: bool = True) -> Tensor:
    """Each latent's concept vector in the embedding's units: (W_dec[j] + b_dec) / input_scale, or the
    decoder row alone (`with_bias=False`), (n_latents, d), float32."""
    with torch.no_grad():
        rows = model.W_dec.detach().float()
        if with_bias:
            rows = rows + model.b_dec.detach().float()
        return (rows / model.config.input_scale).cpu()


def _cosines(a: Tensor, b: Tensor) -> Tensor:
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.t()


def _best_names(sim: Tensor, vocabulary: Sequence[str], threshold: float, source: str) -> list[ConceptName]:
    if sim.shape[1] != len(vocabulary):
        raise HsaeError(f"{sim.shape[1]} embeddings for a vocabulary of {len(vocabulary)}")
    score, best = sim.max(1)
    return [
        ConceptName(j, vocabulary[b] if s >= threshold else None, float(s), vocabulary[b], source)
        for j, (s, b) in enumerate(zip(score.tolist(), best.tolist(), strict=True))
    ]


def name_by_text(
    model, text_embeddings: Tensor, vocabulary: Sequence[str], threshold: float = TEXT_THRESHOLD
) -> list[ConceptName]:
    """Each latent's closest vocabulary entry by cosine between its concept vector and the entries'
    text embeddings (V, d), named when the cosine reaches `threshold`."""
    if text_embeddings.shape[1] != model.d_in:
        raise HsaeError(
            f"text embeddings of width {text_embeddings.shape[1]} cannot name an SAE of width {model.d_in}: "
            "name with the text tower whose image embeddings the SAE was trained on"
        )
    return _best_names(_cosines(concept_vectors(model), text_embeddings), vocabulary, threshold, "text")


def chance_threshold(
    class_weights: Tensor, data: Tensor, quantile: float = CHANCE_QUANTILE, draws: int = 4000, seed: int = 0
) -> float:
    """The `quantile` of the best cosine with any class vector reached by random directions drawn as
    the (centred) data's Gaussian: what a concept direction with nothing to do with the classes gets."""
    centred = data.double() - data.double().mean(0)
    if centred.shape[0] < 2:
        raise HsaeError("the chance threshold needs at least 2 rows of data")
    g = torch.Generator().manual_seed(seed)
    # x = z @ centred / sqrt(n): a Gaussian with the data's covariance, without forming it
    z = torch.randn(draws, centred.shape[0], generator=g, dtype=torch.float64)
    directions = (z @ centred).float()
    best = _cosines(directions, class_weights).max(1).values
    return float(best.quantile(quantile))


def name_by_head(model, class_weights: Tensor, class_names: Sequence[str], threshold: float) -> list[ConceptName]:
    """Each latent's class by cosine between its decoder row and the head's class weight vectors
    (C, d), named when the cosine reaches `threshold` (e.g. `chance_threshold`)."""
    if class_weights.shape[1] != model.d_in:
        raise HsaeError(
            f"a head on width {class_weights.shape[1]} cannot name an SAE of width {model.d_in}: train the SAE on "
            "the head's input (EfficientNet-Lite0: the hook _fc:input)"
        )
    sim = _cosines(concept_vectors(model, with_bias=False), class_weights)
    return _best_names(sim, class_names, threshold, "head")


# --- what a latent's top images share -----------------------------------------------------------


@torch.no_grad()
def image_activations(model, rows: Tensor, image_ids: Tensor, n_images: int, k: int | None = None,
                      batch: int = 4096) -> Tensor:  # fmt: skip
    """(n_images, n_latents): each latent's largest activation over each image's rows (one row per
    image for embeddings; the peak location for per-location rows), codes at `k` (None: the model's)."""
    out = torch.zeros(n_images, model.n_latents)
    for s in range(0, rows.shape[0], batch):
        codes = to_dense(model.encode(rows[s : s + batch], k=k) if k else model.encode(rows[s : s + batch]))
        ids = image_ids[s : s + batch].long().unsqueeze(1).expand(-1, model.n_latents)
        out.scatter_reduce_(0, ids, codes.float().cpu(), "amax")
    return out


def top_images(activations: Tensor, n: int = 9) -> tuple[Tensor, Tensor]:
    """(values, image ids) of each latent's n most activating images, (n_latents, n); only images
    where the latent is active count (value 0 marks a missing one)."""
    n = min(n, activations.shape[0])
    values, ids = activations.t().topk(n, dim=1)
    return values, ids


def caption_words(caption: str | None) -> list[str]:
    """Lower-case words of a caption, stopwords and one-letter words left out, each once."""
    words = re.findall(r"[a-z][a-z'-]*[a-z]|[a-z]", (caption or "").lower())
    return list(dict.fromkeys(w for w in words if len(w) > 1 and w not in STOPWORDS))


def over_represented(
    tops: Sequence[Sequence[int]], terms_of: Sequence[Sequence[str]], min_count: int = 2
) -> list[tuple[str | None, float]]:
    """For each latent's top image ids, the term (caption word, label, ...) most over-represented among
    them against all images: p log(p / base) with p the share of top images holding the term and
    base its add-one smoothed share over all; (None, 0) when no term reaches `min_count` top images."""
    n_all = len(terms_of)
    base = Counter(t for terms in terms_of for t in set(terms))
    out: list[tuple[str | None, float]] = []
    for ids in tops:
        counts = Counter(t for i in ids for t in set(terms_of[i]))
        best: tuple[str | None, float] = (None, 0.0)
        for term, c in counts.items():
            if c < min_count:
                continue
            p = c / max(1, len(ids))
            score = p * math.log(p / ((base[term] + 1) / (n_all + 1)))
            if score > best[1] or (score == best[1] and best[0] is not None and term < best[0]):
                best = (term, score)
        out.append(best)
    return out


def name_by_words(
    activations: Tensor, captions: Sequence[str | None], n_top: int = 9, min_count: int = 2
) -> list[ConceptName]:
    """Each latent's most over-represented caption word among its `n_top` images (active ones only)."""
    values, ids = top_images(activations, n_top)
    tops = [
        [i for v, i in zip(vs, row, strict=True) if v > 0]
        for vs, row in zip(values.tolist(), ids.tolist(), strict=True)
    ]
    found = over_represented(tops, [caption_words(c) for c in captions], min_count)
    return [ConceptName(j, word, score, word or "", "words") for j, (word, score) in enumerate(found)]


# --- search and audit ------------------------------------------------------------------------------


@torch.no_grad()
def edited_reconstruction(model, x: Tensor, latent: int, delta: float, k: int | None = None) -> Tensor:
    """Decode x's codes with `latent` raised by `delta` (lowered when negative, never below 0)."""
    codes = to_dense(model.encode(x, k=k) if k else model.encode(x)).clone()
    codes[:, latent] = (codes[:, latent] + delta).clamp_min(0)
    return model.decode(codes)


@torch.no_grad()
def concept_search(
    model, query: Tensor, gallery: Tensor, latent: int, delta: float, top: int = 10, k: int | None = None
) -> tuple[Tensor, Tensor]:
    """(image ids, cosines) of the `top` gallery rows nearest to the query embedding (d,) after its
    concept `latent` is raised by `delta` (negative: lowered) in its code and the code decoded."""
    edited = edited_reconstruction(model, query.reshape(1, -1), latent, delta, k)
    sims = _cosines(edited, gallery)[0]
    scores, ids = sims.topk(min(top, gallery.shape[0]))
    return ids, scores


@torch.no_grad()
def concept_effect(
    model, x: Tensor, latent: int, delta: float, classify: Callable[[Tensor], Tensor], k: int | None = None
) -> Tensor:
    """The mean change of each class probability (C,) when `latent` is raised by `delta` in every code
    of x, against the unedited reconstructions (softmax of `classify`'s logits)."""
    plain = edited_reconstruction(model, x, latent, 0.0, k)
    edited = edited_reconstruction(model, x, latent, delta, k)
    return (classify(edited).softmax(-1) - classify(plain).softmax(-1)).mean(0)


def zero_shot_classifier(class_text_embeddings: Tensor, scale: float = 100.0) -> Callable[[Tensor], Tensor]:
    """CLIP's zero-shot head: logits = scale * cos(image embedding, class text embedding)."""

    def classify(x: Tensor) -> Tensor:
        return scale * _cosines(x, class_text_embeddings)

    return classify
