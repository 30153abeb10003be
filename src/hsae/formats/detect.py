"""Which format a path holds: the registry of format modules and `detect_format`."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from hsae.errors import HsaeError
from hsae.formats import dictionary_learning, gemma_scope, saelens, sparsify
from hsae.formats.files import read_json
from hsae.models.base import CONFIG_FILE

HSAE = "hsae"
FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (saelens, sparsify, dictionary_learning, gemma_scope)}
_KNOWN = (
    "hsae (config.json + weights.safetensors), SAELens (cfg.json + sae_weights.safetensors), sparsify "
    "(cfg.json + sae.safetensors), dictionary_learning (ae.pt), Gemma Scope (params.npz)"
)


def format_module(name: str) -> ModuleType:
    if name not in FORMATS:
        raise HsaeError(f"unknown format {name!r}; known: {', '.join([HSAE, *FORMATS])}")
    return FORMATS[name]


def _is_hsae(path: Path) -> bool:
    config = path / CONFIG_FILE
    return path.is_dir() and config.is_file() and "sae" in read_json(config)


def _formats_at(path: Path) -> list[str]:
    return ([HSAE] if _is_hsae(path) else []) + [name for name, module in FORMATS.items() if module.detect(path)]


def detect_format(path: Path) -> str:
    """The format of the SAE at `path` (a folder, or the weights file itself): "hsae" or a key of
    FORMATS. A folder holding several SAEs in sub-folders (a sparsify checkpoint, a hub release) is
    refused with their names."""
    path = Path(path)
    if not path.exists():
        raise HsaeError(f"{path} does not exist")
    found = _formats_at(path)
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise HsaeError(f"{path} looks like several formats ({', '.join(found)}); say which with --from")
    inner = sorted(p.name for p in path.iterdir() if p.is_dir() and _formats_at(p)) if path.is_dir() else []
    if inner:
        shown = ", ".join(inner[:6]) + (f", ... ({len(inner)} in all)" if len(inner) > 6 else "")
        raise HsaeError(f"{path} holds several SAEs ({shown}); name one, e.g. {path / inner[0]}")
    raise HsaeError(f"{path} holds no hsae model, and no SAE in a format hsae reads: {_KNOWN}")
