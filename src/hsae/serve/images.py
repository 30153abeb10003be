"""The pictures of an image model, for the browser: which store the model was trained on, its
images.json, the grid layout, each feature's top images (from concepts.json, else the examples file),
and each picture as PNG bytes.

Pictures are read only from the files images.json lists: a folder collection's file is resolved
inside the collection's folder (a name that leads outside it, by `..` or a link, is refused); IDX and
`datasets` collections are decoded through hsae.sources.images, and an item whose name no longer
matches images.json is refused (the collection changed since the harvest). Every picture is decoded
and written again as a PNG, so the bytes served are always an image hsae made, never a file's own.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

from hsae.errors import HsaeError
from hsae.interpret.concepts import CONCEPTS_FILE
from hsae.interpret.examples_db import Example
from hsae.sources.images import IMAGE_SUFFIXES, ImageCollection, UnreadableImage, open_picture
from hsae.sources.vision import IMAGE_INDEX
from hsae.store import read_manifest

FOLDER_KINDS = ("image_folder", "tuxpaint")  # collections whose images are files under collection.path
MAX_SIDE = 256  # pixels on a picture's long side: the page draws them 168 CSS px wide (x the pixel ratio)
MAX_SHOWN = 12  # top images per feature


class ImageNotFound(LookupError):
    """An image id this model's store does not list, or a picture that cannot be served."""


class StoreImages:
    """The images of one image store: images.json's records, the grid and padding, and the pictures."""

    def __init__(self, store: Path):
        manifest = read_manifest(store) or {}
        index = json.loads((store / IMAGE_INDEX).read_text())
        harvest = manifest.get("harvest") or {}
        self.store = store
        self.records: list[dict[str, Any]] = index["images"]
        self.collection: dict[str, Any] = index["collection"]
        # a pooled store records its map's grid too, but has no rows on it to draw
        self.grid: list[int] | None = harvest.get("grid") if harvest.get("rows_per_image", 1) > 1 else None
        self.pad_square = bool(harvest.get("pad_square", False))
        self.model_name = (manifest.get("model") or {}).get("name")
        self.hook = ((manifest.get("hooks") or [{}])[0]).get("name")
        self._opened: ImageCollection | None = None
        self._lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {
            "store": str(self.store),
            "images": len(self.records),
            "collection": self.collection.get("kind"),
            "path": self.collection.get("path"),
            "grid": self.grid,
            "pad_square": self.pad_square,
        }

    def record(self, image: int) -> dict[str, Any]:
        if not self.lists(image):
            raise ImageNotFound(
                f"image {image} is not in this model's image store {self.store} "
                f"(its images.json lists images 0..{len(self.records) - 1})"
            )
        return self.records[image]

    def lists(self, image: int) -> bool:
        """Whether images.json lists an image of this id."""
        return 0 <= image < len(self.records) and self.records[image].get("id") == image

    def card(self, image: int) -> dict[str, Any]:
        """What the page writes beside a picture: its name, label and caption."""
        r = self.record(image)
        return {"id": image, "name": r.get("name"), "label": r.get("label"), "caption": r.get("caption")}

    # -- pictures ------------------------------------------------------------------------------

    def picture(self, image: int):
        """The image as an RGB PIL image, decoded from the file images.json lists for it."""
        record = self.record(image)
        name = str(record.get("name") or "")
        try:
            if self.collection.get("kind") in FOLDER_KINDS:
                return open_picture(self._file(image, name), name)
            collection = self._collection()
            if image >= len(collection) or collection.items[image].name != name:
                raise ImageNotFound(
                    f"image {image} ({name}) is no longer at that place in {self.collection.get('path')}: the "
                    "collection changed since the store was harvested (harvest it again)"
                )
            return collection.open(collection.items[image])
        except UnreadableImage as err:
            raise ImageNotFound(f"image {image}: {err}") from None

    def png(self, image: int, max_side: int = MAX_SIDE) -> bytes:
        """The picture, shrunk to at most `max_side` pixels on its long side, as PNG bytes."""
        picture = self.picture(image)
        picture.thumbnail((max_side, max_side))
        out = io.BytesIO()
        picture.save(out, format="PNG")
        return out.getvalue()

    def _file(self, image: int, name: str) -> Path:
        root = Path(str(self.collection.get("path") or "")).resolve()
        if not name or Path(name).is_absolute() or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            raise ImageNotFound(f"image {image}'s file {name!r} is not an image path inside its collection: refused")
        file = (root / name).resolve()
        if not file.is_relative_to(root):
            raise ImageNotFound(f"image {image}'s file {name!r} lies outside its collection {root}: refused")
        if not file.is_file():
            raise ImageNotFound(
                f"image {image}'s file {file} is missing: the collection {root} moved or changed since the "
                "store was harvested (put it back, or harvest again)"
            )
        return file

    def _collection(self) -> ImageCollection:
        """The IDX or `datasets` collection, opened once (its index can be large)."""
        from hsae.sources.images import dataset_images, fashion_mnist

        with self._lock:
            if self._opened is None:
                kind, path = self.collection.get("kind"), str(self.collection.get("path") or "")
                try:
                    if kind == "idx":
                        self._opened = fashion_mnist(path, str(self.collection.get("split") or "train"))
                    elif kind == "hf_dataset":
                        self._opened = dataset_images(path, image_column=self.collection.get("image_column", "image"))
                    else:
                        raise ImageNotFound(f"images of kind {kind!r} ({path}) cannot be shown: this hsae reads "
                                            f"{', '.join((*FOLDER_KINDS, 'idx', 'hf_dataset'))}")  # fmt: skip
                except HsaeError as err:
                    raise ImageNotFound(f"the images of {self.store} cannot be opened: {err}") from None
            return self._opened

    # -- a feature's top images ----------------------------------------------------------------

    def from_concept(self, entry: dict[str, Any]) -> list[dict[str, Any]]:
        """A concepts.json entry's top images with their values and heatmaps (concepts.json holds
        heatmaps for the first few only); ids images.json does not list (a stale file) are left out."""
        maps = entry.get("heatmaps") or []
        pairs = zip(entry.get("top_images") or [], entry.get("top_values") or [], strict=False)
        items = []
        for i, (image, value) in enumerate(pairs):
            if self.lists(int(image)):
                heatmap = maps[i] if i < len(maps) else None
                items.append({**self.card(int(image)), "value": value, "heatmap": heatmap, "cell": None})
        return items[:MAX_SHOWN]

    def from_examples(self, examples: list[Example]) -> list[dict[str, Any]]:
        """Top examples (rows) grouped by image, best first: each image's best value and its cell
        (None for a whole-image row), and a heatmap of what the examples' windows saw of the grid
        (None in cells no window reached; None in all when the store has no grid rows)."""
        cells = self.grid[0] * self.grid[1] if self.grid else 0
        by_image: dict[int, dict[str, Any]] = {}
        for e in sorted(examples, key=lambda e: -e.value):
            if not self.lists(e.doc) or (e.doc not in by_image and len(by_image) == MAX_SHOWN):
                continue
            if e.doc not in by_image:
                cell = e.position if 0 <= e.position < cells else None
                by_image[e.doc] = {
                    **self.card(e.doc),
                    "value": round(e.value, 4),
                    "cell": cell,
                    "heatmap": [None] * cells,
                }
            heatmap = by_image[e.doc]["heatmap"]
            # A window is the rows around the example's within its image, in harvest order: the
            # image's grid cells row-major (after its whole-image row, "cell -1", where there is one).
            for offset, act in enumerate(e.acts):
                cell = e.position - e.peak + offset
                if 0 <= cell < cells:
                    heatmap[cell] = round(act if heatmap[cell] is None else max(act, heatmap[cell]), 4)
        items = list(by_image.values())
        for item in items:
            if all(v is None for v in item["heatmap"]):
                item["heatmap"] = None
        return items


def image_store_of(record: dict[str, Any]) -> tuple[StoreImages | None, str | None]:
    """(the images of the image store a model's config says it trained on, or None; a problem to
    show when the model is an image model whose images cannot be found)."""
    data = record.get("data") or {}
    path = data.get("path")
    vision = (data.get("model") or {}).get("modality") == "vision" or data.get("kind") == "image_store"
    if not path or data.get("kind") not in ("store", "image_store"):
        return None, None
    store = Path(path)
    try:
        manifest = read_manifest(store)
    except HsaeError as err:
        return None, str(err) if vision else None
    if manifest is None:
        problem = f"the image store {store} this model was trained on is missing (moved or deleted): put it back"
        return None, problem if vision else None
    if (manifest.get("model") or {}).get("modality") != "vision":
        return None, None
    rerun = f"run its `hsae harvest-images` command again to write {IMAGE_INDEX}"
    if not (store / IMAGE_INDEX).is_file():
        return None, f"the image store {store} has no {IMAGE_INDEX}: {rerun}"
    try:
        return StoreImages(store), None
    except (OSError, ValueError, KeyError, TypeError) as err:  # unreadable or not hsae's images.json
        return None, f"{store / IMAGE_INDEX} cannot be read ({type(err).__name__}: {err}): {rerun}"


def read_concepts(directory: Path) -> dict[str, Any] | None:
    """The model's concepts.json (`hsae concepts`), or None; a damaged one is an error naming the fix."""
    path = directory / CONCEPTS_FILE
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
        if not all(isinstance(e, dict) and isinstance(e["latent"], int) for e in report["concepts"]):
            raise ValueError("a concept without its latent")
    except (ValueError, KeyError, TypeError) as err:
        raise HsaeError(f"{path} is not hsae's concepts file ({err}): write it again with `hsae concepts`") from None
    return report
