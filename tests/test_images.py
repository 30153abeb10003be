"""Image collections (hsae.sources.images): a folder tree built here (labels = folder paths, captions
from sidecar .txt, transparency on white, unreadable files named), Fashion-MNIST IDX files,
`datasets` image columns (parquet and a saved dataset folder), and the TuxPaint stamps."""

from __future__ import annotations

import gzip
import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from hsae.errors import HsaeError
from hsae.sources.images import (
    FASHION_MNIST_CLASSES,
    TUXPAINT_STAMPS,
    UnreadableImage,
    dataset_images,
    fashion_mnist,
    image_folder,
    open_images,
    pad_to_square,
    tuxpaint_stamps,
)


def _png(path, size=(12, 8), color=(200, 30, 30, 255), mode="RGBA"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color[: len(mode)]).save(path)


@pytest.fixture
def tree(tmp_path):
    """animals/birds/{owl,crow}.png, animals/cat.jpg, vehicles/car.png (transparent), a truncated
    png, a text file that is not an image, and captions beside some."""
    root = tmp_path / "stamps"
    _png(root / "animals" / "birds" / "owl.png")
    _png(root / "animals" / "birds" / "crow.png", color=(0, 0, 0, 255))
    (root / "animals" / "birds" / "owl.txt").write_text("An owl.\nde.utf8=Eine Eule.\n")
    Image.new("RGB", (10, 10), (0, 128, 0)).save(root / "animals" / "cat.jpg")
    (root / "animals" / "cat.txt").write_text("\n  A cat on a mat.  \n")
    _png(root / "vehicles" / "car.png", color=(0, 0, 255, 0))  # fully transparent
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
    (root / "vehicles" / "broken.png").write_bytes(buf.getvalue()[:60])  # truncated
    (root / "vehicles" / "notes.png").write_text("not an image")
    (root / "vehicles" / "readme.md").write_text("ignored")
    return root


def test_folder_tree_numbers_images_by_path_with_folder_labels_and_captions(tree):
    images = image_folder(tree)
    names = [it.name for it in images]
    assert names == [
        "animals/birds/crow.png", "animals/birds/owl.png", "animals/cat.jpg",
        "vehicles/broken.png", "vehicles/car.png", "vehicles/notes.png",
    ]  # fmt: skip
    assert images.labels == ["animals", "animals/birds", "vehicles"]
    assert [images.label_name(it) for it in images][:3] == ["animals/birds", "animals/birds", "animals"]
    assert [it.caption for it in images][:3] == [None, "An owl.", "A cat on a mat."]
    assert [it.index for it in images] == list(range(6))
    described = images.describe()
    assert described["kind"] == "image_folder" and described["images"] == 6 and described["labels"] == images.labels
    assert images.index_records()[1] == {"id": 1, "name": "animals/birds/owl.png", "label": "animals/birds",
                                         "caption": "An owl."}  # fmt: skip


def test_pictures_are_rgb_with_transparency_on_white_and_bad_files_are_named(tree):
    images = image_folder(tree)
    owl = images.open(images.items[1])
    assert owl.mode == "RGB" and owl.size == (12, 8) and owl.getpixel((0, 0)) == (200, 30, 30)
    car = images.open(images.items[4])
    assert car.getpixel((3, 3)) == (255, 255, 255)  # transparent -> white
    for index, reason in ((3, "broken.png"), (5, "notes.png")):
        with pytest.raises(UnreadableImage, match=reason):
            images.open(images.items[index])
    assert isinstance(UnreadableImage("x"), HsaeError)


def test_pad_to_square_centres_the_picture_on_white():
    wide = Image.new("RGB", (10, 4), (0, 0, 0))
    square = pad_to_square(wide)
    assert square.size == (10, 10)
    assert square.getpixel((5, 0)) == (255, 255, 255) and square.getpixel((5, 5)) == (0, 0, 0)
    assert pad_to_square(square) is square


def test_head_keeps_numbering_and_labels(tree):
    images = image_folder(tree)
    first = images.head(2)
    assert len(first) == 2 and first.labels == images.labels and first.describe()["first"] == 2
    assert images.head(100) is images
    with pytest.raises(HsaeError, match="positive"):
        images.head(0)


def _idx(path, array: np.ndarray, code=0x08):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(">u1" if code == 0x08 else ">i4").tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_fashion_mnist_idx_files_with_class_names(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    labels = np.arange(12) % 10
    _idx(tmp_path / "train-images-idx3-ubyte.gz", pixels)
    _idx(tmp_path / "train-labels-idx1-ubyte", labels.astype(np.uint8))
    images = open_images(tmp_path)
    assert len(images) == 12 and images.labels == list(FASHION_MNIST_CLASSES)
    assert images.items[3].name == "train[3]" and images.label_name(images.items[2]) == "Pullover"
    picture = images.open(images.items[5])
    assert picture.mode == "RGB" and picture.size == (28, 28)
    assert np.array_equal(np.asarray(picture)[..., 0], pixels[5])
    assert fashion_mnist(tmp_path).describe()["kind"] == "idx"


def test_damaged_idx_files_are_clear_errors(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        b"\x00\x00\x08\x03" + struct.pack(">3I", 5, 28, 28) + b"\x00" * 9
    )
    with pytest.raises(HsaeError, match="truncated or damaged"):
        fashion_mnist(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(HsaeError, match="not an IDX file"):
        fashion_mnist(tmp_path)
    with pytest.raises(HsaeError, match="t10k-images-idx3-ubyte"):
        fashion_mnist(tmp_path, split="t10k")


def _encoded(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), color).save(buf, "PNG")
    return buf.getvalue()


def _image_table():
    pa = pytest.importorskip("pyarrow")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": _encoded((i * 40, 0, 0)), "path": None} for i in range(4)]
    return pa.table(
        {
            "image": pa.array(cells, type=image_type),
            "label": pa.array([1, 0, 1, 2], type=pa.int64()),
            "text": ["red 0", "red 1", "red 2", "red 3"],
        }
    )


FEATURES = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": ["cat", "dog", "owl"]}}


def test_parquet_image_column_with_class_label_names_and_captions(tmp_path):
    import pyarrow.parquet as pq

    table = _image_table()
    meta = {b"huggingface": json.dumps({"info": {"features": FEATURES}}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "train.parquet")
    images = dataset_images(tmp_path / "train.parquet", caption_column="text")
    assert len(images) == 4 and images.labels == ["cat", "dog", "owl"]
    assert [images.label_name(it) for it in images] == ["dog", "cat", "dog", "owl"]
    assert images.items[2].caption == "red 2"
    assert images.open(images.items[3]).getpixel((1, 1)) == (120, 0, 0)
    with pytest.raises(HsaeError, match="no image column 'picture'"):
        dataset_images(tmp_path / "train.parquet", image_column="picture")


def test_saved_dataset_folder(tmp_path):
    import pyarrow as pa

    folder = tmp_path / "ds"
    folder.mkdir()
    table = _image_table()
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": FEATURES}))
    images = open_images(folder)
    assert images.describe()["kind"] == "hf_dataset" and images.labels == ["cat", "dog", "owl"]
    assert images.open(images.items[1]).getpixel((0, 0)) == (40, 0, 0)


def test_open_images_refuses_what_is_not_there(tmp_path):
    with pytest.raises(HsaeError, match="do not exist"):
        open_images(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HsaeError, match="holds no images"):
        open_images(tmp_path / "empty")


@pytest.mark.skipif(not TUXPAINT_STAMPS.is_dir(), reason="Debian's tuxpaint-stamps-default (scripts/setup.sh)")
def test_tuxpaint_stamps_are_a_labelled_captioned_tree():
    stamps = tuxpaint_stamps()
    assert len(stamps) > 700 and len(stamps.labels) > 50
    assert sum(it.caption is not None for it in stamps) > 0.95 * len(stamps)
    frog = next(it for it in stamps if it.name == "animals/amphibians/frog.png")
    assert frog.caption == "A frog." and stamps.label_name(frog) == "animals/amphibians"
    assert stamps.describe()["kind"] == "tuxpaint"
