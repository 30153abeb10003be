"""`hsae examples DIR`: top contexts, quantile examples, density, histograms and co-firing latents of
every feature, in one streaming pass, written to DIR/examples.sqlite (what `hsae label`, `hsae score`
and `hsae serve` read)."""

from __future__ import annotations

from pathlib import Path

import typer

from hsae.cli import app


@app.command()
def examples(
    directory: Path = typer.Argument(..., help="A model folder"),
    data: str | None = typer.Option(None, help="Activation store to read (default: the one the model trained on)"),
    corpus: str | None = typer.Option(None, help="Harvest on the fly from this corpus instead ('wordnet' or files)"),
    model: str | None = typer.Option(None, help="With --corpus: the model (default: the one in the model's config)"),
    hook: str | None = typer.Option(None, help="The hook (default: the one the model trained on)"),
    tokens: int = typer.Option(1_000_000, help="Tokens to stream (fewer if the data ends first)"),
    top: int = typer.Option(20, help="Top activating contexts per feature"),
    quantiles: int = typer.Option(10, help="Activation quantiles to draw examples from"),
    per_quantile: int = typer.Option(5, "--per-quantile", help="Examples per quantile"),
    before: int = typer.Option(10, help="Context tokens before each example's token"),
    after: int = typer.Option(5, help="Context tokens after it"),
    random_contexts: int = typer.Option(2048, "--random-contexts", help="Random windows kept for the scorers"),
    batch_rows: int = typer.Option(4096, "--batch-rows", help="Rows encoded at a time"),
    seed: int = typer.Option(0, help="Seed of the quantile and context samples"),
    out: Path | None = typer.Option(None, help="Output file (default DIR/examples.sqlite)"),
    force: bool = typer.Option(False, "--force", help="Rebuild even if an up-to-date file exists"),
) -> None:
    """Find every feature's examples in one pass over the data (resumes an interrupted run)."""
    run_examples(
        directory,
        data=data,
        corpus=corpus,
        model=model,
        hook=hook,
        out=out,
        force=force,
        tokens=tokens,
        top=top,
        quantiles=quantiles,
        per_quantile=per_quantile,
        before=before,
        after=after,
        random_contexts=random_contexts,
        batch_rows=batch_rows,
        seed=seed,
    )


def run_examples(
    directory: Path,
    *,
    data: str | None = None,
    corpus: str | None = None,
    model: str | None = None,
    hook: str | None = None,
    out: Path | None = None,
    force: bool = False,
    **settings,
):
    """What `hsae examples` does, callable from other commands (the demo)."""
    import hsae
    from hsae.interpret.examples import ExamplesConfig, build_examples, examples_identity, up_to_date
    from hsae.interpret.examples_db import examples_path
    from hsae.interpret.streams import open_stream
    from hsae.models.base import read_config
    from hsae.progress import progress_bar

    config = ExamplesConfig(**settings).validate()
    sae = hsae.load(directory)
    stream = open_stream(
        read_config(directory), data=data, corpus=corpus, model=model, hook=hook, chunk_rows=config.batch_rows
    )
    path = out or examples_path(directory)
    run = None if force else up_to_date(path, examples_identity(sae, stream, config))
    if run is None:
        with progress_bar("examples") as progress:
            run = build_examples(sae, directory, stream, config, out=path, force=True, progress=progress)
    if run.reused:
        typer.echo(f"{run.path} is up to date ({run.rows} tokens); --force rebuilds it")
    else:
        resumed = f", resumed at {run.resumed_at}" if run.resumed_at else ""
        typer.echo(f"wrote {run.path}: {run.rows} tokens in {run.seconds:.1f} s{resumed}")
    return run
