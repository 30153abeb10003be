"""`hsae concepts`: name an image SAE's concepts; `hsae concept-search`: nearest images with a concept
raised or lowered; `hsae bias-audit`: how raising a concept shifts the model's classifier.

All three read an SAE trained on a vision model's image embeddings and an image store
(`hsae harvest-images`, with its images.json). A store of whole-image rows (position -1: pooled,
CLS, embeddings) gives the embeddings directly; a store of grid rows (map/patches) gives each image
the mean of its rows (for a CNN map that is exactly the pooled embedding) and, for each concept's top
images, a heatmap of the concept over the grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.table import Table
from torch import Tensor

from hsae.cli import app
from hsae.cli._common import quiet_transformers
from hsae.errors import HsaeError
from hsae.interpret.concepts import CONCEPTS_FILE


@dataclass
class ImageStore:
    """A store read for concepts: one embedding per harvested image, and its grid rows if any."""

    embeddings: Tensor  # (n, d), row i is image image_ids[i]
    image_ids: Tensor  # (n,) ids into `records`
    records: list[dict[str, Any]]  # images.json's per-image records, by id
    grid: tuple[int, int] | None
    grid_rows: Tensor | None  # (rows, d) with grid_ids / grid_positions
    grid_ids: Tensor | None
    grid_positions: Tensor | None
    manifest: dict[str, Any]

    def caption(self, image: int) -> str | None:
        return self.records[image].get("caption")

    def label(self, image: int) -> str | None:
        return self.records[image].get("label")


def read_image_store(path: str | Path) -> ImageStore:
    """The embeddings (and grid rows) of an image store and its images.json."""
    from hsae.sources.vision import IMAGE_INDEX
    from hsae.store import ActivationStore, read_manifest

    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None or manifest.get("model", {}).get("modality") != "vision":
        raise HsaeError(f"{path} is not an image store: harvest one with `hsae harvest-images`")
    index_file = path / IMAGE_INDEX
    if not index_file.is_file():
        raise HsaeError(f"{path} has no {IMAGE_INDEX}: run the same `hsae harvest-images` command again to write it")
    records = json.loads(index_file.read_text())["images"]
    store = ActivationStore.open(path, hook=manifest["hooks"][0]["name"], max_norm_ratio=None)
    shards = list(store.iter_shards())
    rows = torch.cat([s["activations"] for s in shards])
    ids = torch.cat([s["doc_ids"] for s in shards])
    positions = torch.cat([s["positions"] for s in shards])
    whole = positions < 0
    grid = manifest["harvest"].get("grid")
    if bool(whole.any()):
        embeddings, image_ids = rows[whole], ids[whole]
    else:  # grid rows only: each image's mean row
        image_ids = torch.unique(ids)
        slot = torch.searchsorted(image_ids, ids)
        sums = torch.zeros(image_ids.numel(), rows.shape[1]).index_add_(0, slot, rows)
        embeddings = sums / torch.bincount(slot, minlength=image_ids.numel()).unsqueeze(1)
    has_grid = bool((~whole).any()) and grid is not None
    return ImageStore(
        embeddings, image_ids, records, tuple(grid) if has_grid else None,
        rows[~whole] if has_grid else None, ids[~whole] if has_grid else None,
        positions[~whole] if has_grid else None, manifest,
    )  # fmt: skip


def _check_width(model, store: ImageStore) -> None:
    if model.d_in != store.embeddings.shape[1]:
        raise HsaeError(
            f"the SAE reads width {model.d_in} but the store's rows are {store.embeddings.shape[1]} wide: "
            "name concepts with the store the SAE was trained on"
        )


def heatmaps(
    model, store: ImageStore, wanted: dict[int, set[int]], k: int | None = None, batch: int = 4096
) -> dict[tuple[int, int], list[float]]:
    """{(image, latent): the latent's activation at each grid cell of the image, row-major} for the
    latents `wanted` of each image, from the store's grid rows (one pass over the rows needed)."""
    if store.grid_rows is None or store.grid_ids is None or store.grid_positions is None or store.grid is None:
        return {}
    from hsae.models.codes import to_dense

    cells = store.grid[0] * store.grid[1]
    keep = torch.isin(store.grid_ids, torch.tensor(sorted(wanted), dtype=store.grid_ids.dtype))
    rows, ids, positions = store.grid_rows[keep], store.grid_ids[keep], store.grid_positions[keep]
    maps: dict[tuple[int, int], torch.Tensor] = {}
    with torch.no_grad():
        for s in range(0, rows.shape[0], batch):
            codes = to_dense(model.encode(rows[s : s + batch], k=k) if k else model.encode(rows[s : s + batch]))
            for r, (image, cell) in enumerate(
                zip(ids[s : s + batch].tolist(), positions[s : s + batch].tolist(), strict=True)
            ):
                for latent in wanted[image]:
                    maps.setdefault((image, latent), torch.zeros(cells))[cell] = float(codes[r, latent])
    return {key: [round(v, 4) for v in grid.tolist()] for key, grid in maps.items()}


def default_vocabulary(store: ImageStore) -> list[str]:
    """Caption words and the last part of each label (folder names), once each, sorted."""
    from hsae.interpret.concepts import caption_words

    words = {w for r in store.records for w in caption_words(r.get("caption"))}
    words |= {str(r["label"]).rsplit("/", 1)[-1].replace("_", " ") for r in store.records if r.get("label")}
    return sorted(words)


def concept_report(
    model,
    store: ImageStore,
    loaded: Any = None,
    *,
    vocabulary: list[str] | None = None,
    threshold: float | None = None,
    n_top: int = 9,
    k: int | None = None,
    audits: int = 5,
) -> dict[str, Any]:
    """Names, top images (with heatmaps where the store has grid rows), caption words and labels for
    every latent that fires, plus a bias audit and a search example for the best-named concepts.
    Names come from the vision model's text tower when the SAE reads its embedding space, else its
    classifier head, else only from caption words."""
    from hsae.interpret import concepts as cn

    _check_width(model, store)
    emb, ids = store.embeddings, store.image_ids.tolist()
    acts = cn.image_activations(model, emb, torch.arange(emb.shape[0]), emb.shape[0], k)
    values, tops = cn.top_images(acts, n_top)
    captions = [store.caption(i) for i in ids]
    labels = [[label] if (label := store.label(i)) else [] for i in ids]
    words = cn.name_by_words(acts, captions, n_top)
    top_lists = [
        [t for v, t in zip(vs, row, strict=True) if v > 0]
        for vs, row in zip(values.tolist(), tops.tolist(), strict=True)
    ]
    label_names = cn.over_represented(top_lists, labels)
    names: list[cn.ConceptName] | None = None
    source = "words"
    text_width = None
    if loaded is not None and getattr(loaded, "has_text_tower", False):
        text_width = int(loaded.text_features(["a photo"]).shape[1])
    if text_width == model.d_in:
        vocabulary = vocabulary or default_vocabulary(store)
        threshold = cn.TEXT_THRESHOLD if threshold is None else threshold
        names, source = cn.name_by_text(model, loaded.text_features(vocabulary), vocabulary, threshold), "text"
    elif loaded is not None and loaded.head_module is not None and loaded.classes:
        head = dict(loaded.model.named_modules())[loaded.head_module]
        weights = head.weight.detach().float().cpu()
        if weights.shape[1] == model.d_in:
            threshold = cn.chance_threshold(weights, emb) if threshold is None else threshold
            names, source = cn.name_by_head(model, weights, loaded.classes, threshold), "head"
    fires = acts.amax(0) > 0
    wanted: dict[int, set[int]] = {}
    for j in fires.nonzero().squeeze(1).tolist():
        for t in top_lists[j]:
            wanted.setdefault(ids[t], set()).add(j)
    maps = heatmaps(model, store, wanted, k)
    latents = []
    for j in range(model.n_latents):
        if not fires[j]:
            continue
        entry: dict[str, Any] = {"latent": j}
        if names is not None:
            entry.update(name=names[j].name, score=round(names[j].score, 4), best=names[j].best)
        entry.update(
            word=words[j].name, word_score=round(words[j].score, 4),
            label=label_names[j][0], label_score=round(label_names[j][1], 4),
            top_images=[ids[t] for t in top_lists[j]],
            top_values=[round(v, 4) for v in values[j].tolist()[: len(top_lists[j])]],
        )  # fmt: skip
        if maps:
            entry["heatmaps"] = [maps.get((ids[t], j)) for t in top_lists[j]]
        latents.append(entry)
    named = [e for e in latents if e.get("name")]
    report: dict[str, Any] = {
        "source": source,
        "threshold": threshold,
        "latents": model.n_latents,
        "firing": len(latents),
        "named": len(named),
        "grid": list(store.grid) if store.grid else None,
        "concepts": latents,
    }
    if loaded is not None and loaded.head_module is not None and loaded.classes and source != "text":
        report["bias_audit"] = _audits(model, loaded, emb, acts, sorted(named, key=lambda e: -e["score"])[:audits], k)
    best = sorted(named or latents, key=lambda e: -(e.get("score") or e["word_score"]))[:3]
    report["search"] = [_search_example(model, emb, acts, ids, e["latent"], k) for e in best]
    return report


def _audits(model, loaded, emb: Tensor, acts: Tensor, entries: list[dict], k: int | None) -> list[dict[str, Any]]:
    """Each concept raised by its largest activation over the images, in every image's code: the
    classes whose mean probability rises most."""
    from hsae.interpret.concepts import concept_effect

    out = []
    for e in entries:
        delta = float(acts[:, e["latent"]].max())
        shift = concept_effect(model, emb, e["latent"], delta, loaded.classify, k)
        up = shift.topk(3)
        out.append({
            "latent": e["latent"], "name": e["name"], "delta": round(delta, 4),
            "raised": [[loaded.classes[i], round(float(v), 4)] for v, i in zip(up.values, up.indices, strict=True)],
        })  # fmt: skip
    return out


def _search_example(model, emb: Tensor, acts: Tensor, ids: list[int], latent: int, k: int | None) -> dict[str, Any]:
    """From the most ordinary image (nearest the mean embedding), the nearest images before and after
    raising the concept by its largest activation, and how many of them are its own top images."""
    from hsae.interpret.concepts import concept_search, top_images

    query = int(((emb - emb.mean(0)) ** 2).sum(1).argmin())
    delta = float(acts[:, latent].max())
    before, _ = concept_search(model, emb[query], emb, latent, 0.0, top=5, k=k)
    after, _ = concept_search(model, emb[query], emb, latent, delta, top=5, k=k)
    own = set(top_images(acts[:, latent : latent + 1], 9)[1][0].tolist())
    return {
        "latent": latent, "query": ids[query], "delta": round(delta, 4),
        "before": [ids[i] for i in before.tolist()], "after": [ids[i] for i in after.tolist()],
        "top_images_before": len(own & set(before.tolist())), "top_images_after": len(own & set(after.tolist())),
    }  # fmt: skip


def _load(model_dir: Path, data: Path, vision_model: str | None, need_vision: bool):
    import hsae
    from hsae.sources.vision import load_vision_model

    quiet_transformers()
    model = hsae.load(model_dir)
    store = read_image_store(data)
    name = vision_model or store.manifest["model"].get("path") or store.manifest["model"]["name"]
    size = store.manifest["model"].get("image_size", {}).get("height")
    embedded = store.manifest["model"]["name"] == "efficientnet-lite0"
    loaded = load_vision_model(name, device="cpu", image_size=size if embedded else None) if need_vision else None
    return model, store, loaded


@app.command()
def concepts(
    model_dir: Path = typer.Argument(..., help="SAE folder (trained on the store's image embeddings)"),
    data: Path = typer.Option(..., help="Image store (hsae harvest-images)"),
    vision_model: str | None = typer.Option(None, help="The vision model (default: the store's)"),
    vocab: Path | None = typer.Option(None, help="Text towers: one concept per line (default: caption words)"),
    threshold: float | None = typer.Option(None, help="Name threshold (default: 0.42 text, chance level head)"),
    top: int = typer.Option(9, help="Top images per concept"),
    k: int | None = typer.Option(None, help="Read codes at this k (nested-over-k families)"),
) -> None:
    """Name each latent (text tower, classifier head, caption words), with its top images, heatmaps,
    a bias audit and search examples; writes MODEL_DIR/concepts.json."""
    from hsae.atomic import write_json

    model, store, loaded = _load(model_dir, data, vision_model, need_vision=True)
    vocabulary = [ln.strip() for ln in vocab.read_text().splitlines() if ln.strip()] if vocab else None
    report = concept_report(model, store, loaded, vocabulary=vocabulary, threshold=threshold, n_top=top, k=k)
    write_json(model_dir / CONCEPTS_FILE, report)
    console = Console()
    table = Table(title=f"{report['named']} of {report['firing']} firing latents named ({report['source']}, "
                  f"threshold {report['threshold']})")  # fmt: skip
    for column in ("latent", "name", "score", "caption word", "label"):
        table.add_column(column)
    shown = sorted(report["concepts"], key=lambda e: -(e.get("score") or 0))[:20]
    for e in shown:
        table.add_row(str(e["latent"]), str(e.get("name") or "-"), str(e.get("score", "")), str(e["word"] or "-"),
                      str(e["label"] or "-"))  # fmt: skip
    console.print(table)
    console.print(f"written: {model_dir / CONCEPTS_FILE}")


@app.command("concept-search")
def concept_search_command(
    model_dir: Path = typer.Argument(..., help="SAE folder"),
    data: Path = typer.Option(..., help="Image store"),
    image: int = typer.Option(..., help="Query image id (images.json)"),
    latent: int = typer.Option(..., help="The concept (latent) to raise or lower"),
    delta: float = typer.Option(..., help="Added to the concept's code (negative lowers it)"),
    top: int = typer.Option(10, help="Images to list"),
    k: int | None = typer.Option(None, help="Read codes at this k"),
) -> None:
    """The images nearest to one image's embedding after a concept is raised or lowered in its code."""
    from hsae.interpret.concepts import concept_search

    model, store, _ = _load(model_dir, data, None, need_vision=False)
    _check_width(model, store)
    where = (store.image_ids == image).nonzero()
    if not where.numel():
        raise HsaeError(f"image {image} has no row in {data} (unreadable, or past the harvested rows)")
    if not 0 <= latent < model.n_latents:
        raise HsaeError(f"latent must be between 0 and {model.n_latents - 1}, got {latent}")
    found, scores = concept_search(model, store.embeddings[int(where[0])], store.embeddings, latent, delta, top, k)
    for i, s in zip(found.tolist(), scores.tolist(), strict=True):
        r = store.records[int(store.image_ids[i])]
        print(f"{s:.4f}  {r['id']}  {r['name']}  {r.get('label') or ''}  {r.get('caption') or ''}")


@app.command("bias-audit")
def bias_audit(
    model_dir: Path = typer.Argument(..., help="SAE folder (trained on the classifier head's input)"),
    data: Path = typer.Option(..., help="Image store"),
    latent: int = typer.Option(..., help="The concept (latent) to raise"),
    delta: float | None = typer.Option(None, help="Added to the concept's code (default: its largest activation)"),
    vision_model: str | None = typer.Option(None, help="The vision model (default: the store's)"),
    top: int = typer.Option(5, help="Classes to list each way"),
) -> None:
    """How raising a concept in every image's code moves the classifier's mean class probabilities."""
    from hsae.interpret.concepts import concept_effect, image_activations

    model, store, loaded = _load(model_dir, data, vision_model, need_vision=True)
    _check_width(model, store)
    if loaded.head_module is None or not loaded.classes:
        raise HsaeError(f"{loaded.name} has no classifier head to audit: use a model with one (EfficientNet-Lite0)")
    emb = store.embeddings
    acts = image_activations(model, emb, torch.arange(emb.shape[0]), emb.shape[0])
    step = delta if delta is not None else float(acts[:, latent].max())
    shift = concept_effect(model, emb, latent, step, loaded.classify)
    order = shift.argsort(descending=True).tolist()
    print(f"latent {latent} raised by {step:.4f} in {emb.shape[0]} images: mean change of class probability")
    for i in order[:top] + order[-top:]:
        print(f"{float(shift[i]):+.4f}  {loaded.classes[i]}")
