"""Import and export: another library's SAE files <-> an ordinary hsae model (folder).

An import reads the foreign files (format detected, or named), turns their numbers into the hsae
family that computes the same codes and reconstructions (`FlatSAE` -> `to_model`), restores what an
hsae export left in its sidecar, and records where it came from in config.json's "imported" section.
An export folds the model's input scaling into the weights (`from_model`), writes the format's files
and the sidecar. Sources may be local paths or hub names (hf://owner/repo/sub/folder@revision).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hsae.errors import HsaeError
from hsae.formats.base import ExportMeta
from hsae.formats.detect import HSAE, detect_format, format_module
from hsae.formats.files import sha256
from hsae.formats.flat import from_model, to_model
from hsae.formats.hub import Resolved, resolve
from hsae.formats.sidecar import SIDECAR_FILE, read_sidecar, sidecar_of, write_sidecar
from hsae.models import SAE
from hsae.models import load as load_hsae_folder
from hsae.models.base import CONFIG_FILE, read_config


@dataclass
class Imported:
    model: SAE
    record: dict[str, Any]  # config.json's sections besides "sae": "imported", and any restored train/data
    notes: list[str] = field(default_factory=list)  # what was done to the numbers


@dataclass
class Exported:
    files: list[Path]
    notes: list[str] = field(default_factory=list)


def _source_label(resolved: Resolved) -> str:
    return str(resolved.ref) if resolved.ref else str(resolved.path.resolve())


def _format_of(resolved: Resolved, fmt: str | None) -> str:
    if fmt is None:
        return detect_format(resolved.path)
    if fmt != HSAE and not format_module(fmt).detect(resolved.path):
        raise HsaeError(f"{_source_label(resolved)} holds no {fmt} SAE (its files are not there); check the path")
    return fmt


def import_sae(
    source: str | Path, fmt: str | None = None, cache_dir: str | Path | None = None, checksums: bool = True
) -> Imported:
    """The hsae model of the SAE at `source` (any format hsae reads; "hsae" folders load as they are).
    `checksums` records the sha256 of every file read (large dictionaries take a second per GB)."""
    from hsae.version import __version__

    resolved = resolve(source, cache_dir)
    fmt = _format_of(resolved, fmt)
    where = {"source": _source_label(resolved), "revision": resolved.commit}
    if fmt == HSAE:
        record = {k: v for k, v in read_config(resolved.path).items() if k not in ("sae", "hsae_version")}
        record["imported"] = {"format": HSAE, **where}
        return Imported(load_hsae_folder(resolved.path), record)
    foreign = format_module(fmt).read(resolved.path)
    sidecar = read_sidecar(foreign.folder)
    model = to_model(foreign.flat, sidecar.sae if sidecar else None)
    if sidecar and sidecar.parents is not None:
        model.set_hierarchy(torch.tensor(sidecar.parents))
    provenance = {
        "format": fmt,
        **where,
        "architecture": foreign.architecture,
        "files": {os.path.relpath(p, foreign.folder): sha256(p) if checksums else None for p in foreign.files},
        "model_name": foreign.model_name,
        "hook_name": foreign.hook_name,
        "notes": foreign.flat.notes,
        "config": foreign.config,
        "hsae_sidecar": SIDECAR_FILE if sidecar else None,
        "hsae_version": __version__,
    }
    record = {**(sidecar.record if sidecar else {}), "imported": provenance}
    return Imported(model, record, foreign.flat.notes)


def load(source: str | Path, device: str | torch.device = "cpu", cache_dir: str | Path | None = None) -> SAE:
    """Any SAE hsae reads, as a model: an hsae folder, another library's files, or a hub name."""
    return import_sae(source, cache_dir=cache_dir, checksums=False).model.to(device)


def import_to_folder(
    source: str | Path,
    out: str | Path,
    fmt: str | None = None,
    overwrite: bool = False,
    cache_dir: str | Path | None = None,
) -> Imported:
    """Import `source` and save it as an hsae model folder `out` (config.json + weights.safetensors)."""
    out = Path(out)
    if (out / CONFIG_FILE).exists() and not overwrite:
        raise HsaeError(f"{out} already holds {CONFIG_FILE}; choose another folder or pass --overwrite")
    imported = import_sae(source, fmt, cache_dir)
    imported.model.save(out, record=imported.record)
    return imported


def _export_meta(record: dict[str, Any], hsae_version: str) -> ExportMeta:
    data = record.get("data") or {}
    imported = record.get("imported") or {}
    model = data.get("model")
    model_name = model.get("name") if isinstance(model, dict) else model
    return ExportMeta(
        model_name=model_name or imported.get("model_name"),
        hook_name=data.get("hook_transformer_lens") or data.get("hook") or imported.get("hook_name"),
        hf_hook_name=data.get("hook"),
        hsae_version=hsae_version,
    )


def export_model(
    source: str | Path, fmt: str, out: str | Path, overwrite: bool = False, cache_dir: str | Path | None = None
) -> Exported:
    """Write the hsae model at `source` in format `fmt` into folder `out`, plus the hsae sidecar."""
    from hsae.version import __version__

    module = format_module(fmt)
    resolved = resolve(source, cache_dir)
    if detect_format(resolved.path) != HSAE:
        raise HsaeError(f"{source} is not an hsae model folder; `hsae import` it first")
    out = Path(out)
    if out.resolve() == resolved.path.resolve():
        raise HsaeError(f"{out} is the model's own folder; export into another folder")
    model, record = load_hsae_folder(resolved.path), read_config(resolved.path)
    flat = from_model(model)
    if flat.kind not in module.WRITES:
        raise HsaeError(
            f"the {fmt} format cannot hold a {flat.kind} SAE (it holds {', '.join(module.WRITES)}); "
            f"export to {'saelens' if fmt != 'saelens' else 'another format'} instead"
        )
    present = [name for name in (*module.FILES, SIDECAR_FILE) if (out / name).exists()]
    if present and not overwrite:
        raise HsaeError(f"{out} already holds {', '.join(present)}; choose another folder or pass --overwrite")
    files = module.write(flat, out, _export_meta(record, __version__))
    files.append(write_sidecar(out, sidecar_of(model, record), __version__))
    return Exported(files, flat.notes)
