"""Token rows for the examples pass, from an activation store or harvested on the fly, resumable.

Both give chunks of activations with each row's token id, document and position, in harvest order, and
after each chunk a `place` (JSON-able) from which `chunks(place)` continues exactly: a row count for a
store, the harvester's stream place for on-the-fly harvesting.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from hsae.errors import HsaeError


@dataclass
class TokenChunk:
    activations: Tensor  # (m, d) float32
    token_ids: Tensor  # (m,) int64
    doc_ids: Tensor
    positions: Tensor
    place: Any  # where the stream continues after this chunk


class StoreStream:
    """The rows of an `ActivationStore` (every row, in harvest order), `chunk_rows` at a time."""

    def __init__(self, store, chunk_rows: int = 4096):
        self.store, self.chunk_rows = store, chunk_rows

    @property
    def total_rows(self) -> int | None:
        return self.store.total_rows

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "store",
            "path": str(Path(self.store.path).resolve()),
            "hook": self.store.hook,
            "rows": self.store.total_rows,
            "model": self.store.manifest["model"],
            "corpus": self.store.manifest["corpus"],
        }

    def label_names(self) -> list[str] | None:
        """An image store's label names (its rows' token ids are image labels); None for text."""
        if self.store.manifest["model"].get("modality") != "vision":
            return None
        from hsae.sources.vision import IMAGE_INDEX

        index = Path(self.store.path) / IMAGE_INDEX
        try:
            return [str(name) for name in json.loads(index.read_text())["collection"]["labels"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise HsaeError(f"{index} cannot be read ({err}); harvest the images again") from None

    def load_model(self):
        """The model (and tokenizer) the store was harvested from: its recorded folder, else its name."""
        from hsae.sources.hf import load_model

        record = self.store.manifest["model"]
        path = record.get("path")
        return load_model(path if path and Path(path).is_dir() else record["name"])

    def chunks(self, place: int | None = None) -> Iterator[TokenChunk]:
        start = int(place or 0)
        done = 0
        for shard in self.store.shards:
            if done + shard.rows <= start:
                done += shard.rows
                continue
            tensors = self.store.read_shard(shard.index)
            for lo in range(max(0, start - done), shard.rows, self.chunk_rows):
                hi = min(lo + self.chunk_rows, shard.rows)
                yield TokenChunk(
                    tensors["activations"][lo:hi],
                    tensors["token_ids"][lo:hi],
                    tensors["doc_ids"][lo:hi],
                    tensors["positions"][lo:hi],
                    done + hi,
                )
            done += shard.rows


class HarvestStream:
    """Rows harvested on the fly from a model at one hook over a corpus (one forward batch a chunk)."""

    def __init__(self, loaded, hook: str, corpus):
        from hsae.sources.hf import Harvester

        self.loaded, self.hook, self.corpus = loaded, hook, corpus
        self.harvester = Harvester(loaded, [hook])

    total_rows = None  # as many as the corpus gives

    def describe(self) -> dict[str, Any]:
        corpus = self.corpus.describe() if hasattr(self.corpus, "describe") else {"kind": "texts"}
        return {"kind": "model", "hook": self.hook, "model": self.loaded.describe(), "corpus": corpus}

    def label_names(self) -> list[str] | None:
        return None  # text: token ids are the tokenizer's

    def load_model(self):
        return self.loaded

    def chunks(self, place: list[int] | None = None) -> Iterator[TokenChunk]:
        start = (int(place[0]), int(place[1])) if place else (0, 0)
        for batch in self.harvester.batches(self.corpus, start):
            rows = batch.rows
            if self.hook not in rows.activations:
                raise HsaeError(f"the harvester gave no rows for hook {self.hook!r}")
            yield TokenChunk(
                rows.activations[self.hook].float(),
                rows.token_ids,
                rows.doc_ids,
                rows.positions,
                list(batch.end),
            )


def open_stream(
    record: dict[str, Any],
    *,
    data: str | None = None,
    corpus: str | None = None,
    model: str | None = None,
    hook: str | None = None,
    chunk_rows: int = 4096,
):
    """The rows to find examples in: `--data STORE`, or `--corpus C [--model M --hook H]` harvested on
    the fly, else what the model's config (`record`, its "data" section) says it was trained on."""
    from hsae.store import ActivationStore

    saved = record.get("data") or {}
    if data is not None and corpus is not None:
        raise HsaeError("give --data (a store) or --corpus (harvest on the fly), not both")
    if data is None and corpus is None:
        if saved.get("kind") == "store" and saved.get("path"):
            data = saved["path"]
        elif saved.get("kind") == "model":
            spec = saved.get("corpus") or {}
            corpus = spec.get("path") or spec.get("name")
        if data is None and corpus is None:
            raise HsaeError(
                "the model's config names no store or corpus with token ids (it trained on "
                f"{saved.get('kind', 'unknown data')}): pass --data STORE or --corpus C --model M --hook H"
            )
    saved_hook = saved.get("hook")
    if data is not None:
        path = Path(data)
        if not (path / "manifest.json").is_file():
            raise HsaeError(f"--data {data} is not an activation store: examples need a store (token ids, documents)")
        store = None
        if hook is None and saved_hook:  # the hook the model trained on, where the store holds it
            try:
                store = ActivationStore.open(path, hook=saved_hook, max_norm_ratio=0)
            except HsaeError:
                store = None
        if store is None:
            store = ActivationStore.open(path, hook=hook, max_norm_ratio=0)
        return StoreStream(store, chunk_rows)
    from hsae.sources.hf import load_model
    from hsae.sources.text import open_corpus

    recorded, recorded_hook = recorded_model(record)
    return HarvestStream(load_model(model or recorded), hook or recorded_hook, open_corpus(str(corpus)))


def recorded_model(record: dict[str, Any]) -> tuple[str | None, str]:
    """(model folder or name, hook) a model's config says it was trained on; None is the embedded
    default model, and its default hook where none is recorded."""
    from hsae.sources.hf import DEFAULT_HOOK

    saved = record.get("data") or {}
    model = saved.get("model") or {}
    path = model.get("path")
    return (path if path and Path(path).is_dir() else model.get("name")), saved.get("hook") or DEFAULT_HOOK
