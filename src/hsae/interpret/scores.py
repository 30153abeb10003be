"""The scores file, `DIR/scores.json` (one section per scorer, each rewritten atomically), and the
metrics the scorers report."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hsae.atomic import write_json
from hsae.errors import HsaeError

SCORES_FILE = "scores.json"
FORMAT = "hsae-scores"


def scores_path(model_dir: str | Path) -> Path:
    return Path(model_dir) / SCORES_FILE


def read_scores(model_dir: str | Path) -> dict[str, Any]:
    path = scores_path(model_dir)
    if not path.is_file():
        return {"format": FORMAT, "version": 1, "scorers": {}}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HsaeError(f"{path} is not valid JSON ({err.msg}): delete it and run `hsae score` again") from None
    if data.get("format") != FORMAT:
        raise HsaeError(f"{path} is not an hsae scores file: delete it and run `hsae score` again")
    return data


def write_scorer(model_dir: str | Path, name: str, section: dict[str, Any]) -> Path:
    data = read_scores(model_dir)
    data["scorers"][name] = section
    path = scores_path(model_dir)
    write_json(path, data)
    return path


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float | None:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney form of ROC AUC)."""
    if not positive or not negative:
        return None
    wins = sum((p > q) + 0.5 * (p == q) for p in positive for q in negative)
    return wins / (len(positive) * len(negative))


def binary_metrics(positive: Sequence[int], negative: Sequence[int]) -> dict[str, float] | None:
    """Accuracy, precision, recall, F1 and AUC of 0/1 predictions on positives and negatives. With
    binary predictions the ROC AUC is the balanced accuracy (TPR + TNR) / 2."""
    if not positive or not negative:
        return None
    tp, fp = sum(positive), sum(negative)
    tn = len(negative) - fp
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / len(positive)
    return {
        "accuracy": round((tp + tn) / (len(positive) + len(negative)), 4),
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(2 * precision * recall / (precision + recall), 4) if precision + recall else 0.0,
        "auc": round((recall + tn / len(negative)) / 2, 4),
        "n_positive": len(positive),
        "n_negative": len(negative),
    }


def mean_of(features: dict[str, dict[str, Any]], *keys: str) -> float | None:
    """The mean of features[*][keys[0]][keys[1]]... over the features that have it."""
    values: list[float] = []
    for entry in features.values():
        found: Any = entry
        for key in keys:
            found = found.get(key) if isinstance(found, dict) else None
        if isinstance(found, int | float):
            values.append(float(found))
    return round(sum(values) / len(values), 4) if values else None
