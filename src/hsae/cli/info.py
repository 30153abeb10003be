"""`hsae info DIR`: the config of a model and the metrics of its last training step."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hsae.cli import app
from hsae.models.base import read_config
from hsae.train import METRICS_FILE


def last_metrics(directory: Path) -> dict | None:
    path = directory / METRICS_FILE
    if not path.is_file():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else None


@app.command()
def info(directory: Path = typer.Argument(..., help="A model folder written by `hsae train`")) -> None:
    """Print a model's config and the metrics of its last training step."""
    record = read_config(directory)
    console = Console()
    for section in ("sae", "train", "data"):
        values = record.get(section)
        if not values:
            continue
        table = Table(title=section, show_header=False, title_justify="left")
        for key, value in values.items():
            table.add_row(key, json.dumps(value) if not isinstance(value, str) else value)
        console.print(table)
    metrics = last_metrics(directory)
    if metrics:
        table = Table(title=f"last logged step ({metrics['step']})", show_header=False, title_justify="left")
        for key, value in metrics.items():
            table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
        console.print(table)
    else:
        console.print("no training metrics recorded")
