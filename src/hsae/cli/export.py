"""`hsae export DIR --to FORMAT OUT` and `hsae push DIR owner/repo`: an hsae model in another
library's format (input scaling folded into the weights, so it takes raw activations there), or
on the Hugging Face hub."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import typer

from hsae.cli import app

FORMAT_HELP = "saelens, sparsify, dictionary_learning or gemma_scope"


@app.command("export")
def export_command(
    directory: str = typer.Argument(..., help="An hsae model folder (or hf://owner/repo[/sub/folder][@revision])"),
    out: Path = typer.Argument(..., help="The folder to write"),
    to: str = typer.Option(..., "--to", help=f"The format: {FORMAT_HELP}"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace files of that format already in OUT"),
) -> None:
    """Write a model in another library's format, plus hsae.json (what the format cannot hold)."""
    from hsae.formats import export_model

    exported = export_model(directory, to, out, overwrite=overwrite)
    typer.echo(f"wrote {', '.join(p.name for p in exported.files)} to {out}")
    for note in exported.notes:
        typer.echo(f"  {note}")


@app.command("push")
def push_command(
    directory: str = typer.Argument(..., help="An hsae model folder"),
    repo_id: str = typer.Argument(..., help="The hub repo, owner/name (created if missing)"),
    to: str | None = typer.Option(None, "--to", help=f"Push in this format ({FORMAT_HELP}); default hsae's own"),
    path_in_repo: str | None = typer.Option(None, "--path-in-repo", help="Sub-folder of the repo to write"),
    revision: str | None = typer.Option(None, help="Branch to commit to (default main)"),
    private: bool = typer.Option(False, "--private", help="Create the repo as private"),
) -> None:
    """Upload a model to the Hugging Face hub (its config and weights, or an export); needs `hf auth login`."""
    from hsae.formats import export_model
    from hsae.formats.hub import push
    from hsae.models.base import CONFIG_FILE, WEIGHTS_FILE, read_config

    with tempfile.TemporaryDirectory(prefix="hsae-push-") as staging:
        stage = Path(staging)
        if to is None:
            read_config(directory)  # refuses a folder that holds no hsae model
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copy2(Path(directory) / name, stage / name)
        else:
            export_model(directory, to, stage, overwrite=True)
        url = push(stage, repo_id, path_in_repo=path_in_repo, revision=revision, private=private)
    typer.echo(f"pushed {directory} to {repo_id}: {url}")
