"""The browser's image API on a tiny image model (test_serve_images_fixtures.py): a feature's top images
from concepts.json (values, heatmaps, the concept's name, caption word and label) or from the examples
file (image + cell, the windows' heatmap), the pictures as PNG bytes, 404s with messages, no path
traversal through images.json, IDX collections decoded through hsae.sources.images, text-model
answers unchanged, and the static export writing the top images only."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from hsae.serve.app import create_app
from hsae.serve.export import export_site
from hsae.serve.images import StoreImages, image_store_of
from test_serve_images_fixtures import image_model, image_model_with_examples, picture

pytestmark = pytest.mark.slow  # harvests and trains (about 5 s)


@pytest.fixture(scope="module")
def built():
    store, model = image_model()
    _, with_examples = image_model_with_examples()
    return store, model, with_examples


@pytest.fixture(scope="module")
def client(built):
    return TestClient(create_app([built[1], built[2]]))


def concepts_of(model) -> dict:
    return json.loads((model / "concepts.json").read_text())


def retarget(model, store, folder):
    """A copy of `model` whose config.json says it trained on `store`."""
    copy = shutil.copytree(model, folder)
    config = json.loads((copy / "config.json").read_text())
    config["data"]["path"] = str(store)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_the_model_says_where_its_images_are(client, built):
    store = built[0]
    model = client.get("/api/model").json()
    pics = str((store.parent / "pics").resolve())
    expected = {"store": str(store), "images": 12, "collection": "image_folder", "path": pics, "grid": [4, 4]}
    assert model["images"] == {**expected, "pad_square": True}
    assert model["concepts"]["named"] == 2 and model["concepts"]["source"] == "head"
    assert model["missing_examples"] is None and model["images_problem"] is None
    assert model["model"] == str(store.parent / "vit") and model["hook"] == "vit.layernorm"


def test_a_feature_shows_its_concepts_top_images_with_heatmaps(client, built):
    report = concepts_of(built[1])
    for entry in report["concepts"]:
        f = client.get(f"/api/features/{entry['latent']}").json()
        images = f["images"]
        assert images["source"] == "concepts" and images["grid"] == [4, 4] and images["pad_square"] is True
        assert [i["id"] for i in images["items"]] == entry["top_images"]
        assert [i["value"] for i in images["items"]] == entry["top_values"]
        shown = [i["heatmap"] for i in images["items"]]
        assert shown == entry["heatmaps"] and all(h is not None for h in shown)  # every top image has one
        first = images["items"][0]
        record = json.loads((built[0] / "images.json").read_text())["images"][first["id"]]
        assert (first["name"], first["label"], first["caption"]) == (record["name"], record["label"], record["caption"])
        assert images["concept"]["label"] == entry["label"] and images["concept"]["word"] == entry["word"]
        assert images["concept"]["name"] == entry["name"] and images["concept"]["source"] == "head"
        assert f["label"] == entry["name"]  # a concept's name is the feature's label (forest, search)
    named = next(e for e in report["concepts"] if e["name"])
    hits = client.get("/api/search", params={"q": named["name"]}).json()["items"]
    assert named["latent"] in [h["id"] for h in hits]
    silent = next(j for j in range(24) if j not in {e["latent"] for e in report["concepts"]})
    assert client.get(f"/api/features/{silent}").json()["images"]["items"] == []


def test_without_concepts_the_examples_file_gives_image_and_cell(client, built):
    report = {e["latent"]: e for e in concepts_of(built[1])["concepts"]}
    compared = 0
    for latent in (1, 2, 22):
        items = client.get(f"/api/features/{latent}", params={"model": "sae-examples"}).json()["images"]["items"]
        assert items and len({i["id"] for i in items}) == len(items)  # one card per image
        assert [i["value"] for i in items] == sorted((i["value"] for i in items), reverse=True)
        for item in items:
            if item["cell"] is not None:
                assert item["heatmap"][item["cell"]] == pytest.approx(item["value"], abs=1e-4)
            # the windows' cells agree with the concept's own heatmap of the image (patch rows)
            concept = report[latent]
            if item["heatmap"] and item["id"] in concept["top_images"][:3]:
                full = concept["heatmaps"][concept["top_images"].index(item["id"])]
                known = [(v, full[c]) for c, v in enumerate(item["heatmap"]) if v is not None]
                assert [v for v, _ in known] == pytest.approx([w for _, w in known], abs=1e-3)
                compared += len(known)
    assert compared > 0


def test_pictures_are_png_bytes_of_the_listed_files(client, built):
    records = json.loads((built[0] / "images.json").read_text())["images"]
    for image in (0, 5, 11):
        response = client.get(f"/api/images/{image}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.headers["x-content-type-options"] == "nosniff"
        got = np.asarray(Image.open(io.BytesIO(response.content)))
        number = int(records[image]["name"].split("/p")[1][:2])
        assert got.shape == (24, 40, 3) and (got == np.asarray(picture(number))).all()
    big = Image.new("RGB", (1200, 600), (9, 9, 9))
    big.save(built[0].parent / "pics" / "red" / "p00.png")  # a larger file is shrunk to 256 on its long side
    try:
        red = next(r["id"] for r in records if r["name"] == "red/p00.png")
        assert Image.open(io.BytesIO(client.get(f"/api/images/{red}").content)).size == (256, 128)
    finally:
        picture(0).save(built[0].parent / "pics" / "red" / "p00.png")


def test_unknown_images_are_404_with_a_message(client, built, tmp_path):
    for path in ("/api/images/12", "/api/images/-1", f"/api/images/{10**12}"):
        response = client.get(path)
        assert response.status_code == 404 and "images.json lists images 0..11" in response.json()["detail"]
    assert client.get("/api/images/abc").status_code == 422
    moved = retarget(built[1], tmp_path / "gone", tmp_path / "moved")
    other = TestClient(create_app([moved]))
    response = other.get("/api/images/0")
    assert response.status_code == 404 and "is missing (moved or deleted)" in response.json()["detail"]
    named = next(e for e in concepts_of(built[1])["concepts"] if e["name"])
    f = other.get(f"/api/features/{named['latent']}").json()
    assert "is missing" in f["images"]["problem"] and f["images"]["items"] == []
    assert f["label"] == f["images"]["concept"]["name"] == named["name"]  # the names still show
    assert "is missing" in other.get("/api/model").json()["images_problem"]


def test_images_json_cannot_lead_outside_the_collection(built, tmp_path):
    store, model, _ = built
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(secret)
    tampered = shutil.copytree(store, tmp_path / "store")
    (store.parent / "pics" / "red" / "link.png").unlink(missing_ok=True)
    os.symlink(secret, store.parent / "pics" / "red" / "link.png")
    try:
        index = json.loads((tampered / "images.json").read_text())
        pics = (store.parent / "pics").resolve()
        names = {0: os.path.relpath(secret, pics), 1: "red/link.png", 2: str(secret), 3: "red/p00.txt",
                 4: "red/../../" + secret.name}  # fmt: skip
        for image, name in names.items():
            index["images"][image]["name"] = name
        (tampered / "images.json").write_text(json.dumps(index))
        client = TestClient(create_app([retarget(model, tampered, tmp_path / "model")]))
        for image in names:
            response = client.get(f"/api/images/{image}")
            assert response.status_code == 404 and "refused" in response.json()["detail"], image
        assert client.get("/api/images/5").status_code == 200  # the untouched records still serve
        for path in ("/api/images/..%2f..%2fsecret.png", "/api/images/%2e%2e", "/api/images/0/../../secret.png"):
            assert client.get(path).status_code in (404, 422), path
    finally:
        (store.parent / "pics" / "red" / "link.png").unlink()


def test_idx_images_are_decoded_through_the_collection(built, tmp_path):
    from hsae.sources.harvest import harvest_to_store
    from hsae.sources.images import open_images
    from hsae.sources.vision import ImageHarvester, load_vision_model, rows_for, write_image_index

    pixels = np.random.default_rng(0).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    idx = tmp_path / "idx"
    idx.mkdir()
    with gzip.open(idx / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">4B3I", 0, 0, 8, 3, 5, 28, 28) + pixels.tobytes())
    images = open_images(idx)
    harvester = ImageHarvester(load_vision_model(str(built[0].parent / "vit"), device="cpu"), ["vit.layernorm"])
    harvest_to_store(tmp_path / "store", harvester, images, tokens=rows_for(harvester, images))
    write_image_index(tmp_path / "store", images)
    served = StoreImages(tmp_path / "store")
    for i in range(5):
        got = np.asarray(Image.open(io.BytesIO(served.png(i))))
        assert (got == pixels[i][..., None]).all()
    index = json.loads((tmp_path / "store" / "images.json").read_text())
    index["images"][2]["name"] = "t10k[7]"  # images.json no longer matches the collection
    (tmp_path / "store" / "images.json").write_text(json.dumps(index))
    with pytest.raises(LookupError, match="collection changed since the store was harvested"):
        StoreImages(tmp_path / "store").png(2)


def test_which_models_are_image_models(built, tmp_path):
    store = built[0]
    assert image_store_of({"data": {"kind": "image_store", "path": str(store)}})[0] is not None  # hsae demo --vision
    assert image_store_of({"data": {"kind": "array"}}) == (None, None)  # trained on arrays: a text-like model
    gone = image_store_of({"data": {"kind": "image_store", "path": str(tmp_path / "none")}})
    assert gone[0] is None and "is missing" in gone[1]
    assert image_store_of({"data": {"kind": "store", "path": str(tmp_path / "none"), "model": {}}}) == (None, None)
    bare = shutil.copytree(store, tmp_path / "bare")
    (bare / "images.json").unlink()
    problem = image_store_of({"data": {"kind": "store", "path": str(bare)}})[1]
    assert "has no images.json: run its `hsae harvest-images` command again" in problem


def test_a_text_model_has_no_image_fields_but_its_own(built, tmp_path):
    text_like = shutil.copytree(built[2], tmp_path / "text")
    config = json.loads((text_like / "config.json").read_text())
    config["data"] = {"kind": "array"}
    (text_like / "config.json").write_text(json.dumps(config))
    client = TestClient(create_app([text_like]))
    f = client.get("/api/features/1").json()
    assert f["images"] is None and f["examples"]["top"] and f["missing_examples"] is None
    assert client.get("/api/model").json()["images"] is None
    response = client.get("/api/images/0")
    assert response.status_code == 404 and "not trained on an image store" in response.json()["detail"]


def test_static_export_writes_the_top_images_only(built, tmp_path):
    out = export_site(built[1], tmp_path / "site")
    shown = {i for e in concepts_of(built[1])["concepts"] for i in e["top_images"]}
    written = {int(p.stem) for p in (out / "images" / "sae").glob("*.png")}
    assert written == shown
    for image in written:
        assert Image.open(out / "images" / "sae" / f"{image}.png").size == (40, 24)
    feature = json.loads((out / "data" / "sae" / "features" / "1.json").read_text())
    assert feature["images"]["items"] and feature["images"]["source"] == "concepts"
    few = shutil.copytree(built[1], tmp_path / "few")
    report = concepts_of(few)
    first = report["concepts"][0]
    report["concepts"] = [{**first, "top_images": first["top_images"][:2], "top_values": first["top_values"][:2]}]
    (few / "concepts.json").write_text(json.dumps(report))
    out = export_site(few, tmp_path / "few-site")
    assert {p.name for p in (out / "images" / "few").iterdir()} == {f"{i}.png" for i in first["top_images"][:2]}


def test_damaged_image_files_are_named_with_the_fix(built, tmp_path):
    from hsae.errors import HsaeError

    store, model, _ = built
    damaged = shutil.copytree(store, tmp_path / "store")
    (damaged / "images.json").write_text("[1, 2")
    problem = create_app([retarget(model, damaged, tmp_path / "a")])
    detail = TestClient(problem).get("/api/model").json()["images_problem"]
    assert "images.json cannot be read" in detail and "hsae harvest-images" in detail
    broken = shutil.copytree(model, tmp_path / "b")
    (broken / "concepts.json").write_text(json.dumps({"concepts": [{"name": "x"}]}))
    with pytest.raises(HsaeError, match="not hsae's concepts file.*write it again with `hsae concepts`"):
        create_app([broken])
