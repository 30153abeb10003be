"""Helpers shared by CLI commands (not a command module: the leading underscore keeps it out of
command discovery)."""

from __future__ import annotations

from pathlib import Path

from hsae.errors import HsaeError


def quiet_transformers() -> None:
    """transformers' own weight-loading bars and notices would interleave with hsae's progress bars."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def harvest_bar(tokens: int, console=None):
    """The harvest's progress bar (a context manager yielding the `progress(done, total)` callback
    that `harvest_to_store` calls)."""
    from hsae.progress import progress_bar

    return progress_bar("harvest", "tokens", total=tokens, console=console)


def model_folder(spec: str) -> tuple[Path, bool]:
    """(local folder, whether it came from the hub) of a model argument: a folder, or
    hf://owner/repo[/folder][@revision] holding an hsae model, read through the local hub cache
    (another library's SAE on the hub is imported first: `hsae import NAME OUT`)."""
    from hsae.formats.hub import is_hub_name, resolve

    if not is_hub_name(spec):
        return Path(spec), False
    folder = resolve(spec).path
    if not (folder / "config.json").is_file() or not (folder / "weights.safetensors").is_file():
        raise HsaeError(
            f"{spec} holds no hsae model folder (config.json + weights.safetensors); for another library's SAE "
            f"run `hsae import {spec} OUT` and use OUT"
        )
    return folder, True
