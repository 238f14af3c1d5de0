"""Small facts computed once and remembered in the cache (``<cache>/fingerprints/``): a file's
digest, a tokenizer's facts, the bytes of a token stream's text. Each is a short JSON value under a
name that says what it was computed from, so it is never stale: other inputs, another name.

A memo that cannot be read is computed again; one that cannot be written (a read-only or full
cache) only costs the work next time. A memo is written through a temporary file and renamed, so
a reader never sees half of one, and two runs writing the same memo write the same value.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from memdec_core.errors import DiskError

#: The cache's folder of memos.
MEMO_KIND = "fingerprints"


def remembered(name: str, compute: Callable[[], Any]) -> Any:
    """The JSON value remembered under ``name``, else ``compute()`` (remembered now)."""
    value = recall(name)
    if value is None:
        value = compute()
        remember(name, value)
    return value


def recall(name: str) -> Any:
    """The JSON value remembered under ``name``; None where there is none or it cannot be read."""
    path = memo_path(name)
    try:
        return json.loads(path.read_text()) if path is not None and path.is_file() else None
    except (OSError, ValueError):
        return None  # damaged: the caller computes it again


def remember(name: str, value: Any) -> None:
    """Remember the JSON-serialisable ``value`` under ``name`` (not at all where the cache is read-only)."""
    path = memo_path(name)
    if path is not None:
        write_memo(path, json.dumps(value))


def memo_path(name: str) -> Path | None:
    """Where the memo ``name`` lives; None where there is no usable cache."""
    from memdec_core.store.cache_dir import cache_folder

    try:
        return cache_folder(MEMO_KIND) / name
    except DiskError:  # a new cache on a read-only disk
        return None


def write_memo(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file; an unwritable cache is left as it is."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(text)
        temporary.replace(path)
    except OSError:
        pass
