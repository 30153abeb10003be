"""Atomic writes: every file hsae writes appears whole or not at all (temp file, fsync, rename).

The temporary file is `.<name>.<random>.tmp` beside the target. The file written gets the mode
`open(path, "w")` would give it: 0666 less the umask for a new file, the target's own mode when it
exists (a rewrite keeps a file's permissions). A process killed mid-write leaves its temporary file
behind; `remove_stale_temps` clears those when the work is started again. Errors of the operating
system (full disk, read-only folder, ...) become HsaeErrors naming the target file; the target is
then untouched.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from hsae.errors import HsaeError, os_error

TEMP_SUFFIX = ".tmp"
# The temporary file safetensors' save_file writes through (Rust's tempfile: ".tmp" + 6 characters).
_WRITER_TEMP = re.compile(r"^\.tmp[A-Za-z0-9]{6}$")


def _temp_path(path: Path) -> tuple[Path, int]:
    """A new, empty file beside `path`, and the mode a new file gets here (0666 less the umask: the
    kernel applied it to this one, as it does to `open(path, "w")`)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.close(fd)
        return tmp, mode


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed over `path`."""
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path, new_mode = _temp_path(path)
        yield tmp_path
        # The writer may have replaced the temporary file by one of its own (safetensors writes
        # through a 0600 file of its own): the mode is set here, the target's if it exists.
        os.chmod(tmp_path, stat.S_IMODE(path.stat().st_mode) if path.exists() else new_mode)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except OSError as err:
        raise os_error(err, path) from err
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def check_writable(folder: str | os.PathLike, option: str = "--out") -> None:
    """Refuse, before any work, a folder hsae could not write into: the folder, or the nearest of
    its parents that exists, is on a read-only file system or not writable by this user."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == folder else f"{existing}"
        raise HsaeError(
            f"{option} {folder}: cannot write there ({where} is on a read-only file system or not writable by this "
            "user); choose a folder you can write to"
        )


def is_temp_of(name: str, names: Iterable[str]) -> bool:
    """Whether the file name `name` is a temporary file of an atomic write of one of `names` (file
    names or glob patterns such as "shard-*.safetensors"), or of safetensors' own writer (`.tmp` and
    six letters or digits: save_file writes through a temporary file of its own)."""
    if _WRITER_TEMP.match(name):
        return True
    return any(fnmatchcase(name, f".{pattern}.*{TEMP_SUFFIX}") for pattern in names)


def remove_stale_temps(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files (`is_temp_of`) that writes a killed process interrupted left in
    `folder`; returns what was removed. Only for folders hsae owns, when no other process writes
    there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = list(names)
    removed = []
    for path in sorted(folder.iterdir()):
        if is_temp_of(path.name, names) and path.is_file():
            path.unlink()
            removed.append(path)
    return removed


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _standard_json(obj: Any) -> Any:
    """`obj` with NaN and infinities as null: JSON has no such numbers (Python would write `NaN`,
    which other readers refuse)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _standard_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_standard_json(v) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(_standard_json(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
