"""`hsae harvest`: model activations on a corpus into a store; `hsae hooks`: a model's hook sites."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hsae.cli import app
from hsae.cli._common import harvest_bar, quiet_transformers
from hsae.sources.hf import DEFAULT_BATCH_TOKENS, DEFAULT_HOOK, DEFAULT_SORT_WINDOW


def _split_hooks(hooks: list[str]) -> list[str]:
    return [h.strip() for item in hooks for h in item.split(",") if h.strip()]


@app.command()
def harvest(
    out: Path = typer.Option(..., help="Store folder to create (or to finish, after an interruption)"),
    tokens: int = typer.Option(..., help="Activation rows (tokens) to harvest; fewer if the corpus ends first"),
    model: str | None = typer.Option(
        None, help="Hub name or local model folder (default: the embedded all-MiniLM-L6-v2)"
    ),
    hook: list[str] = typer.Option(
        [DEFAULT_HOOK], help="Module to read, by dotted name; repeat (or comma-separate) for several"
    ),
    corpus: str = typer.Option("wordnet", help="'wordnet', or a .txt/.jsonl/.parquet file, folder or saved dataset"),
    dtype: str = typer.Option("float32", help="Stored dtype: float32, float16 or bfloat16"),
    batch_tokens: int = typer.Option(DEFAULT_BATCH_TOKENS, "--batch-tokens", help="Padded tokens per forward pass"),
    shard_rows: int = typer.Option(65536, "--shard-rows", help="Rows per shard file"),
    max_length: int | None = typer.Option(None, "--max-length", help="Truncate documents to this many tokens"),
    keep_special: bool = typer.Option(False, "--keep-special", help="Keep CLS/SEP/BOS/... tokens (dropped by default)"),
    sort_window: int = typer.Option(
        DEFAULT_SORT_WINDOW, "--sort-window", help="Documents sorted by length together (less padding)"
    ),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)"),
    compute_dtype: str = typer.Option(
        "float32",
        "--compute-dtype",
        help="The model's forward: float32, or bfloat16 autocast (2.5-2.7x faster on a CPU with bf16 "
        "matmuls, relative error ~4e-3; recorded in the manifest)",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar (the final line is still printed)"),
) -> None:
    """Harvest a model's activations on a corpus into a sharded store (resumes an interrupted one)."""
    from hsae.devices import resolve_device
    from hsae.sources.harvest import check_store_folder, harvest_to_store
    from hsae.sources.hf import Harvester, load_model
    from hsae.sources.text import open_corpus
    from hsae.store import parse_dtype

    parse_dtype(dtype)
    check_store_folder(out)  # refuse a folder holding something else before loading anything
    quiet_transformers()
    console = Console(stderr=True)
    loaded = load_model(model, device=resolve_device(device))
    documents = open_corpus(corpus)
    harvester = Harvester(
        loaded,
        _split_hooks(hook),
        batch_tokens=batch_tokens,
        max_length=max_length,
        keep_special=keep_special,
        sort_window=sort_window,
        compute_dtype=compute_dtype,
    )
    if quiet:
        store = harvest_to_store(out, harvester, documents, tokens=tokens, dtype=dtype, shard_rows=shard_rows)
    else:
        with harvest_bar(tokens, console) as progress:
            store = harvest_to_store(
                out, harvester, documents, tokens=tokens, dtype=dtype, shard_rows=shard_rows, progress=progress
            )
            progress(store.total_rows, tokens)
    note = "" if store.total_rows == tokens else f" (the corpus ended before {tokens})"
    console.print(
        f"{store.total_rows} rows{note} of {', '.join(store.hooks)} (width {store.d_in}, {dtype}) "
        f"in {len(store.shards)} shards: {out}"
    )


@app.command()
def hooks(
    model: str | None = typer.Argument(None, help="Hub name or local model folder (default: embedded MiniLM)"),
    device: str | None = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)"),
    all_sites: bool = typer.Option(
        False, "--all", help="Also list modules that pass their input through unchanged (Dropout, Identity, ...)"
    ),
) -> None:
    """List a model's hookable modules (one activation per token) with their output widths; --hook
    takes the module name or its TransformerLens name (blocks.L.hook_resid_pre is a block's input)."""
    from hsae.devices import resolve_device
    from hsae.sources.hf import hook_sites, load_model

    quiet_transformers()
    loaded = load_model(model, device=resolve_device(device))
    sites = hook_sites(loaded)
    shown = [s for s in sites if all_sites or not s.passes_input_through]
    table = Table(title=f"hook sites of {loaded.name}", title_justify="left")
    for column in ("module", "type", "width", "TransformerLens"):
        table.add_column(column, no_wrap=True)
    for site in shown:
        table.add_row(site.name, site.module_type, str(site.width), site.transformer_lens or "")
    # Full module names matter more than fitting an 80-column pipe: widen the console to fit them.
    needed = 13 + max(len(s.name) for s in shown) + max(len(s.module_type) for s in shown) + 5 + 26
    console = Console()
    Console(width=max(console.width, needed)).print(table)
    hidden = len(sites) - len(shown)
    if hidden:
        console.print(f"({hidden} modules that pass their input through unchanged are hidden: --all lists them)")
