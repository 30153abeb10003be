"""`hsae harvest-images`: a vision model's activations on an image collection into a store;
`hsae hooks-vision`: a vision model's hookable modules, their output shapes and row layouts."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from hsae.cli import app
from hsae.cli._common import harvest_bar, quiet_transformers
from hsae.sources.vision import DEFAULT_BATCH_IMAGES, DEFAULT_VISION_HOOK, LAYOUTS


@app.command("harvest-images")
def harvest_images(
    out: Path = typer.Option(..., help="Store folder to create (or to finish, after an interruption)"),
    images: str = typer.Option("tuxpaint", help="'tuxpaint', a folder of images, Fashion-MNIST IDX files or a dataset"),
    model: str | None = typer.Option(
        None, help="Vision model folder or hub name (default: embedded EfficientNet-Lite0)"
    ),
    hook: list[str] = typer.Option(
        [DEFAULT_VISION_HOOK], help="Module[:input], image_embeds or text_embeds; repeat or comma-separate"
    ),
    tokens: str = typer.Option("auto", help=f"Rows per image: {', '.join(LAYOUTS)}"),
    rows: int | None = typer.Option(None, help="Rows to harvest (default: every image's)"),
    first: int | None = typer.Option(None, help="Only the first N images"),
    batch_images: int = typer.Option(DEFAULT_BATCH_IMAGES, "--batch-images", help="Images per forward pass"),
    image_size: int | None = typer.Option(None, "--image-size", help="Embedded model only: input size (224)"),
    no_pad: bool = typer.Option(False, "--no-pad", help="Do not pad pictures to a white square before resizing"),
    caption_column: str | None = typer.Option(None, "--caption-column", help="Datasets: the caption column"),
    dtype: str = typer.Option("float32", help="Stored dtype: float32, float16 or bfloat16"),
    shard_rows: int = typer.Option(65536, "--shard-rows", help="Rows per shard file"),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar (the final line is still printed)"),
) -> None:
    """Harvest a vision model's activations on images into a sharded store (resumes an interrupted
    one); writes images.json beside the manifest (each image's file, label and caption)."""
    from hsae.sources.harvest import check_store_folder, harvest_to_store
    from hsae.sources.images import open_images
    from hsae.sources.vision import ImageHarvester, load_vision_model, rows_for, write_image_index
    from hsae.store import parse_dtype

    parse_dtype(dtype)
    check_store_folder(out)
    quiet_transformers()
    console = Console(stderr=True)
    collection = open_images(images, caption_column=caption_column)
    if first is not None:
        collection = collection.head(first)
    loaded = load_vision_model(model, device=device, image_size=image_size)
    hooks = [h.strip() for item in hook for h in item.split(",") if h.strip()]
    harvester = ImageHarvester(loaded, hooks, tokens=tokens, batch_images=batch_images, pad_square=not no_pad)
    target = rows or rows_for(harvester, collection)
    # harvest_to_store takes any harvester with hf.Harvester's interface (duck-typed, hence the cast)
    duck: Any = harvester
    with contextlib.nullcontext(None) if quiet else harvest_bar(target, console) as progress:
        store = harvest_to_store(
            out, duck, collection, tokens=target, dtype=dtype, shard_rows=shard_rows, progress=progress
        )
    index = write_image_index(out, collection)
    skipped = len(harvester.skipped)
    note = f"; {skipped} unreadable images skipped (named in {index.name})" if skipped else ""
    console.print(
        f"{store.total_rows} rows of {', '.join(store.hooks)} (width {store.d_in}, "
        f"{harvester.describe()['tokens']}) from {len(collection)} images in {len(store.shards)} shards: {out}{note}"
    )


@app.command("hooks-vision")
def hooks_vision(
    model: str | None = typer.Argument(None, help="Vision model folder or hub name (default: EfficientNet-Lite0)"),
    device: str | None = typer.Option(None, help="cpu or cuda"),
) -> None:
    """List a vision model's modules with the shape of their output on one image and the --tokens
    layouts that apply (vectors: pooled; maps: map/pooled/both; tokens: cls/patches/pooled/both)."""
    from hsae.sources.vision import load_vision_model, module_shapes

    quiet_transformers()
    loaded = load_vision_model(model, device=device)
    table = Table(title=f"hook sites of {loaded.name}", title_justify="left")
    for column in ("module", "type", "shape per image", "--tokens"):
        table.add_column(column, no_wrap=True)
    for site in module_shapes(loaded):
        table.add_row(site.name, site.module_type, " x ".join(map(str, site.shape)), site.layouts)
    Console(width=160).print(table)
