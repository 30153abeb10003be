"""`hsae export-site DIR OUT`: the feature browser as static files (open OUT/index.html through any
web server, e.g. `python -m http.server -d OUT`)."""

from __future__ import annotations

from pathlib import Path

import typer

from hsae.cli import app


@app.command("export-site")
def export_site(
    directory: Path = typer.Argument(..., help="A model folder"),
    out: Path = typer.Argument(..., help="The folder to write the site into (replaced if an earlier export)"),
) -> None:
    """Write the browser for one model as static HTML + JSON, for sharing."""
    from hsae.progress import progress_bar
    from hsae.serve.export import export_site as run

    with progress_bar("export", "features") as progress:
        path = run(directory, out, progress=progress)
    typer.echo(f"wrote {path}: serve it with `python -m http.server -d {path}` and open http://127.0.0.1:8000/")
