"""`hsae label DIR`: a readable label for every feature, offline (over-represented tokens, the shared
WordNet hypernym on WordNet text) and, when asked, from an LLM at an OpenAI-compatible endpoint."""

from __future__ import annotations

import random
from pathlib import Path

import typer

from hsae.cli import app

LLM_HELP = "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (or HSAE_LLM_BASE_URL)"


@app.command()
def label(
    directory: Path = typer.Argument(..., help="A model folder with examples (`hsae examples DIR`)"),
    offline: bool = typer.Option(True, "--offline/--no-offline", help="The offline labeller (no network)"),
    tokens: int = typer.Option(3, help="Tokens named in an offline label"),
    llm: bool = typer.Option(False, "--llm", help="Also label with an LLM (network: the endpoint given)"),
    llm_base_url: str | None = typer.Option(None, "--llm-base-url", help=LLM_HELP),
    llm_model: str | None = typer.Option(None, "--llm-model", help="Model name at the endpoint (or HSAE_LLM_MODEL)"),
    llm_api_key: str | None = typer.Option(
        None, "--llm-api-key", help="API key (better: HSAE_LLM_API_KEY or OPENAI_API_KEY); never written anywhere"
    ),
    concurrency: int = typer.Option(4, help="LLM requests at a time"),
    features: int = typer.Option(0, help="LLM: label this many random live features (0 = all of them)"),
    n_examples: int = typer.Option(20, "--examples", help="LLM: examples shown per feature"),
    seed: int = typer.Option(0, help="Seed of the feature sample and example draw"),
) -> None:
    """Label every feature (offline); with --llm, also ask an LLM (resumes an interrupted run)."""
    from hsae.interpret.examples_db import open_examples
    from hsae.interpret.labels import labeller_labels, read_labels, write_labeller

    db = open_examples(directory)
    if offline:
        run_offline_labels(directory, tokens=tokens)
    if not llm:
        return
    from hsae.interpret.llm import LLMClient, LLMConfig
    from hsae.interpret.llm_labels import llm_labels

    config = LLMConfig.from_options(llm_base_url, llm_model, llm_api_key, concurrency=concurrency)
    live = [i for i, d in enumerate(db.densities()) if d > 0]
    chosen = sorted(random.Random(seed).sample(live, min(features, len(live)))) if features else live
    settings = {**config.record(), "examples": n_examples, "seed": seed, "features": features}
    existing = read_labels(directory)
    same = (existing["labellers"].get("llm") or {}).get("settings") == settings
    done = labeller_labels(existing, "llm") if same else {}
    todo = [i for i in chosen if i not in done]
    typer.echo(f"llm: {len(todo)} features to label with {config.model} at {config.base_url} ({len(done)} done before)")

    def save(complete: bool) -> Path:
        return write_labeller(
            directory,
            "llm",
            {"settings": settings, "examples": db.stamp(), "complete": complete, "labels": dict(sorted(done.items()))},
        )

    def on_label(latent: int, entry: dict) -> None:
        done[latent] = entry
        if len(done) % 25 == 0:
            save(False)

    llm_labels(db, LLMClient(config), todo, n_examples=n_examples, seed=seed, on_label=on_label)
    path = save(True)
    typer.echo(f"llm: labelled {len(done)} features -> {path}")


def run_offline_labels(directory: Path, *, tokens: int = 3) -> dict[int, dict]:
    """What `hsae label` does offline, callable from other commands (the demo)."""
    from hsae.interpret.examples_db import open_examples
    from hsae.interpret.labels import write_labeller
    from hsae.interpret.offline_labels import OfflineLabelConfig, offline_labels

    db = open_examples(directory)
    found = offline_labels(db, OfflineLabelConfig(tokens=tokens))
    section = {"settings": {"tokens": tokens}, "examples": db.stamp(), "labels": found}
    path = write_labeller(directory, "offline", section)
    named = sum(1 for v in found.values() if v["hypernym"])
    typer.echo(f"offline: labelled {len(found)} of {db.n_latents} features ({named} with a WordNet hypernym) -> {path}")
    return found
