"""`hsae score DIR`: interpretability scores of the features' labels. Offline: the MiniLM embedding
scorer (ROC AUC of label-context similarity). With --llm: delphi's detection and fuzzing scorers."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import typer

from hsae.cli import app
from hsae.cli.label import LLM_HELP


@app.command()
def score(
    directory: Path = typer.Argument(..., help="A model folder with examples and labels"),
    labels: str = typer.Option("best", help="Which labels to score: best (LLM where there is one), offline, llm"),
    embedding: bool = typer.Option(True, "--embedding/--no-embedding", help="The offline embedding scorer"),
    features: int = typer.Option(500, help="Embedding scorer: random labelled features to score (0 = all)"),
    llm: bool = typer.Option(False, "--llm", help="Detection and fuzzing through an LLM (network: the endpoint)"),
    llm_base_url: str | None = typer.Option(None, "--llm-base-url", help=LLM_HELP),
    llm_model: str | None = typer.Option(None, "--llm-model", help="Model name at the endpoint (or HSAE_LLM_MODEL)"),
    llm_api_key: str | None = typer.Option(None, "--llm-api-key", help="API key (better: HSAE_LLM_API_KEY)"),
    llm_features: int = typer.Option(50, "--llm-features", help="LLM scorers: random labelled features (0 = all)"),
    concurrency: int = typer.Option(4, help="LLM requests at a time"),
    seed: int = typer.Option(0, help="Seed of the feature sample and the example draws"),
) -> None:
    """Score the labels: embedding AUROC offline; detection and fuzzing (accuracy, F1, AUC) with --llm."""
    import hsae
    from hsae.errors import HsaeError
    from hsae.interpret.examples_db import open_examples
    from hsae.interpret.labels import best_labels, labeller_labels, read_labels
    from hsae.interpret.neighbours import DecoderNeighbours
    from hsae.interpret.scores import mean_of, write_scorer

    db = open_examples(directory)
    data = read_labels(directory)
    if labels == "best":
        chosen_labels = best_labels(data)
    elif labels in ("offline", "llm"):
        chosen_labels = {i: e["label"] for i, e in labeller_labels(data, labels).items() if e.get("label")}
    else:
        raise HsaeError(f"--labels must be best, offline or llm, not {labels!r}")
    if not chosen_labels:
        raise HsaeError(f"{directory} has no {labels} labels yet: run `hsae label {directory}` first")
    neighbours = DecoderNeighbours(hsae.load(directory).W_dec)

    def sample(n: int) -> dict[int, str]:
        ids = sorted(chosen_labels)
        keep = sorted(random.Random(seed).sample(ids, min(n, len(ids)))) if n else ids
        return {i: chosen_labels[i] for i in keep}

    if embedding:
        from hsae.interpret.embed import SentenceEmbedder
        from hsae.interpret.embedding_score import EmbeddingScoreConfig, embedding_scores

        embedding_cfg = EmbeddingScoreConfig(seed=seed)
        found = embedding_scores(db, sample(features), neighbours, SentenceEmbedder(), embedding_cfg)
        entries = {str(i): v for i, v in found.items()}
        summary = {
            "features": len(found),
            "auroc": mean_of(entries, "auroc"),
            "auroc_near_miss": mean_of(entries, "auroc_near_miss"),
        }
        section = {"settings": vars(embedding_cfg), "labels": labels, "summary": summary, "features": entries}
        path = write_scorer(directory, "embedding", section)
        typer.echo(
            f"embedding: {summary['features']} features, mean AUROC {summary['auroc']} against random contexts, "
            f"{summary['auroc_near_miss']} against near misses -> {path}"
        )
    if not llm:
        return
    from hsae.interpret.llm import LLMClient, LLMConfig
    from hsae.interpret.llm_scores import ScoreConfig, llm_scores

    config = LLMConfig.from_options(llm_base_url, llm_model, llm_api_key, concurrency=concurrency)
    client = LLMClient(config)
    cfg = ScoreConfig(seed=seed)
    chosen = sample(llm_features)
    for scorer in ("detection", "fuzzing"):
        found = llm_scores(db, client, chosen, neighbours, scorer, cfg)
        entries = {str(i): v for i, v in found.items()}
        kinds = sorted({k for v in found.values() for k in v if k != "failed_batches"})
        means = {kind: {m: mean_of(entries, kind, m) for m in ("accuracy", "f1", "auc")} for kind in kinds}
        llm_summary: dict[str, Any] = {
            "features": len(found),
            "failed_batches": sum(v["failed_batches"] for v in found.values()),
            **means,
        }
        section = {"settings": {**vars(cfg), **config.record()}, "labels": labels, "summary": llm_summary}
        path = write_scorer(directory, scorer, {**section, "features": entries})
        described = "; ".join(
            f"{kind}: accuracy {v['accuracy']}, F1 {v['f1']}, AUC {v['auc']}" for kind, v in means.items()
        )
        typer.echo(f"{scorer}: {len(found)} features; {described} -> {path}")
