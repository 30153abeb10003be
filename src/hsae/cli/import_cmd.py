"""`hsae import PATH OUT`: an SAE saved by another library (SAELens, sparsify, dictionary_learning,
Gemma Scope) or on the hub, as an ordinary hsae model folder that every hsae command reads."""

from __future__ import annotations

from pathlib import Path

import typer

from hsae.cli import app


@app.command("import")
def import_command(
    source: str = typer.Argument(
        ...,
        help="The SAE: a folder (or its weights file) in a format hsae reads, or hf://owner/repo[/sub/folder][@revision]",
    ),
    out: Path = typer.Argument(..., help="The hsae model folder to write (config.json + weights.safetensors)"),
    from_format: str | None = typer.Option(
        None, "--from", help="Its format, if not detected: saelens, sparsify, dictionary_learning, gemma_scope, hsae"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a model already in OUT"),
) -> None:
    """Import an SAE from another library's files or the hub; where it came from is recorded in config.json."""
    from hsae.formats import import_to_folder

    imported = import_to_folder(source, out, fmt=from_format, overwrite=overwrite)
    model, origin = imported.model, imported.record["imported"]
    what = origin.get("architecture") or origin["format"]
    typer.echo(
        f"imported {origin['format']} {what} as an hsae {model.arch} SAE ({model.d_in} -> {model.n_latents} latents) "
        f"into {out}"
    )
    for note in imported.notes:
        typer.echo(f"  {note}")
