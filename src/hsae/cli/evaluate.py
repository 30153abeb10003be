"""`hsae eval DIR --data ...` and `hsae compare DIR1 DIR2 ...`: tables, report.json, report.html."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hsae.cli import app
from hsae.errors import HsaeError
from hsae.eval.report import format_value, scalar_items

OPTION_HELP = (
    "KEY=VALUE for an evaluator (repeatable): corpus, sentences, base_model, hook, absorption_min_probe_f1, "
    "absorption_words, wordnet_nouns, wordnet_top, wordnet_threshold, seed, ... (see hsae.eval modules)"
)


def _check_tokens(tokens: int) -> None:
    if tokens <= 0:
        raise HsaeError(f"--tokens must be a positive number of rows to evaluate on, got {tokens}")


# The data record's fields evaluation reads, with the types hsae writes them with.
_DATA_FIELDS: dict[str, type | tuple[type, ...]] = {
    "kind": str,
    "path": str,
    "split": str,
    "heldout_every": int,
    "max_norm_ratio": (int, float),
    "hook": str,
}


def _data_record(record: dict, model_dir: Path) -> dict:
    """The model's data record, its fields checked: a damaged one is named, not half used."""
    saved = record.get("data") or {}
    for key, kind in _DATA_FIELDS.items():
        value = saved.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise HsaeError(
                f"{model_dir}/config.json: the data record's {key} is {value!r}; the model folder is damaged (give "
                "--data to evaluate on other data)"
            )
    return saved


def _open_for(model_dir: Path, data: str | None, synthetic: list[str]):
    """The source to evaluate a model on, and whether it is held out of the model's training: by
    default the held-out split of the data it trained on (documents it never saw); with --data,
    that data (its held-out split if it is the training data itself)."""
    from hsae.config import parse_overrides
    from hsae.models.base import read_config
    from hsae.sources import open_source

    saved = _data_record(read_config(model_dir), model_dir)
    # Held out are the documents a "train" split left out; a run that read every row (recorded with
    # split "all", or before splits existed) held nothing out.
    every = int(saved.get("heldout_every") or 0) if saved.get("split") == "train" else 0
    # (a record without a norm limit, or None, trained on every row: 0 keeps them all)
    ratio = (saved.get("max_norm_ratio") or 0) if saved.get("kind") == "store" else None
    hook = saved.get("hook") if saved.get("kind") == "store" else None  # a store may hold several
    if data is None:
        if saved.get("kind") == "synthetic":  # the same forest the model was trained on
            opts = {k: str(v) for k, v in saved.items() if k != "kind"}
            opts.update(parse_overrides(synthetic))
            return open_source("synthetic", synthetic=opts), True
        if saved.get("path"):
            split = "heldout" if every else "all"
            source = open_source(saved["path"], max_norm_ratio=ratio, hook=hook, split=split, heldout_every=every)
            return source, bool(every)
        raise HsaeError(f"{model_dir}: its config does not name the data it was trained on; give --data")
    if data != "synthetic" and saved.get("path") and Path(data).resolve() == Path(saved["path"]).resolve():
        split = "heldout" if every else "all"
        source = open_source(data, max_norm_ratio=ratio, hook=hook, split=split, heldout_every=every)
        return source, bool(every)
    # other data than the model trained on: all of it, unseen in training
    return open_source(data, synthetic=parse_overrides(synthetic), split="all"), True


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help="A model folder, or hf://owner/repo[/folder][@revision] of one"),
    data: str | None = typer.Option(None, help="Activations to evaluate on (default: the training data)"),
    tokens: int = typer.Option(65536, help="Tokens to evaluate"),
    out: Path | None = typer.Option(
        None, help="Report folder (default MODEL/eval; for a hub model ./eval-<repo name>)"
    ),
    metric: list[str] = typer.Option([], "--metric", "-m", help="Only these sections (repeatable)"),
    synthetic: list[str] = typer.Option([], "--synthetic", help="KEY=VALUE for --data synthetic"),
    k: str | None = typer.Option(
        None, "--k", help="Also read the model at these k (e.g. 16,32,64): the over_k section's FVU/CKNNA curve"
    ),
    option: list[str] = typer.Option([], "--option", "-o", help=OPTION_HELP),
) -> None:
    """Evaluate a model: prints a table, writes report.json and a self-contained report.html."""
    from hsae.cli._common import model_folder
    from hsae.config import parse_overrides

    model_dir, from_hub = model_folder(model)
    if from_hub and out is None:  # never write into the hub cache
        out = Path(f"eval-{model.removeprefix('hf://').split('@')[0].replace('/', '-')}")
    run_eval(
        model_dir,
        data=data,
        tokens=tokens,
        out=out,
        metrics=metric,
        synthetic=synthetic,
        options={**parse_overrides(option), **({"ks": k} if k else {})},
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

    _check_tokens(tokens)
    from hsae.eval.run import evaluate

    model = hsae.load(model_dir)
    source, heldout = _open_for(model_dir, data, synthetic or [])
    report = evaluate(
        model, source, model_dir=model_dir, tokens=tokens, only=metrics or None, options=options, heldout=heldout
    )
    console = Console()
    for section in report.sections:
        table = Table(title=section.name, show_header=False, title_justify="left")
        if section.skipped:
            table.add_row("skipped", section.skipped)
        for key, value in scalar_items(section.metrics):
            table.add_row(key, format_value(value))
        if section.seconds is not None:
            table.add_row("seconds", f"{section.seconds:.1f}")
        console.print(table)
    json_path, html_path = report.write(out or model_dir / "eval")
    console.print(f"wrote {json_path} and {html_path}")
    return report


@app.command()
def compare(
    models: list[str] = typer.Argument(..., help="Model folders (or hf:// names of hsae models)"),
    data: str | None = typer.Option(None, help="Activations to evaluate all of them on"),
    tokens: int = typer.Option(65536, help="Tokens to evaluate"),
    out: Path = typer.Option(Path("compare"), help="Report folder"),
    metric: list[str] = typer.Option([], "--metric", "-m", help="Only these sections (repeatable)"),
    synthetic: list[str] = typer.Option([], "--synthetic", help="KEY=VALUE for --data synthetic"),
    k: str | None = typer.Option(
        None, "--k", help="Also read every model at these k (e.g. 16,32,64) and draw the curves"
    ),
    option: list[str] = typer.Option([], "--option", "-o", help=OPTION_HELP),
) -> None:
    """Several models side by side, with an FVU-against-L0 frontier plot (and, with --k or nested-over-k
    models, FVU and CKNNA against L0 for each model read at many k)."""
    import hsae
    from hsae.cli._common import model_folder
    from hsae.config import parse_overrides
    from hsae.eval import plots
    from hsae.eval.over_k_evaluator import curve_figure
    from hsae.eval.report import Report
    from hsae.eval.run import evaluate

    model_dirs = [model_folder(spec)[0] for spec in models]
    # Every folder is checked before the first evaluation starts.
    _check_tokens(tokens)
    opened = [(model_dir, hsae.load(model_dir), *_open_for(model_dir, data, synthetic)) for model_dir in model_dirs]
    reports = []
    for model_dir, model, source, heldout in opened:
        report = evaluate(
            model,
            source,
            model_dir=model_dir,
            tokens=tokens,
            only=metric or None,
            options={**parse_overrides(option), **({"ks": k} if k else {})},
            heldout=heldout,
        )
        reports.append((model_dir, report))
    names = [str(d) for d, _ in reports]
    combined = Report(title="hsae comparison", info={"models": ", ".join(names), "tokens": tokens})
    rows: dict[str, dict[str, object]] = {}
    skipped: dict[tuple[str, str], list[str]] = {}  # (section, why) -> models
    points = []
    for model_dir, report in reports:
        for section in report.sections:
            if section.skipped:
                skipped.setdefault((section.name, section.skipped), []).append(str(model_dir))
                continue
            for key, value in scalar_items(section.metrics):
                rows.setdefault(f"{section.name}.{key}", {})[str(model_dir)] = value
        core = next((s for s in report.sections if s.name == "core" and not s.skipped), None)
        if core is not None:
            points.append((f"{model_dir.name} ({report.info['arch']})", core.metrics["l0"], core.metrics["fvu"]))
    for model_dir, report in reports:
        combined.add(
            str(model_dir),
            {f"{s.name}.{k}": v for s in report.sections if not s.skipped for k, v in scalar_items(s.metrics)},
        )
    if points:
        combined.figures.append(("FVU against L0, with the Pareto frontier", plots.frontier(points)))
    curves = {
        f"{d.name} ({r.info['arch']})": s.metrics["curve"]
        for d, r in reports
        for s in r.sections
        if s.name == "over_k" and not s.skipped
    }
    if curves:
        combined.figures.append(("FVU and CKNNA against L0, one model at many k", curve_figure(curves)))
    table = Table(title="comparison")
    table.add_column("metric", no_wrap=True)  # a metric name is never cut
    for name in names:
        table.add_column(name, justify="right")
    for metric_name, values in rows.items():
        table.add_row(metric_name, *(format_value(values.get(n, "")) for n in names))
    width = max([len(m) for m in rows] + [10]) + sum(max(len(n), 10) + 3 for n in names) + 4
    console = Console()
    Console(width=max(console.width, width)).print(table)
    for (section_name, why), which in skipped.items():
        whose = "all models" if len(which) == len(names) else ", ".join(which)
        console.print(f"{section_name} skipped ({whose}): {why}")
    json_path, html_path = combined.write(out)
    typer.echo(f"wrote {json_path} and {html_path}")
