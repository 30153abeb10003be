"""The vision main job (hsae.cli.demo_vision.run_vision_demo) on the first TuxPaint stamps with a tiny
MSAE: every artefact written, and a second run reusing them to the same results."""

from __future__ import annotations

import importlib.util
import json

import pytest

from hsae.cli.demo_vision import run_vision_demo
from hsae.sources.images import TUXPAINT_STAMPS

pytestmark = [
    pytest.mark.skipif(not TUXPAINT_STAMPS.is_dir(), reason="Debian's tuxpaint-stamps-default (scripts/setup.sh)"),
    pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite_pytorch") is None, reason="the vision extra"),
]


@pytest.mark.slow
def test_vision_demo_harvests_trains_evaluates_over_k_and_names_concepts(tmp_path):
    lines: list[str] = []
    options = dict(first=20, n_latents=64, k=8, steps=20, batch_size=128, ks=[2, 8, 64], echo=lines.append)
    summary = run_vision_demo(tmp_path / "demo", **options)
    out = tmp_path / "demo"
    manifest = json.loads((out / "store" / "manifest.json").read_text())
    assert (
        manifest["status"] == "complete" and manifest["total_rows"] == 20 * 49 and manifest["harvest"]["grid"] == [7, 7]
    )
    assert len(json.loads((out / "store" / "images.json").read_text())["images"]) == 20
    over_k = json.loads((out / "msae" / "eval" / "over_k.json").read_text())
    assert over_k["heldout_rows"] == 2 * 49  # images 9 and 19
    assert [r["k"] for r in over_k["rows"]] == [2, 8, 64] and over_k["rows"] == summary["over_k"]
    assert (out / "msae" / "eval" / "over_k.svg").read_text().startswith("<svg")
    concepts = json.loads((out / "msae" / "concepts.json").read_text())
    assert concepts["source"] == "head" and concepts["grid"] == [7, 7]
    assert summary["named"] == concepts["named"] and summary["firing"] == concepts["firing"] > 0
    assert all(len(h) == 49 for e in concepts["concepts"] for h in e["heatmaps"] if h is not None)
    assert [line[:5] for line in lines if line.startswith("[")] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    again = run_vision_demo(out, **{**options, "echo": lambda _: None})  # everything reused
    assert again["over_k"] == summary["over_k"] and again["named"] == summary["named"]
