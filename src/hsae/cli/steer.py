"""`hsae steer DIR --feature I --scale S --text "..."`: add a feature's decoder direction at the hook.
For an encoder (MiniLM) it prints the WordNet glosses nearest the sentence embedding before and after;
for a causal LM, the continuation with and without."""

from __future__ import annotations

from pathlib import Path

import typer

from hsae.cli import app


@app.command()
def steer(
    directory: Path = typer.Argument(..., help="A model folder"),
    feature: int = typer.Option(..., help="The feature to add"),
    scale: float = typer.Option(..., help="Its activation (its top activations are a natural strength)"),
    text: str = typer.Option(..., help="The text to run"),
    glosses: int = typer.Option(3000, help="Encoders: WordNet glosses to search for nearest neighbours"),
    max_new_tokens: int = typer.Option(30, "--max-new-tokens", help="Causal LMs: tokens to generate"),
) -> None:
    """Steer the base model with one feature and show what changes."""
    from hsae.cli._common import quiet_transformers
    from hsae.interpret.steering import steer as run_steer

    quiet_transformers()
    result = run_steer(directory, feature, scale, text, glosses=glosses, max_new_tokens=max_new_tokens)
    typer.echo(f"feature {feature} at {scale:g} on {text!r}")
    if result.kind == "generation":
        typer.echo(f"without: {result.plain}")
        typer.echo(f"with:    {result.steered_text}")
        return
    typer.echo(f"sentence embedding cosine before/after: {result.cosine}")
    for title, found in (("before", result.before), ("after", result.after)):
        typer.echo(f"nearest WordNet glosses {title}:")
        for entry in found:
            typer.echo(f"  {entry['cosine']:.3f}  {entry['synset']}: {entry['gloss']}")
