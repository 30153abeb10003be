"""End to end: `hsae serve` in a subprocess, the page driven in headless Chromium (Debian's, through
Playwright; no browser is ever downloaded): expand a root, open a child, see its highlighted contexts,
search a label, open a shared link; corpus markup renders as text."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

import hsae
from interpret_fixtures import XSS, XSS_IMG, gpt2_model, minilm_model

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
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "hsae", "serve", str(model), str(gpt2_model()), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/api/models", timeout=1)
                break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(process.stdout.read().decode()) from None
                time.sleep(0.25)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


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
