"""Helpers shared by CLI commands (not a command module: the leading underscore keeps it out of
command discovery)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


def quiet_transformers() -> None:
    """transformers' own weight-loading bars and notices would interleave with hsae's progress bars."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


@contextmanager
def harvest_bar(tokens: int, console=None) -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar for harvesting; yields the `progress(done, total)` callback the store calls."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("harvest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("harvest", total=tokens)
        yield lambda done, total: bar.update(task, completed=done)
