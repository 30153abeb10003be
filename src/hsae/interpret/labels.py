"""The labels file, `DIR/labels.json`: every labeller's labels, each rewritten atomically.

    {"format": "hsae-labels", "version": 1,
     "labellers": {"offline": {"settings": {...}, "examples": "<examples file identity>",
                               "labels": {"12": {"label": "...", ...}, ...}},
                   "llm": {...}}}

A labeller's section is replaced whole when it runs again; others are kept. The browser and the
scorers show the LLM label where there is one, else the offline one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hsae.atomic import write_json
from hsae.errors import HsaeError

LABELS_FILE = "labels.json"
FORMAT = "hsae-labels"
PREFERENCE = ("llm", "offline")  # which labeller's label to show first


def labels_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / LABELS_FILE


def read_labels(model_dir: str | Path) -> dict[str, Any]:
    path = labels_path(model_dir)
    if not path.is_file():
        return {"format": FORMAT, "version": 1, "labellers": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HsaeError(f"{path} is not valid JSON ({err.msg}): delete it and run `hsae label` again") from None
    if data.get("format") != FORMAT:
        raise HsaeError(f"{path} is not an hsae labels file: delete it and run `hsae label` again")
    return data


def write_labeller(model_dir: str | Path, name: str, section: dict[str, Any]) -> Path:
    """Replace one labeller's section (settings, labels, ...) and keep the others."""
    data = read_labels(model_dir)
    data["labellers"][name] = section
    path = labels_path(model_dir)
    write_json(path, data)
    return path


def labeller_labels(data: dict[str, Any], name: str) -> dict[int, dict[str, Any]]:
    section = data["labellers"].get(name) or {}
    return {int(k): v for k, v in (section.get("labels") or {}).items()}


def best_labels(data: dict[str, Any]) -> dict[int, str]:
    """latent -> the label to show (the first labeller in PREFERENCE that labelled it)."""
    out: dict[int, str] = {}
    for name in reversed(PREFERENCE):
        out.update({i: entry["label"] for i, entry in labeller_labels(data, name).items() if entry.get("label")})
    return out
