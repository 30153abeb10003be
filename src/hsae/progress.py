"""A rich progress bar driven by a `progress(done, total)` callback: harvesting, the examples pass,
exports. The total may change as the work learns it (or stay unknown: None)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def progress_bar(
    label: str, unit: str = "tokens", total: int | None = None, console: Any = None
) -> Iterator[Callable[[int, int | None], None]]:
    """Yields `progress(done, total)`; a total of None keeps the one the bar has."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(label, total=total)

        def progress(done: int, new_total: int | None = None) -> None:
            if new_total is None:
                bar.update(task, completed=done)
            else:
                bar.update(task, completed=done, total=new_total)

        yield progress
