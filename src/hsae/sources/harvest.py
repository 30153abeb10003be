"""Harvesting: a model's activations on a corpus, written into an activation store (hsae.store reads it).

Every shard is written atomically, then the manifest is rewritten atomically with the new shard and
the resume point (the place of the first unwritten row: the first document of its sort window and
the rows of that window before it). A harvest stopped at any moment and started again with the same
settings ends with exactly the rows an uninterrupted one has, because the harvester's batches depend
only on the sort window's documents (see `hsae.sources.hf.Harvester`); the temporary files of the
writes a kill interrupted are removed when it starts again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from hsae.atomic import check_writable, remove_stale_temps, write_json, write_safetensors
from hsae.errors import HsaeError
from hsae.sources.hf import HarvestBatch, RowPlace, TokenRows, attention_heads, transformer_lens_name
from hsae.sources.text import describe_corpus
from hsae.store import (
    DEFAULT_SHARD_ROWS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ROW_FIELDS,
    ActivationStore,
    activation_key,
    parse_dtype,
    read_manifest,
    sha256_of,
    shard_name,
)


class RowHarvester(Protocol):
    """What `harvest_to_store` reads rows from: the text Harvester (hsae.sources.hf) or the image
    one (hsae.sources.vision). Its batches depend only on where they start, so a harvest resumes."""

    loaded: Any  # .describe() for the manifest; .model.config for attention-head layouts
    hooked: Any  # .widths(): hook -> activation width

    @property
    def hooks(self) -> list[str]: ...

    def describe(self) -> dict[str, Any]: ...

    def batches(self, documents: Any, start: RowPlace = (0, 0)) -> Iterator[HarvestBatch]: ...


def check_store_folder(out: Path) -> dict[str, Any] | None:
    """The manifest of a store to resume, None for a new store; refuses folders holding anything else."""
    if out.exists() and not out.is_dir():
        raise HsaeError(f"{out} is a file, not a store folder")
    check_writable(out)
    manifest = read_manifest(out) if out.is_dir() else None
    if manifest is None and out.is_dir():
        others = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        if others:
            raise HsaeError(f"{out} is not empty and is not an activation store: choose a new --out folder")
    return manifest


# Manifest entries that must match when a harvest is started again on a partial store.
SETTINGS = ("model", "hooks", "dtype", "corpus", "harvest", "shard_rows", "target_rows")


def harvest_to_store(
    out: str | Path,
    harvester: RowHarvester,
    corpus: Any,  # hsae.sources.text.Corpus or any re-iterable of strings
    *,
    tokens: int,
    dtype: str = "float32",
    shard_rows: int = DEFAULT_SHARD_ROWS,
    progress: Callable[[int, int], None] | None = None,
) -> ActivationStore:
    """Harvest `tokens` rows (fewer if the corpus ends first) into the store folder `out`.

    Starting again on a partial store with the same settings resumes it; a complete one is returned
    as it is. `progress(rows_done, rows_target)` is called after each batch.
    """
    if tokens <= 0:
        raise HsaeError(f"tokens must be positive, got {tokens}")
    if shard_rows <= 0:
        raise HsaeError(f"shard_rows must be positive, got {shard_rows}")
    store_dtype = parse_dtype(dtype)
    out = Path(out)
    widths = harvester.hooked.widths()
    hooks = []
    for h in harvester.hooks:
        entry: dict[str, Any] = {"name": h, "transformer_lens": transformer_lens_name(h), "d_in": widths[h]}
        heads = attention_heads(harvester.loaded, h, widths[h])
        if heads is not None:  # the concatenated heads: per-head analyses view the decoder in blocks
            entry["heads"], entry["d_head"] = heads
        hooks.append(entry)
    settings = {
        "model": harvester.loaded.describe(),
        "hooks": hooks,
        "dtype": dtype,
        "corpus": describe_corpus(corpus),
        "harvest": harvester.describe(),
        "shard_rows": shard_rows,
        "target_rows": tokens,
    }
    manifest = check_store_folder(out)
    if manifest is None:
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "status": "harvesting",
            **settings,
            "d_in": widths[harvester.hooks[0]] if len(harvester.hooks) == 1 else None,
            "total_rows": 0,
            "shards": [],
            "resume": {"document": 0, "rows_into_window": 0},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(out / MANIFEST, manifest)
    else:
        changed = [key for key in SETTINGS if manifest.get(key) != settings[key]]
        if changed:
            raise HsaeError(
                f"{out} holds a store harvested with other settings ({', '.join(changed)} differ): "
                "repeat the original command to finish it, or choose a new --out folder"
            )
    # Temporary files of the shard and manifest writes a killed harvest left half done.
    remove_stale_temps(out, [MANIFEST, "shard-*.safetensors"])
    if manifest["status"] == "complete":
        return ActivationStore.open(out, hook=harvester.hooks[0])

    done = manifest["total_rows"]
    # Rows harvested but not yet in a shard, each segment tagged with the place of its first row in
    # the harvest's stream (hsae.sources.hf.RowPlace): what the manifest records to resume from.
    pending: deque[_Segment] = deque()
    pending_rows = 0
    resume_place = (manifest["resume"]["document"], manifest["resume"]["rows_into_window"])
    after_pending = resume_place  # the place of the row after the pending ones

    def write_shard(n: int) -> None:
        nonlocal done, pending_rows
        parts = []
        while n:
            segment = pending.popleft()
            if len(segment.rows) > n:
                parts.append(segment.rows.slice(0, n))
                rest = _Segment((segment.place[0], segment.place[1] + n), segment.rows.slice(n))
                pending.appendleft(rest)
                n = 0
            else:
                parts.append(segment.rows)
                n -= len(segment.rows)
        rows = parts[0].cat(parts) if len(parts) > 1 else parts[0]
        resume = pending[0].place if pending else after_pending
        path = out / shard_name(len(manifest["shards"]))
        tensors = {activation_key(h): rows.activations[h].to(store_dtype) for h in harvester.hooks}
        tensors.update({name: getattr(rows, name).long() for name in ROW_FIELDS})
        # One metadata key: safetensors writes several in hash order, so equal shards would differ.
        write_safetensors(path, tensors, metadata={"format": FORMAT})
        done += len(rows)
        pending_rows -= len(rows)
        manifest["shards"].append({"file": path.name, "rows": len(rows), "sha256": sha256_of(path)})
        manifest["total_rows"] = done
        manifest["resume"] = {"document": resume[0], "rows_into_window": resume[1]}
        write_json(out / MANIFEST, manifest)

    batches = harvester.batches(corpus, resume_place) if done < tokens else iter(())
    for batch in batches:
        rows = batch.rows.slice(0, tokens - done - pending_rows)
        if len(rows):
            pending.append(_Segment(batch.start, rows))
            pending_rows += len(rows)
        after_pending = batch.end
        while pending_rows >= shard_rows:
            write_shard(shard_rows)
        if progress:
            progress(done + pending_rows, tokens)
        if done + pending_rows >= tokens:
            break
    if pending_rows:  # the last, shorter shard
        write_shard(pending_rows)
    if done == 0:
        raise HsaeError("the corpus gave no tokens to harvest (every document is empty or special tokens)")
    manifest["status"] = "complete"
    manifest["resume"] = None
    write_json(out / MANIFEST, manifest)
    return ActivationStore.open(out, hook=harvester.hooks[0])


@dataclass
class _Segment:
    place: tuple[int, int]  # of rows[0]: (first document of its sort window, rows of the window before)
    rows: TokenRows
