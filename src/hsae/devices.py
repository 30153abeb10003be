"""The one device rule every command follows: CUDA when it is available, else the CPU, unless the
user names a device; a device that does not exist here is a clear error, not a traceback."""

from __future__ import annotations

import torch

from hsae.errors import HsaeError


def resolve_device(name: str | None) -> str:
    """`name` checked ("cpu", "cuda", "cuda:1", ...), or the default when None."""
    if name is None or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise HsaeError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HsaeError(f"--device {name} was asked for but no CUDA GPU is available here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HsaeError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise HsaeError(f"--device {name}: hsae runs on cpu or cuda")
    return str(device)
