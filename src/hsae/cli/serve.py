"""`hsae serve DIR [DIR ...]`: the feature browser, a read-only web app on 127.0.0.1 by default."""

from __future__ import annotations

from pathlib import Path

import typer

from hsae.cli import app


@app.command()
def serve(
    directories: list[Path] = typer.Argument(..., help="Model folders (with `hsae examples` and `hsae label` run)"),
    host: str = typer.Option("127.0.0.1", help="Address to bind: localhost only unless you say otherwise"),
    port: int = typer.Option(8765, help="Port"),
) -> None:
    """Browse the models' feature forests, examples, labels and scores in a web page."""
    from hsae.serve.app import serve as run

    for directory in directories:
        if not (directory / "config.json").is_file():
            from hsae.errors import HsaeError

            raise HsaeError(f"{directory} is not a model folder (no config.json): give folders written by `hsae train`")
    typer.echo(f"serving {', '.join(map(str, directories))} on http://{host}:{port}/ (Ctrl-C stops)")
    run(directories, host=host, port=port)
