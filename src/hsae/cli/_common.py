"""Helpers shared by CLI commands (not a command module: the leading underscore keeps it out of
command discovery)."""

from __future__ import annotations


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
