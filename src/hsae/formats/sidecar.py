"""`hsae.json`, written beside an export: what the foreign format cannot hold, restored on import.

It keeps the model's full hsae config (family options and the input_scale the export folded into the
weights), its forest where one was extracted and saved (`parents`; flat formats have no place for
it) and the train and data sections of config.json. Importing the folder back gives the model it
came from; the foreign library ignores the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsae.atomic import write_json
from hsae.config import to_dict
from hsae.errors import HsaeError
from hsae.formats.files import read_json
from hsae.formats.flat import SIDECAR_NAME
from hsae.models import SAE

SIDECAR_FILE = SIDECAR_NAME


@dataclass
class Sidecar:
    sae: dict[str, Any]  # the hsae config
    parents: list[int] | None  # each latent's parent (-1 = root), if a forest was saved
    record: dict[str, Any]  # config.json's other sections (train, data)


def sidecar_of(model: SAE, record: dict[str, Any]) -> Sidecar:
    parents = model.hierarchy()
    has_forest = not model.builtin_hierarchy and bool(parents.ge(0).any())
    kept = {key: record[key] for key in ("train", "data") if record.get(key)}
    return Sidecar(sae=to_dict(model.config), parents=parents.tolist() if has_forest else None, record=kept)


def write_sidecar(folder: Path, sidecar: Sidecar, hsae_version: str) -> Path:
    path = folder / SIDECAR_FILE
    write_json(
        path,
        {"hsae_version": hsae_version, "sae": sidecar.sae, "parents": sidecar.parents, "record": sidecar.record},
    )
    return path


def read_sidecar(folder: Path) -> Sidecar | None:
    path = folder / SIDECAR_FILE
    if not path.is_file():
        return None
    data = read_json(path)
    sae, parents, record = data.get("sae"), data.get("parents"), data.get("record") or {}
    if not isinstance(sae, dict) or not isinstance(record, dict):
        raise HsaeError(
            f"{path} has no 'sae' mapping; it is not an hsae sidecar (delete it to import the folder alone)"
        )
    if parents is not None and (
        not isinstance(parents, list)
        or len(parents) != sae.get("n_latents")
        or not all(isinstance(p, int) and -1 <= p < len(parents) for p in parents)
    ):
        raise HsaeError(f"{path}: 'parents' must list one parent id (or -1) per latent")
    return Sidecar(sae=sae, parents=parents, record=record)
