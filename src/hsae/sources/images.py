"""Image collections: numbered images with a label and an optional caption, read as RGB pictures.

An `ImageCollection` is re-iterable and deterministic: its images are numbered 0, 1, 2, ... in one
fixed order (the store keeps that number, `doc_ids`, for every row), each with a label index into
`labels` (-1 when it has none) and a caption (or None).

- `image_folder(path)`: every raster image under the folder (.png .jpg .jpeg .bmp .gif .webp .tif
  .tiff), in sorted path order. Label: the folder path relative to the root ("animals/birds"; "." for
  the root itself). Caption: the first non-blank line of a sidecar `<name>.txt` (TuxPaint's stamps
  carry one-line English captions, followed by translations we do not read).
- `fashion_mnist(path)`: the IDX files of (Fashion-)MNIST (`train-images-idx3-ubyte[.gz]` and
  `train-labels-idx1-ubyte[.gz]`, or the `t10k` split), with Fashion-MNIST's class names when there
  are ten classes.
- `dataset_images(path)`: a `datasets` image column: a folder written by `save_to_disk` or parquet
  files (images as {bytes, path} structs), with a ClassLabel column's names and an optional caption
  column; read with pyarrow (no `datasets` needed).
- `tuxpaint_stamps()`: Debian's `tuxpaint-stamps-default` (about 800 PNGs in a 2-5 level concept
  tree), the embedded vision default.
- `open_images(spec)` picks one of these from a path or "tuxpaint".

`open_picture` decodes one image to RGB (transparency composited on white). An unreadable or
truncated file raises `UnreadableImage` naming it; harvesters skip such images and count them.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hsae.errors import HsaeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
TUXPAINT = "tuxpaint"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
BACKGROUND = (255, 255, 255)  # transparent pixels become white


class UnreadableImage(HsaeError):
    """An image file that cannot be decoded (missing, truncated, not an image)."""


@dataclass(frozen=True)
class ImageItem:
    index: int  # the image's number in its collection (doc_ids in a store)
    name: str  # path relative to the collection's root, or "<split>[<row>]"
    label: int  # index into the collection's labels, -1 for none
    caption: str | None


class ImageCollection:
    """A named, numbered, re-iterable set of images with labels and captions."""

    def __init__(
        self,
        name: str,
        items: Sequence[ImageItem],
        labels: Sequence[str],
        read_bytes: Callable[[ImageItem], Any],
        info: dict[str, Any],
    ):
        if not items:
            raise HsaeError(f"image collection {name} holds no image")
        self.name = name
        self.items = list(items)
        self.labels = list(labels)
        self._read = read_bytes  # ImageItem -> a path, bytes, or a PIL image
        self._info = info

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[ImageItem]:
        return iter(self.items)

    def open(self, item: ImageItem):
        """The item's picture as an RGB PIL image (UnreadableImage if it cannot be decoded)."""
        try:
            source = self._read(item)
        except OSError as err:
            raise UnreadableImage(f"image {item.name} of {self.name} cannot be read ({err})") from None
        return open_picture(source, item.name)

    def label_name(self, item: ImageItem) -> str | None:
        return self.labels[item.label] if item.label >= 0 else None

    def describe(self) -> dict[str, Any]:
        """What a store records about its images (the per-image index goes to `index_records`)."""
        return {**self._info, "images": len(self.items), "labels": list(self.labels)}

    def head(self, n: int) -> ImageCollection:
        """The first n images (same numbering and labels), e.g. for a quick run."""
        if n <= 0:
            raise HsaeError(f"the number of images must be positive, got {n}")
        if n >= len(self.items):
            return self
        return ImageCollection(self.name, self.items[:n], self.labels, self._read, {**self._info, "first": n})

    def index_records(self) -> list[dict[str, Any]]:
        """One record per image: id, name, label (its name) and caption."""
        return [
            {"id": it.index, "name": it.name, "label": self.label_name(it), "caption": it.caption} for it in self.items
        ]


def open_picture(source: Any, name: str):
    """A path, bytes or PIL image, decoded whole to RGB (alpha composited on white)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(source, Image.Image):
            image = source
        else:
            image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        image.load()  # decodes now: a truncated file fails here, not later in a batch
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        reason = str(err).strip() or type(err).__name__
        raise UnreadableImage(f"image {name} cannot be decoded ({reason})") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def pad_to_square(image):
    """The picture centred on a white square (objects keep their shape through a square resize)."""
    from PIL import Image

    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), BACKGROUND)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


# --- image folders ----------------------------------------------------------------------------


def _caption_of(image: Path) -> str | None:
    sidecar = image.with_suffix(".txt")
    if not sidecar.is_file():
        return None
    try:
        text = sidecar.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return next((line.strip() for line in text.splitlines() if line.strip()), None)


def image_folder(path: str | os.PathLike, *, kind: str = "image_folder") -> ImageCollection:
    """Every image under `path`; label = its folder relative to `path`, caption = its sidecar .txt."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise HsaeError(f"image folder {root} does not exist (give a folder of images, e.g. one class per subfolder)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise HsaeError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    labels = sorted({str(p.parent.relative_to(root).as_posix()) for p in files})
    label_of = {name: i for i, name in enumerate(labels)}
    items = [
        ImageItem(i, p.relative_to(root).as_posix(), label_of[p.parent.relative_to(root).as_posix()], _caption_of(p))
        for i, p in enumerate(files)
    ]
    info = {"kind": kind, "path": str(root.resolve())}
    return ImageCollection(str(root), items, labels, lambda item: root / item.name, info)


def tuxpaint_stamps() -> ImageCollection:
    """Debian's tuxpaint-stamps-default images, as an image folder."""
    if not TUXPAINT_STAMPS.is_dir():
        raise HsaeError(
            f"the TuxPaint stamps are not installed ({TUXPAINT_STAMPS} is missing): "
            "apt-get install tuxpaint-stamps-default, or give a folder of images"
        )
    return image_folder(TUXPAINT_STAMPS, kind=TUXPAINT)


# --- IDX files (Fashion-MNIST) ----------------------------------------------------------------

_IDX_TYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (LeCun's MNIST format, optionally gzipped)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise HsaeError(f"{path} cannot be read ({err})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise HsaeError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    body = data[4 + 4 * ndim :]
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(body) != expected:
        raise HsaeError(f"{path} is truncated or damaged: {len(body)} bytes of data for shape {dims}")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def fashion_mnist(path: str | os.PathLike, split: str = "train") -> ImageCollection:
    """(Fashion-)MNIST from a folder of IDX files: `<split>-images-idx3-ubyte[.gz]` and, if present,
    `<split>-labels-idx1-ubyte[.gz]` (split "train" or "t10k")."""
    folder = Path(path).expanduser()
    images_file = _idx_file(folder, f"{split}-images-idx3-ubyte")
    if images_file is None:
        raise HsaeError(f"{folder} has no {split}-images-idx3-ubyte[.gz] (the Fashion-MNIST IDX files)")
    pixels = read_idx(images_file)
    if pixels.ndim != 3 or pixels.dtype != np.uint8:
        raise HsaeError(f"{images_file} holds {pixels.dtype} data of shape {pixels.shape}, not (n, rows, cols) bytes")
    labels_file = _idx_file(folder, f"{split}-labels-idx1-ubyte")
    label_ids = read_idx(labels_file) if labels_file is not None else None
    if label_ids is not None and label_ids.shape != (pixels.shape[0],):
        raise HsaeError(f"{labels_file} has {label_ids.shape[0]} labels for {pixels.shape[0]} images")
    n_classes = int(label_ids.max()) + 1 if label_ids is not None else 0
    labels = list(FASHION_MNIST_CLASSES) if n_classes == 10 else [str(i) for i in range(n_classes)]
    items = [
        ImageItem(i, f"{split}[{i}]", int(label_ids[i]) if label_ids is not None else -1, None)
        for i in range(pixels.shape[0])
    ]
    from PIL import Image

    info = {"kind": "idx", "path": str(folder.resolve()), "split": split}
    return ImageCollection(str(folder), items, labels, lambda item: Image.fromarray(pixels[item.index], "L"), info)


# --- datasets image columns ---------------------------------------------------------------------


def _arrow_tables(path: Path) -> tuple[list[Any], dict[str, Any]]:
    """(pyarrow tables in order, the dataset's `features` description) of a saved dataset folder,
    a parquet file or a folder of parquet files."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise HsaeError(f"reading images from {path} needs pyarrow: pip install pyarrow") from None
    if path.is_dir() and (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        path = path / ("train" if "train" in splits else splits[0])
    if path.is_dir() and (path / "state.json").is_file():
        state = json.loads((path / "state.json").read_text())
        info_file = path / "dataset_info.json"
        features = json.loads(info_file.read_text()).get("features", {}) if info_file.is_file() else {}
        tables = []
        for data_file in state["_data_files"]:
            with pa.memory_map(str(path / data_file["filename"])) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        return tables, features
    files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
    if not files or any(f.suffix != ".parquet" for f in files):
        raise HsaeError(f"{path} is neither a saved dataset folder nor parquet files")
    tables = [pq.read_table(f) for f in files]
    meta = (tables[0].schema.metadata or {}).get(b"huggingface")
    features = json.loads(meta).get("info", {}).get("features", {}) if meta else {}
    return tables, features


def dataset_images(
    path: str | os.PathLike,
    *,
    image_column: str = "image",
    label_column: str = "label",
    caption_column: str | None = None,
) -> ImageCollection:
    """Images of a `datasets` image column (saved dataset folder or parquet files); labels from a
    ClassLabel column when there is one, captions from `caption_column`."""
    source = Path(path).expanduser()
    if not source.exists():
        raise HsaeError(f"dataset {source} does not exist")
    tables, features = _arrow_tables(source)
    columns = tables[0].schema.names
    if image_column not in columns:
        raise HsaeError(
            f"dataset {source} has no image column {image_column!r} (columns: {columns}); pass --image-column"
        )
    if caption_column is not None and caption_column not in columns:
        raise HsaeError(f"dataset {source} has no caption column {caption_column!r} (columns: {columns})")
    cells = [cell for t in tables for cell in t.column(image_column).to_pylist()]
    label_ids: list[Any] = [None] * len(cells)
    labels: list[str] = []
    if label_column in columns:
        label_ids = [v for t in tables for v in t.column(label_column).to_pylist()]
        names = features.get(label_column, {}).get("names")
        labels = (
            list(names)
            if names
            else [str(i) for i in range(max((v for v in label_ids if v is not None), default=-1) + 1)]
        )
    captions = (
        [v for t in tables for v in t.column(caption_column).to_pylist()] if caption_column else [None] * len(cells)
    )
    items = [
        ImageItem(i, f"{source.name}[{i}]", int(label) if label is not None else -1, caption)
        for i, (label, caption) in enumerate(zip(label_ids, captions, strict=True))
    ]

    def read(item: ImageItem) -> Any:
        cell = cells[item.index]
        if isinstance(cell, dict) and cell.get("bytes"):
            return cell["bytes"]
        if isinstance(cell, dict) and cell.get("path"):
            return Path(cell["path"]) if Path(cell["path"]).is_absolute() else source / cell["path"]
        raise OSError("the image cell holds neither bytes nor a path")

    info = {"kind": "hf_dataset", "path": str(source.resolve()), "image_column": image_column}
    return ImageCollection(str(source), items, labels, read, info)


def open_images(spec: str | os.PathLike, *, caption_column: str | None = None) -> ImageCollection:
    """ "tuxpaint", a folder of IDX files, a saved dataset or parquet files, or a folder of images."""
    if str(spec) == TUXPAINT:
        return tuxpaint_stamps()
    path = Path(spec).expanduser()
    if not path.exists():
        raise HsaeError(f"images {path} do not exist (give 'tuxpaint', a folder of images, IDX files or a dataset)")
    if path.is_dir() and (_idx_file(path, "train-images-idx3-ubyte") or _idx_file(path, "t10k-images-idx3-ubyte")):
        return fashion_mnist(path, "train" if _idx_file(path, "train-images-idx3-ubyte") else "t10k")
    is_dataset = path.suffix == ".parquet" or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
    if is_dataset:
        return dataset_images(path, caption_column=caption_column)
    return image_folder(path)
