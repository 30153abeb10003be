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
    """The last metric line that reads as one (a line a killed run tore is passed over)."""
    path = directory / METRICS_FILE
    if not path.is_file():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            return row
    return None


def flat_items(values: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested config values as (dotted key, readable value) rows: no JSON blobs in the table."""
    rows = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows += flat_items(value, name + ".") if value else [(name, "-")]
        elif isinstance(value, (list, tuple)):
            rows.append((name, ", ".join(_readable(v) for v in value) if value else "-"))
        else:
            rows.append((name, _readable(value)))
    return rows


def _readable(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_readable(v)}" for k, v in value.items())
    return str(value)


@app.command()
def info(
    model: str = typer.Argument(..., help="A model folder written by `hsae train`, or hf://owner/repo/... of one"),
) -> None:
    """Print a model's config and the metrics of its last training step."""
    from hsae.cli._common import model_folder

    directory, _ = model_folder(model)
    record = read_config(directory)
    console = Console()
    for section in ("sae", "train", "data"):
        values = record.get(section)
        if not values:
            continue
        table = Table(title=section, show_header=False, title_justify="left")
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")
        for key, value in flat_items(values):
            table.add_row(key, value)
        console.print(table)
    metrics = last_metrics(directory)
    if metrics:
        table = Table(title=f"last logged step ({metrics.get('step', '?')})", show_header=False, title_justify="left")
        for key, value in metrics.items():
            table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
        console.print(table)
    else:
        console.print("no training metrics recorded")
