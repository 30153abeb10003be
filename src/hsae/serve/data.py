"""What the browser shows of one model folder, as JSON-ready dicts: shared by the server and the static
export.

Loaded once: the SAE (its forest, decoder directions), the examples file if there is one, the labels,
the scores and the eval report; for a model trained on an image store, that store's images and the
model's concepts.json (hsae.serve.images). Lists of features are held as arrays (16k+ latents are cheap), children
sorted with the families first and then by firing density, so the page pages through them.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np

from hsae.interpret.examples_db import ExamplesDB, examples_path
from hsae.interpret.labels import best_labels, read_labels
from hsae.interpret.neighbours import DecoderNeighbours
from hsae.interpret.scores import read_scores
from hsae.interpret.steering import Steerer
from hsae.interpret.tokens import normalise
from hsae.serve.images import StoreImages, image_store_of, read_concepts


class FeatureNotFound(LookupError):
    pass


class ModelView:
    def __init__(self, directory: str | Path, key: str):
        from hsae.models import load
        from hsae.models.base import read_config

        self.directory, self.key = Path(directory), key
        self.record = read_config(self.directory)
        self.sae = load(self.directory)
        self.n_latents = int(self.sae.n_latents)
        self.parents = self.sae.hierarchy().numpy()
        path = examples_path(self.directory)
        self.db = ExamplesDB(path) if path.is_file() else None
        self.density = self.db.densities() if self.db is not None else np.zeros(self.n_latents)
        self.images: StoreImages | None
        self.images, self.images_problem = image_store_of(self.record)
        concepts = read_concepts(self.directory)
        self.concepts = {int(e["latent"]): e for e in concepts["concepts"]} if concepts else {}
        self.concepts_meta = (
            {k: concepts.get(k) for k in ("source", "threshold", "named", "firing")} if concepts else None
        )
        self.labels_data = read_labels(self.directory)
        # an image feature without a label is known by its concept's name (the forest, search)
        named = {j: e["name"] for j, e in self.concepts.items() if e.get("name")}
        self.labels = {**named, **best_labels(self.labels_data)}
        self.scores_data = read_scores(self.directory)
        embedding = (self.scores_data["scorers"].get("embedding") or {}).get("features") or {}
        self.scores = {int(k): v.get("auroc") for k, v in embedding.items()}
        self.neighbours = DecoderNeighbours(self.sae.W_dec)
        self.n_children = np.bincount(self.parents[self.parents >= 0], minlength=self.n_latents)
        self.children = self._children()
        report = self.directory / "eval" / "report.json"
        self.report = json.loads(report.read_text()) if report.is_file() else None
        self.report_html = self.directory / "eval" / "report.html"
        self.steerer: Steerer | None = None
        self.steer_lock = threading.Lock()  # one steering run at a time: its hook is on the shared model

    def _children(self) -> dict[int, np.ndarray]:
        """parent (-1 for the roots) -> its children, families first, then by density."""
        order = np.lexsort((np.arange(self.n_latents), -self.density, -(self.n_children > 0).astype(np.int64)))
        grouped: dict[int, list[int]] = {}
        for i in order.tolist():
            grouped.setdefault(int(self.parents[i]), []).append(i)
        return {p: np.asarray(ids, dtype=np.int64) for p, ids in grouped.items()}

    # -- answers -------------------------------------------------------------------------------

    def check(self, latent: int) -> None:
        if not 0 <= latent < self.n_latents:
            raise FeatureNotFound(
                f"feature {latent} does not exist: this model has {self.n_latents} features (0..{self.n_latents - 1})"
            )

    def summary(self, latent: int) -> dict[str, Any]:
        return {
            "id": latent,
            "label": self.labels.get(latent),
            "density": float(self.density[latent]),
            "score": self.scores.get(latent),
            "parent": int(self.parents[latent]),
            "children": int(self.n_children[latent]),
        }

    def missing_examples(self) -> str | None:
        """The command that gives this model's pages their examples, while it has none."""
        if self.db is not None or self.concepts:
            return None
        if self.images is not None or self.images_problem:  # an image model: `hsae examples` reads text
            return f"hsae concepts {self.directory} --data {(self.record.get('data') or {}).get('path')}"
        return f"hsae examples {self.directory}"

    def model(self) -> dict[str, Any]:
        data = self.record.get("data") or {}
        scorers = {name: s.get("summary") for name, s in self.scores_data["scorers"].items()}
        return {
            "key": self.key,
            "name": self.directory.name,
            "arch": self.sae.arch,
            "n_latents": self.n_latents,
            "d_in": int(self.sae.d_in),
            "model": (data.get("model") or {}).get("name") or (self.images.model_name if self.images else None),
            "hook": data.get("hook") or (self.images.hook if self.images else None),
            "corpus": (data.get("corpus") or {}).get("name") or (data.get("corpus") or {}).get("kind"),
            "roots": int(len(self.children.get(-1, ()))),
            "edges": int((self.parents >= 0).sum()),
            "examples": None
            if self.db is None
            else {"tokens": self.db.meta.get("rows"), "created": self.db.meta.get("created")},
            "missing_examples": self.missing_examples(),
            "labellers": sorted(self.labels_data["labellers"]),
            "scores": scorers,
            "report": self.report,
            "has_report_html": self.report_html.is_file(),
            "density_histogram": self.density_histogram(),
            "images": self.images.describe() if self.images is not None else None,
            "images_problem": self.images_problem,
            "concepts": self.concepts_meta,
        }

    def density_histogram(self, low: float = -7.0, step: float = 0.25, bins: int = 28) -> dict[str, Any] | None:
        """Counts of the live features' log10 densities in `bins` bins from `low` (the ends hold the rest)."""
        if self.db is None:
            return None
        alive = np.log10(self.density[self.density > 0])
        counts = np.histogram(np.clip(alive, low, low + bins * step - 1e-9), bins=bins, range=(low, low + bins * step))[
            0
        ]
        return {"low": low, "step": step, "counts": counts.tolist(), "dead": int((self.density == 0).sum())}

    def list_children(self, parent: int, offset: int = 0, limit: int = 200) -> dict[str, Any]:
        if parent != -1:
            self.check(parent)
        ids = self.children.get(parent, np.zeros(0, dtype=np.int64))
        page = ids[max(offset, 0) : max(offset, 0) + max(min(limit, 1000), 1)]
        return {
            "parent": parent,
            "total": int(ids.size),
            "offset": offset,
            "items": [self.summary(int(i)) for i in page],
        }

    def feature(self, latent: int) -> dict[str, Any]:
        self.check(latent)
        out = self.summary(latent)
        parent = int(self.parents[latent])
        siblings = self.children.get(parent, np.zeros(0, dtype=np.int64))
        out["parent_summary"] = self.summary(parent) if parent >= 0 else None
        out["ancestors"] = [self.summary(a) for a in self._ancestors(latent)]
        out["children_list"] = self.list_children(latent, 0, 100)
        out["siblings"] = {
            "total": int(siblings.size) - 1,
            "items": [self.summary(int(s)) for s in siblings[:41] if int(s) != latent][:40],
        }
        out["neighbours"] = [{**self.summary(j), "cosine": c} for j, c in self.neighbours.of(latent, 10)]
        out["labels"] = {
            name: (section.get("labels") or {}).get(str(latent))
            for name, section in self.labels_data["labellers"].items()
        }
        out["scores_detail"] = {
            name: (section.get("features") or {}).get(str(latent))
            for name, section in self.scores_data["scorers"].items()
        }
        out["missing_examples"] = self.missing_examples()
        out["images"] = self.feature_images(latent)
        if self.db is None:
            return out
        stats = self.db.feature(latent) or {}
        examples = self.db.examples(latent)
        ids = [t for e in examples for t in e.tokens]
        for key in ("promoted", "suppressed"):
            ids += [t for t, _ in stats.get(key) or []]
        pieces = self.db.pieces(ids)
        out["stats"] = {k: stats.get(k) for k in ("fires", "density", "max_act", "min_act")}
        out["histogram"] = {"edges": self.db.meta["histogram_edges"], "counts": stats.get("hist")}
        out["cofire"] = [{**self.summary(j), "p": p, "lift": lift} for j, p, lift in stats.get("cofire") or []]
        for key in ("promoted", "suppressed"):
            pairs = stats.get(key)
            out[key] = [{"token": pieces.get(t, ""), "logit": v} for t, v in pairs] if pairs else None
        grouped: dict[str, list[dict[str, Any]]] = {"top": [], "bottom": [], "quantile": []}
        for e in examples:
            grouped.setdefault(e.kind, []).append(e.as_dict(pieces))
        grouped["quantile"].sort(key=lambda e: (-(e["quantile"] or 0), -abs(e["value"])))
        out["examples"] = grouped
        return out

    def feature_images(self, latent: int) -> dict[str, Any] | None:
        """An image model's top images for the feature (concepts.json's, else the examples file's),
        with the layout the page draws their heatmaps in; None for a text model."""
        if self.images is None and not self.images_problem:
            return None
        entry = self.concepts.get(latent)
        concept = None
        if entry is not None:
            concept = {k: entry.get(k) for k in ("name", "score", "best", "word", "word_score", "label", "label_score")}
            concept["source"] = (self.concepts_meta or {}).get("source")
        items: list[dict[str, Any]] = []
        source = None
        if self.images is not None and entry is not None:
            items, source = self.images.from_concept(entry), "concepts"
        elif self.images is not None and self.db is not None:
            items, source = self.images.from_examples(self.db.examples(latent, "top")), "examples"
        return {
            "source": source,
            "grid": self.images.grid if self.images else None,
            "pad_square": self.images.pad_square if self.images else False,
            "concept": concept,
            "items": items,
            "problem": self.images_problem,
        }

    def _ancestors(self, latent: int) -> list[int]:
        chain, seen = [], {latent}
        parent = int(self.parents[latent])
        while parent >= 0 and parent not in seen:
            chain.append(parent)
            seen.add(parent)
            parent = int(self.parents[parent])
        return chain[::-1]

    def search(self, query: str, limit: int = 50) -> dict[str, Any]:
        """Features by id, by a label containing the query, or by a token they fire on."""
        q = query.strip()
        found: dict[int, str] = {}
        if q.isdigit() and int(q) < self.n_latents:
            found[int(q)] = "id"
        needle = q.lower()
        if needle:
            hits = [i for i, label in self.labels.items() if needle in label.lower()]
            hits.sort(key=lambda i: -self.density[i])
            for i in hits:
                found.setdefault(i, "label")
            if self.db is not None:
                for i, _ in self.db.search_tokens(normalise(q), limit):
                    found.setdefault(i, "token")
        items = [{**self.summary(i), "match": how} for i, how in list(found.items())[:limit]]
        return {"query": q, "total": len(found), "items": items}

    def steer(self, latent: int, scale: float, text: str) -> dict[str, Any]:
        self.check(latent)
        with self.steer_lock:
            return self._steer(latent, scale, text)

    def _steer(self, latent: int, scale: float, text: str) -> dict[str, Any]:
        if self.steerer is None:
            from hsae.interpret.streams import recorded_model
            from hsae.sources.hf import load_model

            name, hook = recorded_model(self.record)
            self.steerer = Steerer(self.sae, load_model(name), hook)
        return self.steerer.run(latent, scale, text).as_dict()
