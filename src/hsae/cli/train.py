"""`hsae train`: train an SAE of any registered family on activations."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import typer

from hsae.cli import app
from hsae.config import TrainConfig, from_dict, parse_overrides
from hsae.errors import HsaeError


def _split_options(family, overrides: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    sae_fields = {f.name for f in dataclasses.fields(family.config_class)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    sae_opts, train_opts = {}, {}
    for key, value in overrides.items():
        if key in sae_fields and key not in ("arch", "d_in", "n_latents", "k", "input_scale"):
            sae_opts[key] = value
        elif key in train_fields:
            train_opts[key] = value
        else:
            known = sorted((sae_fields | train_fields) - {"arch", "d_in", "n_latents", "k", "input_scale"})
            raise HsaeError(f"--option {key}: not an option of {family.arch} or of training; known: {', '.join(known)}")
    return sae_opts, train_opts


@app.command()
def train(
    arch: str = typer.Option(
        ..., help="SAE family: relu, topk, batchtopk, jumprelu, matryoshka, mp, h-sae, forest, tree"
    ),
    data: str | None = typer.Option(
        None,
        help="'synthetic', a .npy / .safetensors activation file, or an hsae store (from `hsae harvest`); "
        "leave out to harvest on the fly from --model/--hook/--corpus",
    ),
    model: str | None = typer.Option(None, help="On-the-fly source: hub name or model folder (default MiniLM)"),
    hook: str | None = typer.Option(None, help="On-the-fly source: module to read (default encoder.layer.3)"),
    corpus: str | None = typer.Option(None, help="On-the-fly source: 'wordnet' or a text/JSONL/dataset path"),
    n_latents: int = typer.Option(..., "--n-latents", help="Dictionary size"),
    out: Path = typer.Option(..., help="Output folder (config.json, weights.safetensors, checkpoint, metrics)"),
    k: int | None = typer.Option(None, help="Active latents per token (TopK-style); L0 target for relu/jumprelu"),
    steps: int = typer.Option(1000, help="Training steps"),
    batch_size: int = typer.Option(4096, "--batch-size", help="Tokens per step"),
    lr: float | None = typer.Option(None, help="Learning rate (default 1e-3 / sqrt(n_latents / 16384))"),
    seed: int = typer.Option(0, help="Seed of the initialisation and of the data order"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run stopped in --out"),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Steps between checkpoints"),
    log_every: int = typer.Option(10, "--log-every", help="Steps between metric lines"),
    device: str = typer.Option("cpu", help="cpu or cuda"),
    wandb_project: str | None = typer.Option(None, "--wandb-project", help="Log to Weights & Biases"),
    option: list[str] = typer.Option(
        [],
        "--option",
        "-o",
        help="KEY=VALUE for a family option (e.g. aux_coef=0.03) or a training one "
        "(lr_warmup_steps, b_dec_init, dead_window_tokens, grad_clip_norm, ...)",
    ),
    synthetic: list[str] = typer.Option(
        [],
        "--synthetic",
        help="KEY=VALUE for --data synthetic: d_in (96), n_roots (40), branching (4), depth (2), "
        "p_root (0.05), p_child (0.8), parent_cos (0.5), mag_low, mag_high, noise_std, seed",
    ),
    max_norm_ratio: float | None = typer.Option(
        None,
        "--max-norm-ratio",
        help="Stores: leave out rows whose norm exceeds this multiple of the median (default 10; 0 keeps every row)",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar"),
    stop_after: int | None = typer.Option(None, "--stop-after", hidden=True),
) -> None:
    """Train an SAE; writes OUT/config.json and OUT/weights.safetensors (and checkpoints)."""
    from hsae.models import get_family
    from hsae.sources import open_source
    from hsae.train import Trainer, check_out_dir

    family = get_family(arch)
    sae_opts, train_opts = _split_options(family, parse_overrides(option))
    train_cfg = from_dict(
        TrainConfig,
        {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "checkpoint_every": checkpoint_every,
            "log_every": log_every,
            "device": device,
            "wandb_project": wandb_project,
            **train_opts,
        },
        what="training",
    )
    if not resume and os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 owns the folder
        check_out_dir(out, resume=False)
    if data is not None and (model or hook or corpus):
        raise HsaeError("give either --data, or --model/--hook/--corpus to harvest on the fly, not both")
    if data is None and corpus is None:
        raise HsaeError("give --data (synthetic, a file or a store) or --corpus (with --model/--hook) to train on")
    if data is None:
        assert corpus is not None  # checked above
        from hsae.cli._common import quiet_transformers
        from hsae.sources import open_model_source

        quiet_transformers()
        from hsae.train import local_device

        source = open_model_source(model, hook, corpus, seed=seed, device=str(local_device(device)))
    else:
        source = open_source(data, seed=seed, synthetic=parse_overrides(synthetic), max_norm_ratio=max_norm_ratio)
    sae_values: dict[str, object] = {"arch": arch, "d_in": source.d_in, "n_latents": n_latents, **sae_opts}
    if k is not None:
        sae_values["k"] = k
    sae_cfg = from_dict(family.config_class, sae_values, what=f"{arch} config")
    trainer = Trainer(sae_cfg, train_cfg, source, out, resume=resume, show_progress=not quiet, stop_after=stop_after)
    sae = trainer.run()
    typer.echo(f"saved {sae.arch} SAE ({sae.n_latents} latents, d_in {sae.d_in}) to {out}")
