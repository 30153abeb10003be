"""`hsae eval DIR --data ...` and `hsae compare DIR1 DIR2 ...`: tables, report.json, report.html."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hsae.cli import app
from hsae.eval.report import format_value, scalar_items

OPTION_HELP = (
    "KEY=VALUE for an evaluator (repeatable): corpus, sentences, base_model, hook, absorption_min_probe_f1, "
    "absorption_words, wordnet_nouns, wordnet_top, wordnet_threshold, seed, ... (see hsae.eval modules)"
)


def _open_for(model_dir: Path, data: str | None, synthetic: list[str]):
    from hsae.config import parse_overrides
    from hsae.models.base import read_config
    from hsae.sources import open_source

    record = read_config(model_dir)
    saved = record.get("data") or {}
    if data is None:
        if saved.get("kind") == "synthetic":  # the same forest the model was trained on
            opts = {k: str(v) for k, v in saved.items() if k != "kind"}
            opts.update(parse_overrides(synthetic))
            return open_source("synthetic", synthetic=opts)
        if saved.get("path"):  # the same rows the model trained on (its norm limit too)
            # (a record without one, or None, trained on every row: 0 keeps them all)
            ratio = (saved.get("max_norm_ratio") or 0) if saved.get("kind") == "store" else None
            return open_source(saved["path"], max_norm_ratio=ratio)
        raise typer.BadParameter("give --data: the model's config does not name its training data")
    return open_source(data, synthetic=parse_overrides(synthetic))


@app.command("eval")
def eval_command(
    model_dir: Path = typer.Argument(..., help="A model folder"),
    data: str | None = typer.Option(None, help="Activations to evaluate on (default: the training data)"),
    tokens: int = typer.Option(65536, help="Tokens to evaluate"),
    out: Path | None = typer.Option(None, help="Report folder (default MODEL_DIR/eval)"),
    metric: list[str] = typer.Option([], "--metric", "-m", help="Only these sections (repeatable)"),
    synthetic: list[str] = typer.Option([], "--synthetic", help="KEY=VALUE for --data synthetic"),
    option: list[str] = typer.Option([], "--option", "-o", help=OPTION_HELP),
) -> None:
    """Evaluate a model: prints a table, writes report.json and a self-contained report.html."""
    from hsae.config import parse_overrides

    run_eval(
        model_dir,
        data=data,
        tokens=tokens,
        out=out,
        metrics=metric,
        synthetic=synthetic,
        options=parse_overrides(option),
    )


def run_eval(
    model_dir: Path,
    *,
    data: str | None = None,
    tokens: int = 65536,
    out: Path | None = None,
    metrics: list[str] | None = None,
    synthetic: list[str] | None = None,
    options: dict[str, str] | None = None,
):
    """What `hsae eval` does, callable from other commands: evaluate, print, write the report."""
    import hsae
    from hsae.eval.run import evaluate

    model = hsae.load(model_dir)
    source = _open_for(model_dir, data, synthetic or [])
    report = evaluate(model, source, model_dir=model_dir, tokens=tokens, only=metrics or None, options=options)
    console = Console()
    for section in report.sections:
        table = Table(title=section.name, show_header=False, title_justify="left")
        if section.skipped:
            table.add_row("skipped", section.skipped)
        for key, value in scalar_items(section.metrics):
            table.add_row(key, format_value(value))
        console.print(table)
    json_path, html_path = report.write(out or model_dir / "eval")
    console.print(f"wrote {json_path} and {html_path}")
    return report


@app.command()
def compare(
    model_dirs: list[Path] = typer.Argument(..., help="Model folders"),
    data: str | None = typer.Option(None, help="Activations to evaluate all of them on"),
    tokens: int = typer.Option(65536, help="Tokens to evaluate"),
    out: Path = typer.Option(Path("compare"), help="Report folder"),
    synthetic: list[str] = typer.Option([], "--synthetic", help="KEY=VALUE for --data synthetic"),
    option: list[str] = typer.Option([], "--option", "-o", help=OPTION_HELP),
) -> None:
    """Several models side by side, with an FVU-against-L0 frontier plot."""
    import hsae
    from hsae.config import parse_overrides
    from hsae.eval import plots
    from hsae.eval.report import Report
    from hsae.eval.run import evaluate

    reports = []
    for model_dir in model_dirs:
        model = hsae.load(model_dir)
        reports.append(
            (
                model_dir,
                evaluate(
                    model,
                    _open_for(model_dir, data, synthetic),
                    model_dir=model_dir,
                    tokens=tokens,
                    options=parse_overrides(option),
                ),
            )
        )
    names = [str(d) for d, _ in reports]
    combined = Report(title="hsae comparison", info={"models": ", ".join(names), "tokens": tokens})
    rows: dict[str, dict[str, object]] = {}
    points = []
    for model_dir, report in reports:
        for section in report.sections:
            for key, value in scalar_items(section.metrics) if not section.skipped else [("skipped", section.skipped)]:
                rows.setdefault(f"{section.name}.{key}", {})[str(model_dir)] = value
        core = next(s for s in report.sections if s.name == "core").metrics
        points.append((f"{model_dir.name} ({report.info['arch']})", core["l0"], core["fvu"]))
    for model_dir, report in reports:
        combined.add(
            str(model_dir),
            {f"{s.name}.{k}": v for s in report.sections if not s.skipped for k, v in scalar_items(s.metrics)},
        )
    combined.figures.append(("FVU against L0, with the Pareto frontier", plots.frontier(points)))
    table = Table(title="comparison")
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for metric_name, values in rows.items():
        table.add_row(metric_name, *(format_value(values.get(n, "")) for n in names))
    Console().print(table)
    json_path, html_path = combined.write(out)
    typer.echo(f"wrote {json_path} and {html_path}")
