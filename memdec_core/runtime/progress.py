"""Progress bars and log lines, always on stderr (stdout carries results only)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

stderr = Console(stderr=True)


_QUIET = [False]


def progress_enabled() -> bool:
    """Bars and log lines are on, except when quiet, and only in the first of several processes."""
    from memdec_core.runtime.distributed import world

    return not _QUIET[0] and world().main and os.environ.get("MEMDEC_NO_PROGRESS", "") in ("", "0")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bars or log lines inside (work repeated to time it would print dozens)."""
    before, _QUIET[0] = _QUIET[0], True
    try:
        yield
    finally:
        _QUIET[0] = before


@contextlib.contextmanager
def progress_bar(description: str, total: int, unit: str = "") -> Iterator:
    """A rich progress bar on stderr; yields a callable ``advance(n=1, **fields)``."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[note]}")]
    with Progress(*columns, console=stderr, disable=not progress_enabled(), transient=False) as progress:
        task = progress.add_task(description, total=total, note="")

        def advance(n: int = 1, note: str | None = None) -> None:
            progress.update(task, advance=n, **({"note": note} if note is not None else {}))

        yield advance


def log(message: str) -> None:
    """A status line for humans on stderr."""
    if progress_enabled():
        stderr.print(f"[dim]memdec:[/dim] {message}", highlight=False)


def warn(message: str) -> None:
    """A line the user should read even with progress off (what memdec cannot vouch for); once per
    launch of several processes."""
    from memdec_core.runtime.distributed import world

    if world().main:
        stderr.print(f"memdec: warning: {message}", highlight=False, markup=False, soft_wrap=True)
