"""End to end: `hsae serve` in a subprocess, the page driven in headless Chromium (Debian's, through
Playwright; no browser is ever downloaded): expand a root, open a child, see its highlighted contexts,
search a label, open a shared link; corpus markup renders as text; an image model's feature shows its
top images with the heatmap drawn over the padded picture, served and from a static export."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import hsae
from interpret_fixtures import XSS, XSS_IMG, gpt2_model, minilm_model
from test_serve_images_fixtures import MARKUP, image_model, image_model_with_examples

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (scripts/setup.sh)"),
]
playwright_api = pytest.importorskip("playwright.sync_api")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(command: list[str], ready: str) -> Iterator[str]:
    """A server process on a free port: its base URL once `ready` answers; stopped on exit."""
    port = free_port()
    process = subprocess.Popen(
        [arg.replace("{port}", str(port)) for arg in command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}{ready}", timeout=1)
                break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(process.stdout.read().decode()) from None
                time.sleep(0.25)
        else:
            raise RuntimeError(f"{command[:4]} did not answer {ready} within 30 s")
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    model = shutil.copytree(minilm_model(), root / "minilm")
    sae = hsae.load(model)
    parents = sae.hierarchy()
    parents[:] = -1
    parents[[1, 2]] = 0  # a root with two children
    sae.set_hierarchy(parents)
    record = json.loads((model / "config.json").read_text())
    sae.save(model, record={k: v for k, v in record.items() if k != "sae"})
    serve = [sys.executable, "-m", "hsae", "serve", str(model), str(gpt2_model()), "--port", "{port}"]
    with serving(serve, "/api/models") as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        context = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield context
        context.close()


def test_expand_a_root_open_a_child_see_its_contexts_and_search(server, browser):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(server + "/")
    page.wait_for_selector("[data-testid=roots] li.node")
    page.click("[data-testid=toggle-0]")
    child = page.locator("li.node[data-id='0'] ul.kids a.flink").first
    child.wait_for()
    child_id = int(child.get_attribute("data-id"))
    assert child_id in (1, 2)
    child.click()
    page.wait_for_selector("[data-testid=feature-title]")
    assert page.inner_text("[data-testid=feature-title]") == f"Feature {child_id}"
    assert page.url.endswith(f"/features/{child_id}?model=minilm")  # a link of its own
    highlighted = page.locator("[data-testid=top-contexts] .tok.active")
    assert highlighted.count() > 0
    colour = highlighted.first.evaluate("e => getComputedStyle(e).backgroundColor")
    assert colour.startswith("rgb") and colour != "rgba(0, 0, 0, 0)"  # shaded by its activation
    label = page.inner_text("[data-testid=feature-label]")
    page.fill("#q", label.split(", ")[0])
    page.press("#q", "Enter")
    page.wait_for_selector("[data-testid=search-results] li")
    found = page.locator("[data-testid=search-results] a.flink")
    assert child_id in [int(found.nth(i).get_attribute("data-id")) for i in range(found.count())]
    page.go_back()  # history works inside the page
    page.goto(f"{server}/features/{child_id}?model=minilm")  # a shared link opens the feature directly
    page.wait_for_selector("[data-testid=top-contexts] .tok.active")
    page.goto(f"{server}/features/9999?model=minilm")
    assert "does not exist" in page.locator("[data-testid=error]").inner_text()
    assert errors == []


def test_markup_in_the_corpus_renders_as_text(server, browser):
    hits = json.load(urllib.request.urlopen(f"{server}/api/search?q={urllib.parse.quote(XSS)}&model=gpt2-sae"))
    latent = hits["items"][0]["id"]
    page = browser.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{server}/features/{latent}?model=gpt2-sae")
    page.wait_for_selector("[data-testid=top-contexts] .ctx")
    text = page.inner_text("#content")
    assert XSS in text and XSS_IMG in " ".join(text.split())  # shown as the characters they are
    injected = "document.querySelectorAll('#content script, #content img, #tree script, #tree img').length"
    assert page.evaluate(injected) == 0
    assert page.evaluate("document.scripts.length") == 1  # the page's own app.js only
    assert dialogs == []


def test_the_steering_box_runs_the_model(server, browser):
    page = browser.new_page()
    page.goto(f"{server}/features/3?model=gpt2-sae")
    page.wait_for_selector("[data-testid=steer]")
    page.click("[data-testid=steer]")
    page.wait_for_selector("[data-testid=steer-result] table")
    rows = page.locator("[data-testid=steer-result] tr")
    assert [rows.nth(i).locator("td").first.inner_text() for i in range(rows.count())] == ["without", "with"]


# --- image models -----------------------------------------------------------------------------

DRAWN = "n => document.querySelectorAll('[data-testid=image-canvas][data-drawn]').length === n"
PIXEL = (
    "([x, y]) => Array.from(document.querySelector('[data-testid=image-canvas]')"
    ".getContext('2d').getImageData(x, y, 1, 1).data)"
)


@pytest.fixture(scope="module")
def image_server():
    _, model = image_model()
    _, with_examples = image_model_with_examples()
    serve = [sys.executable, "-m", "hsae", "serve", str(model), str(with_examples), "--port", "{port}"]
    with serving(serve, "/api/models") as base:
        yield base


def hot_latent(base: str) -> tuple[int, dict]:
    """A concept whose first top image has a heatmap with cells on and off, and its images section."""
    for latent in range(24):
        images = json.load(urllib.request.urlopen(f"{base}/api/features/{latent}"))["images"]
        first = images["items"][0]["heatmap"] if images["items"] else None
        if images["concept"] and first and max(first) > 0 and min(first) == 0:
            return latent, images
    raise AssertionError("no named concept with a partly active heatmap in the tiny image model")


def cell_centre(cell: int, side: int, grid: int = 4) -> list[int]:
    return [int((cell % grid + 0.5) * side / grid), int((cell // grid + 0.5) * side / grid)]


def test_an_image_feature_shows_its_top_images_with_the_heatmap_drawn(image_server, browser):
    latent, images = hot_latent(image_server)
    heatmap = images["items"][0]["heatmap"]
    page = browser.new_page()
    errors: list[str] = []
    dialogs: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{image_server}/features/{latent}?model=sae")
    page.wait_for_function(DRAWN, arg=len(images["items"]))
    assert MARKUP in page.inner_text("[data-testid=top-images]")  # captions shown as the characters they are
    assert page.evaluate("document.querySelectorAll('#content img').length") == 0 and dialogs == []
    assert page.locator("[data-drawn=heatmap]").count() == sum(1 for i in images["items"] if i["heatmap"])
    assert "concept" in page.inner_text("#content") and "class" in page.inner_text("#content")
    assert page.locator("[data-testid=steer]").count() == 0  # steering reads text
    side = page.evaluate("document.querySelector('[data-testid=image-canvas]').width")
    peak = max(v for item in images["items"] for v in item["heatmap"] or [0])
    cells = (heatmap.index(max(heatmap)), heatmap.index(0))  # the image's hottest cell, and one where it is off
    with_heat = [page.evaluate(PIXEL, cell_centre(c, side)) for c in cells]
    page.uncheck("[data-testid=heatmap-toggle]")
    page.wait_for_selector("[data-testid=image-canvas][data-drawn=picture]")
    plain = [page.evaluate(PIXEL, cell_centre(c, side)) for c in cells]
    # at a cell's centre the overlay is that cell's colour on the ramp, alpha-blended over the picture
    for cell, shown, under in zip(cells, with_heat, plain, strict=True):
        *colour, alpha = page.evaluate("([v, p]) => heatColour(v, p)", [heatmap[cell], peak])
        expected = [round(u * (1 - alpha) + c * alpha) for u, c in zip(under[:3], colour, strict=True)]
        assert shown[:3] == pytest.approx(expected, abs=3) and shown != under, (cell, shown, under)
    assert page.evaluate("([v, p]) => heatColour(v, p)", [peak, peak])[:3] == [170, 0, 0]  # red at the peak
    assert page.evaluate("([v, p]) => heatColour(v, p)", [0, peak])[:3] == [0, 0, 140]  # dark blue where off
    # the picture (40 x 24) drawn as the model saw it: centred on a white square
    assert page.evaluate(PIXEL, [side // 2, 4]) == [255, 255, 255, 255]
    assert page.evaluate(PIXEL, [side // 2, side // 2]) != [255, 255, 255, 255]
    page.goto(f"{image_server}/features/{latent}?model=sae-examples")  # no concepts.json: the examples file
    page.wait_for_selector("[data-testid=image-canvas][data-drawn=heatmap]")
    assert "from the examples file" in page.inner_text("#content")
    assert errors == []


def test_a_static_export_shows_the_images_too(image_server, browser, tmp_path):
    from hsae.serve.export import export_site

    latent, images = hot_latent(image_server)
    site = export_site(image_model()[1], tmp_path / "site")
    with serving([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "-d", str(site), "{port}"], "/") as base:
        page = browser.new_page()
        page.goto(f"{base}/#/features/{latent}?model=sae")
        page.wait_for_function(DRAWN, arg=len(images["items"]))
        assert page.locator("[data-drawn=missing]").count() == 0  # every picture it shows was exported
        assert page.locator("[data-drawn=heatmap]").count() == sum(1 for i in images["items"] if i["heatmap"])
