"""Seconds per stage of a run, so a report says where its time went without a profiler.

Work is wrapped in ``stage(name)``; every open ``recording()`` adds the stage's seconds to its
name. Stages nest, and a stage counts only its own time: a datastore built inside the
``fidelity`` stage counts as ``datastore``, not twice. A report's ``meta.timings`` is the
recording around the whole run, a row's ``timings`` the one around that row.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

#: The stages memdec's own work is split into (docs/reports.md); a plugin may name others.
STAGES = ("load", "tokenise", "datastore", "index", "targets", "train", "tune", "fit", "test", "general", "fidelity",
          "latency")

_recordings: list[dict[str, float]] = []
#: The open stages, innermost last: [name, started, seconds spent in stages nested inside].
_open: list[list] = []


@contextlib.contextmanager
def recording() -> Iterator[dict[str, float]]:
    """A dict that collects the seconds of every stage run inside; when the block ends they are
    rounded, and ``other`` is the block's time outside any stage (imports, set-up, reports)."""
    seconds: dict[str, float] = {}
    _recordings.append(seconds)
    started = time.perf_counter()
    try:
        yield seconds
    finally:
        _recordings.remove(seconds)
        seconds["other"] = max(0.0, time.perf_counter() - started - sum(seconds.values()))
        for name, value in seconds.items():
            seconds[name] = round(value, 2)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as stage ``name`` (its own time: stages opened inside count as theirs)."""
    entry = [name, time.perf_counter(), 0.0]
    _open.append(entry)
    try:
        yield
    finally:
        _open.remove(entry)
        elapsed = time.perf_counter() - entry[1]
        if _open:
            _open[-1][2] += elapsed
        own = elapsed - entry[2]
        for seconds in _recordings:
            seconds[name] = seconds.get(name, 0.0) + own


def timed(name: str):
    """``stage(name)`` around every call of the decorated function."""
    def decorate(function):
        import functools

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with stage(name):
                return function(*args, **kwargs)
        return wrapper
    return decorate


__all__ = ["STAGES", "recording", "stage", "timed"]
