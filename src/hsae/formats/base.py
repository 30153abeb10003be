"""What every format module provides, and the records passed between them and `convert`.

A format module (saelens, sparsify, dictionary_learning, gemma_scope) has a `NAME`, a `WRITES` tuple
(the flat kinds it can write), `FILES` (the names `write` writes) and three functions:

    detect(path) -> bool                       the path holds an SAE in this format
    read(path) -> Foreign                      its numbers as a FlatSAE, plus what the source said
    write(flat, out, meta) -> list[Path]       the files written (each atomically)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsae.formats.flat import FlatSAE


@dataclass
class Foreign:
    """An SAE read from another library's files."""

    flat: FlatSAE
    architecture: str  # the source's own name for it (SAELens architecture, dictionary_learning class, ...)
    folder: Path  # where its files are (an hsae sidecar is looked for here)
    files: list[Path]  # the files read
    config: dict[str, Any] = field(default_factory=dict)  # the source's config, as it was saved
    model_name: str | None = None
    hook_name: str | None = None


@dataclass
class ExportMeta:
    """What an export records about the model besides its numbers (where formats have a place for it)."""

    model_name: str | None = None
    hook_name: str | None = None  # TransformerLens-style name where known (SAELens's convention)
    hf_hook_name: str | None = None  # the transformers module path hsae hooked
    hsae_version: str = ""
