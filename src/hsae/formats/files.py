"""Reading the files foreign formats are made of, safely: JSON, safetensors, and tensors-only
pickles (`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from hsae.errors import HsaeError


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise HsaeError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HsaeError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise HsaeError(f"{path} should hold a JSON object, found {type(value).__name__}")
    return value


def read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise HsaeError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {key: fh.get_tensor(key) for key in fh.keys()}
    except (SafetensorError, OSError) as err:
        raise HsaeError(f"{path} is not a readable safetensors file ({err})") from None


def read_tensor_pickle(path: Path) -> dict[str, Tensor]:
    """A state dict saved with torch.save, loaded with weights_only=True: nothing but tensors and
    plain containers is unpickled; anything else is refused."""
    if not path.is_file():
        raise HsaeError(f"{path} is missing")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        why = err.__class__.__name__
        raise HsaeError(f"{path} is not a state dict of tensors that loads without unpickling code ({why})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise HsaeError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def require(state: dict[str, Tensor], names: tuple[str, ...], path: Path) -> None:
    missing = [n for n in names if n not in state]
    if missing:
        raise HsaeError(f"{path} lacks {', '.join(missing)} (it holds {', '.join(sorted(state)) or 'nothing'})")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
