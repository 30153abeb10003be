"""The browser's JSON API and pages (FastAPI's test client): the forest, features, search, steering,
404s with messages, no path traversal, a model without examples, security headers, static export."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

import hsae
from hsae.errors import HsaeError
from hsae.serve.app import create_app
from hsae.serve.export import export_site
from interpret_fixtures import XSS, gpt2_model, minilm_model

FOREST = {1: 0, 2: 0, 3: 1, 5: 4}  # child -> parent, stored in a copy of the MiniLM model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    with_forest = shutil.copytree(minilm_model(), root / "minilm")
    sae = hsae.load(with_forest)
    parents = sae.hierarchy()
    parents[:] = -1
    for child, parent in FOREST.items():
        parents[child] = parent
    sae.set_hierarchy(parents)
    record = json.loads((with_forest / "config.json").read_text())
    sae.save(with_forest, record={k: v for k, v in record.items() if k != "sae"})
    (with_forest / "eval").mkdir()
    (with_forest / "eval" / "report.html").write_text("<!doctype html><title>r</title><p>the report</p>")
    bare = shutil.copytree(minilm_model(), root / "bare")
    (bare / "examples.sqlite").unlink()
    return with_forest, bare, gpt2_model()


@pytest.fixture(scope="module")
def client(folders):
    return TestClient(create_app(list(folders)))


def test_models_and_the_forest(client, folders):
    assert [m["key"] for m in client.get("/api/models").json()] == ["minilm", "bare", "gpt2-sae"]
    model = client.get("/api/model").json()
    assert model["key"] == "minilm" and model["n_latents"] == 96 and model["edges"] == len(FOREST)
    assert model["missing_examples"] is None and model["labellers"] == ["offline"]
    roots = client.get("/api/features", params={"parent": -1, "limit": 1000}).json()
    assert roots["total"] == 96 - len(FOREST)
    ids = [r["id"] for r in roots["items"]]
    assert ids[:2] in ([0, 4], [4, 0])  # families first
    rest = [r["density"] for r in roots["items"][2:]]
    assert rest == sorted(rest, reverse=True)  # then by density
    page = client.get("/api/features", params={"parent": -1, "offset": 10, "limit": 5}).json()
    assert [r["id"] for r in page["items"]] == ids[10:15]
    kids = client.get("/api/features", params={"parent": 0}).json()
    assert sorted(k["id"] for k in kids["items"]) == [1, 2] and kids["items"][0]["parent"] == 0


def test_a_feature(client):
    f = client.get("/api/features/3").json()
    assert f["id"] == 3 and f["parent"] == 1 and [a["id"] for a in f["ancestors"]] == [0, 1]
    assert f["parent_summary"]["id"] == 1 and f["siblings"]["total"] == 0
    assert [n["cosine"] for n in f["neighbours"]] == sorted((n["cosine"] for n in f["neighbours"]), reverse=True)
    assert 3 not in [n["id"] for n in f["neighbours"]]
    assert f["label"] and f["labels"]["offline"]["label"] == f["label"]
    assert f["histogram"]["counts"] and len(f["histogram"]["edges"]) == len(f["histogram"]["counts"]) // 2 + 1
    top = f["examples"]["top"]
    assert top and all(len(e["tokens"]) == len(e["acts"]) and isinstance(e["tokens"][0], str) for e in top)
    assert top[0]["acts"][top[0]["peak"]] == pytest.approx(f["stats"]["max_act"], abs=1e-3)
    assert f["examples"]["quantile"] and f["promoted"] is None  # an encoder has no unembedding
    two = client.get("/api/features/2").json()
    assert [s["id"] for s in two["siblings"]["items"]] == [1]


def test_out_of_range_and_bad_ids_are_404_with_a_message(client):
    for path in ("/api/features/96", "/api/features/-5", "/api/features?parent=500"):
        response = client.get(path)
        assert response.status_code == 404 and "does not exist" in response.json()["detail"]
        assert "0..95" in response.json()["detail"]
    assert client.get("/api/features/abc").status_code == 422
    assert client.get("/features/7").status_code == 200
    assert client.get("/features/96").status_code == 404 and "<script src" in client.get("/features/96").text
    assert client.get("/features/abc").status_code == 404


def test_no_path_traversal_and_read_only(client):
    for path in ("/static/../app.py", "/static/%2e%2e/data.py", "/static/..%2fapp.py", "/static//etc/passwd"):
        assert client.get(path).status_code == 404, path
    response = client.get("/api/model", params={"model": "../../etc"})
    assert response.status_code == 404 and "no model" in response.json()["detail"]
    assert client.get("/report", params={"model": "../minilm"}).status_code == 404
    assert client.post("/api/model").status_code == 405
    assert client.get("/static/app.js").status_code == 200


def test_search_by_id_and_label(client):
    f = client.get("/api/features/3").json()
    word = f["label"].split(", ")[0]
    by_label = client.get("/api/search", params={"q": word}).json()
    assert 3 in [i["id"] for i in by_label["items"]]
    assert {i["match"] for i in by_label["items"]} <= {"label", "token", "id"}
    first = client.get("/api/search", params={"q": "7"}).json()["items"][0]
    assert first["id"] == 7 and first["match"] == "id"
    assert client.get("/api/search", params={"q": "x" * 201}).status_code == 422


def test_search_by_a_token_in_the_contexts(folders, tmp_path):
    unlabelled = shutil.copytree(folders[0], tmp_path / "unlabelled")
    (unlabelled / "labels.json").unlink()
    client = TestClient(create_app([unlabelled]))
    top = client.get("/api/features/4").json()["examples"]["top"]
    word = next(e["tokens"][e["peak"]].strip() for e in top if e["tokens"][e["peak"]].strip().isalpha())
    hits = client.get("/api/search", params={"q": word.upper()}).json()["items"]
    assert 4 in [i["id"] for i in hits] and {i["match"] for i in hits} == {"token"}


def test_model_without_examples_names_the_command(client, folders):
    model = client.get("/api/model", params={"model": "bare"}).json()
    assert model["missing_examples"] == f"hsae examples {folders[1]}" and model["examples"] is None
    f = client.get("/api/features/0", params={"model": "bare"}).json()
    assert f["missing_examples"] and "examples" not in f and f["neighbours"]


def test_report_and_security_headers(client):
    page = client.get("/")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    report = client.get("/report")
    assert report.status_code == 200 and "the report" in report.text
    assert "script-src" not in report.headers["content-security-policy"]  # no scripts at all there
    missing = client.get("/report", params={"model": "gpt2-sae"})
    assert missing.status_code == 404 and "hsae eval" in missing.text


def test_corpus_markup_is_returned_as_plain_json_strings(client):
    hits = client.get("/api/search", params={"q": XSS, "model": "gpt2-sae"}).json()["items"]
    assert hits, "the markup token should be found among the contexts"
    f = client.get(f"/api/features/{hits[0]['id']}", params={"model": "gpt2-sae"}).json()
    shown = [t for e in f["examples"]["top"] for t in e["tokens"]]
    assert any(XSS in t for t in shown)


def test_steering_a_causal_lm(client):
    r = client.get("/api/steer", params={"feature": 3, "scale": 80, "text": "the dog was", "model": "gpt2-sae"})
    body = r.json()
    assert r.status_code == 200 and body["kind"] == "generation" and body["plain"] != body["steered_text"]
    bad = {"feature": 3, "scale": "nan", "text": "a", "model": "gpt2-sae"}
    assert client.get("/api/steer", params=bad).status_code == 400
    assert client.get("/api/steer", params={**bad, "feature": 64, "scale": 1}).status_code == 404


def test_static_export(folders, tmp_path):
    out = export_site(folders[0], tmp_path / "site")
    assert '<meta name="hsae-static"' in (out / "index.html").read_text()
    assert (out / "static" / "app.js").is_file() and (out / "report.html").is_file()
    feature = json.loads((out / "data" / "minilm" / "features" / "3.json").read_text())
    assert feature["parent"] == 1 and feature["examples"]["top"]
    roots = json.loads((out / "data" / "minilm" / "children" / "-1.json").read_text())
    assert len(roots) == 96 - len(FOREST)
    search = json.loads((out / "data" / "minilm" / "search.json").read_text())
    assert len(search["summaries"]) == 96 and search["tokens"]
    export_site(folders[0], out)  # an earlier export is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(HsaeError, match="not an hsae site"):
        export_site(folders[0], tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
