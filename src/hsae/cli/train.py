"""`hsae train`: train an SAE of any registered family on activations."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import typer

from hsae.cli import app
from hsae.config import TrainConfig, from_dict, parse_overrides
from hsae.errors import HsaeError
from hsae.sources.stream import DEFAULT_HELDOUT_EVERY


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


def _hook_folder(hook: str) -> str:
    """A folder name for one hook's SAE when several are trained into one --out."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in hook)


def resolve_size(n_latents: int | None, expansion_factor: float | None, d_in: int) -> int:
    """The dictionary size from --n-latents or --expansion-factor (exactly one of them)."""
    if (n_latents is None) == (expansion_factor is None):
        raise HsaeError("give the dictionary size as --n-latents N or as --expansion-factor F (N = F x d_in), one")
    if expansion_factor is not None:
        if not (expansion_factor > 0 and math.isfinite(expansion_factor)):
            raise HsaeError(f"--expansion-factor must be a positive number, got {expansion_factor}")
        return max(1, round(expansion_factor * d_in))
    assert n_latents is not None
    return n_latents


def resolve_steps(steps: int | None, tokens: int | None, tokens_per_step: int) -> int:
    """Steps from --steps or a token budget --tokens (default 1000 steps)."""
    if steps is not None and tokens is not None:
        raise HsaeError("give the run's length as --steps or as --tokens, not both")
    if tokens is not None:
        if tokens <= 0:
            raise HsaeError(f"--tokens must be positive, got {tokens}")
        return -(-tokens // tokens_per_step)
    return 1000 if steps is None else steps


@app.command()
def train(
    arch: str = typer.Option(
        ..., help="SAE family: relu, topk, batchtopk, jumprelu, matryoshka, msae, mp, h-sae, forest, tree"
    ),
    data: str | None = typer.Option(
        None,
        help="'synthetic', a .npy / .safetensors activation file, or an hsae store (from `hsae harvest`); "
        "leave out to harvest on the fly from --model/--hook/--corpus",
    ),
    model: str | None = typer.Option(None, help="On-the-fly source: hub name or model folder (default MiniLM)"),
    hook: list[str] = typer.Option(
        [],
        help="A store's hook to train on (when it holds several), or the module to read on the fly (default "
        "encoder.layer.3); module paths or TransformerLens names; repeat for one SAE per hook, in OUT/<hook>",
    ),
    corpus: str | None = typer.Option(None, help="On-the-fly source: 'wordnet' or a text/JSONL/dataset path"),
    n_latents: int | None = typer.Option(None, "--n-latents", help="Dictionary size (or give --expansion-factor)"),
    expansion_factor: float | None = typer.Option(
        None, "--expansion-factor", help="Dictionary size as a multiple of the activation width d_in"
    ),
    out: Path = typer.Option(..., help="Output folder (config.json, weights.safetensors, checkpoint, metrics)"),
    k: int | None = typer.Option(
        None,
        help="Active latents per token (default: the family's own, 32 for topk, batchtopk, matryoshka, msae, "
        "mp, h-sae and tree, 50 for forest); the L0 target for relu/jumprelu (default: none, their penalty alone)",
    ),
    steps: int | None = typer.Option(None, help="Training steps (default 1000; or give --tokens)"),
    tokens: int | None = typer.Option(None, help="Token budget instead of --steps: steps = tokens / batch size"),
    batch_size: int = typer.Option(4096, "--batch-size", help="Tokens per step"),
    lr: float | None = typer.Option(None, help="Learning rate (default 1e-3 / sqrt(n_latents / 16384))"),
    seed: int = typer.Option(0, help="Seed of the initialisation and of the data order"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run stopped in --out"),
    checkpoint_every: int = typer.Option(500, "--checkpoint-every", help="Steps between checkpoints"),
    log_every: int = typer.Option(10, "--log-every", help="Steps between metric lines"),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)"),
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
    heldout_every: int = typer.Option(
        DEFAULT_HELDOUT_EVERY,
        "--heldout-every",
        help="Hold every N-th document (row of a file) out of training, for `hsae eval` (0: hold nothing out)",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar (the final line is still printed)"),
    stop_after: int | None = typer.Option(None, "--stop-after", hidden=True),
) -> None:
    """Train an SAE; writes OUT/config.json and OUT/weights.safetensors (and checkpoints)."""
    from hsae.devices import resolve_device
    from hsae.models import get_family
    from hsae.sources import open_model_source, open_source
    from hsae.sources.hf import DEFAULT_HOOK
    from hsae.train import Trainer, check_out_dir, local_device

    family = get_family(arch)
    sae_opts, train_opts = _split_options(family, parse_overrides(option))
    if data is not None and (model or corpus):
        raise HsaeError("give either --data, or --model/--corpus to harvest on the fly, not both")
    if data is None and corpus is None:
        raise HsaeError("give --data (synthetic, a file or a store) or --corpus (with --model/--hook) to train on")
    hooks = [h.strip() for item in hook for h in item.split(",") if h.strip()]
    if len(set(hooks)) != len(hooks):
        raise HsaeError(f"--hook names repeat: {hooks}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    # One SAE per hook, each in OUT/<hook>; under torchrun the SAEs are spread over the ranks (each
    # rank trains its own on all the data) instead of one SAE's batches.
    several = len(hooks) > 1
    mine: list[str | None] = [*hooks[rank::world]] if several else [*hooks] or [None]
    device_name = str(local_device(resolve_device(device))) if not several else resolve_device(device)
    tokens_per_step = batch_size * (1 if several else world)
    base_train = {
        "steps": resolve_steps(steps, tokens, tokens_per_step),
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "checkpoint_every": checkpoint_every,
        "log_every": log_every,
        "device": device_name,
        "wandb_project": wandb_project,
        **train_opts,
    }
    train_cfg = from_dict(TrainConfig, base_train, what="training")
    if rank == 0:  # under torchrun, rank 0 owns the folder
        check_out_dir(out, resume=resume)  # (a resumed folder's run is checked with its checkpoint)
    for one_hook in mine:
        target = out / _hook_folder(one_hook) if several and one_hook is not None else out
        if data is None:
            assert corpus is not None  # checked above
            from hsae.cli._common import quiet_transformers

            quiet_transformers()
            source = open_model_source(
                model, one_hook or DEFAULT_HOOK, corpus, seed=seed, device=device_name, heldout_every=heldout_every
            )
        else:
            source = open_source(
                data,
                seed=seed,
                synthetic=parse_overrides(synthetic),
                max_norm_ratio=max_norm_ratio,
                hook=one_hook,
                heldout_every=heldout_every,
            )
        size = resolve_size(n_latents, expansion_factor, source.d_in)
        sae_values: dict[str, object] = {"arch": arch, "d_in": source.d_in, "n_latents": size, **sae_opts}
        if k is not None:
            sae_values["k"] = k
        sae_cfg = from_dict(family.config_class, sae_values, what=f"{arch} config")
        trainer = Trainer(
            sae_cfg,
            train_cfg,
            source,
            target,
            resume=resume,
            show_progress=not quiet,
            stop_after=stop_after,
            data_parallel=not several,
        )
        sae = trainer.run()
        typer.echo(f"saved {sae.arch} SAE ({sae.n_latents} latents, d_in {sae.d_in}) to {target}")
