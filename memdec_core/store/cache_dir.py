"""The cache folder: where it is, how memdec knows it as its own, and the per-entry locks.

The cache is ``MEMDEC_CACHE`` (default ``~/.cache/memdec``). memdec writes a ``CACHEDIR.TAG``
(the Cache Directory Tagging convention, so backup tools skip the folder too) when it creates the
cache, and recognises a cache only by that file with memdec's own line in it. A cache an earlier
memdec made (no tag, but memdec manifests in its kind folders) is tagged the first time it is
opened. Any other non-empty folder is refused, so a mistyped ``MEMDEC_CACHE=/`` or a shared
folder is never written into, listed or cleaned as if it were a cache.

- ``cache_folder(kind)`` is where every writer puts ``<kind>/`` entries: it tags a new cache.
- ``open_cache(create=False)`` is how ``memdec cache ls|du|rm`` check the folder before reading.
- ``entry_lock(target)`` is a per-entry file lock (filelock): two runs sharing a cache wait for
  each other's artifact instead of racing to build it; a read-only cache can still be read.
  ``shared_entry_lock(target)`` is the same for an entry the ranks of one run build together.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from memdec_core.errors import ConfigError, DiskError
from memdec_core.runtime.distributed import alone, barrier, sharding, world
from memdec_core.store.disk import (
    cache_root,
    disk_errors,
    is_refusal,
    nearest_existing,
    pid_alive,
    refusal,
    temporary_pid,
)

CACHE_MARKER = "CACHEDIR.TAG"
TAG_TEMPORARY = f".{CACHE_MARKER}.tmp-"  # a tag being written, atomically renamed into place
#: The line that makes a ``CACHEDIR.TAG`` memdec's (other tools write the same file name).
MARKER_LINE = "# This file is a cache directory tag created by memdec."
MARKER_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n" + MARKER_LINE + "\n"
               "# memdec cache ls|du|rm work only in a folder that holds this file.\n"
               "# For information about cache directory tags see https://bford.info/cachedir/\n")
#: Kinds whose every finished entry is a folder with a ``memdec.json``: what tells an untagged
#: cache of an earlier memdec from a folder that is not a cache.
MANIFEST_KINDS = frozenset({"datastores", "targets", "teacher-targets", "memories", "lora", "dapt",
                            "passage-indexes", "indexes"})
#: Every kind memdec itself writes (plugins may add theirs).
KNOWN_KINDS = MANIFEST_KINDS | {"results", "models", "fingerprints", "domain-stats", "tokens", "hub", "fidelity",
                                 "combiners"}
#: Folders that hold no artifacts: the per-entry lock files (empty, reused by the next run).
INFRASTRUCTURE = frozenset({"locks"})
#: Every entry memdec writes has a content hash of at least 12 hex digits in its name (``content_key``: 20).
KEYED = re.compile(r"[0-9a-f]{12}")
#: How many entries of each kind folder are read when looking for an earlier memdec's entries.
LEGACY_PROBE = 50
#: How long a wait for another process's lock is silent before memdec says it is waiting.
QUIET_WAIT_SECONDS = 1.0


def cache_folder(kind: str) -> Path:
    """The cache's ``kind`` folder (it may not exist yet), in a cache that is memdec's: a new or
    empty one is tagged now; a folder holding other things is refused (ConfigError)."""
    return open_cache(create=True) / kind


def open_cache(root: Path | None = None, *, create: bool = False) -> Path:
    """``root`` (default: the cache), checked to be a memdec cache.

    Tagged, new, empty or an earlier memdec's (then tagged now) is fine; with ``create`` a new or
    empty folder is tagged, without it a missing one is left missing (an empty cache). A file, or
    a folder with other contents and no tag, raises ConfigError: nothing in it is read or written.
    """
    root = Path(root) if root is not None else cache_root()
    if is_memdec_cache(root):
        return root
    _refuse_a_file(root)
    if _is_empty(root):
        if create:
            _tag(root)
        return root
    if holds_memdec_artifacts(root):
        _tag_if_writable(root)
        return root
    raise ConfigError(f"{root} is not a memdec cache (no {CACHE_MARKER} from memdec, no memdec artifacts); "
                      f"set MEMDEC_CACHE to a new or empty folder. Nothing was read, written or removed")


def _refuse_a_file(root: Path) -> None:
    """ConfigError when ``root`` is a file, or lies under one (``MEMDEC_CACHE=notes.txt/cache``)."""
    blocker = nearest_existing(root)
    if blocker.exists() and not blocker.is_dir():
        inside = "" if blocker == root else f" ({blocker} is a file)"
        raise ConfigError(f"the cache {root} is not a folder{inside}; set MEMDEC_CACHE to a folder")


def is_memdec_cache(root: Path) -> bool:
    """Whether ``root`` holds memdec's ``CACHEDIR.TAG``."""
    try:
        with open(Path(root) / CACHE_MARKER, encoding="utf-8", errors="replace") as handle:
            return MARKER_LINE in handle.read(4096)
    except OSError:
        return False


def holds_memdec_artifacts(root: Path) -> bool:
    """Whether ``root`` looks like an untagged cache of an earlier memdec: a ``<kind>/<key>/memdec.json``
    manifest of memdec's under one of the kinds that always have one, or nothing but memdec's kind
    folders holding keyed entries (a cache that only ever held token streams, rows and locks)."""
    for kind in sorted(MANIFEST_KINDS):
        with contextlib.suppress(OSError):
            for entry in itertools.islice((Path(root) / kind).iterdir(), LEGACY_PROBE):
                if _is_memdec_manifest(entry / "memdec.json"):
                    return True
    return _only_memdec_folders(Path(root))


def _only_memdec_folders(root: Path) -> bool:
    try:
        folders = list(root.iterdir())
        if not folders or any(not folder.is_dir() or folder.name not in KNOWN_KINDS | INFRASTRUCTURE
                              for folder in folders):
            return False
        names = [entry.name for folder in folders for entry in itertools.islice(folder.iterdir(), LEGACY_PROBE)]
    except OSError:
        return False
    return bool(names) and all(KEYED.search(name) for name in names)


def _is_memdec_manifest(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and isinstance(manifest.get("type"), str) and "memdec_version" in manifest


def _is_empty(root: Path) -> bool:
    """Whether ``root`` is missing or holds nothing but tags being written: another process that
    is creating the same cache has a half-written tag in it for a moment, and the cache is no less
    new for it (both tag it; the tag is written atomically)."""
    try:
        with os.scandir(root) as entries:
            return all(entry.name.startswith(TAG_TEMPORARY) for entry in entries)
    except FileNotFoundError:
        return True


def _tag(root: Path) -> None:
    """Write the tag atomically (a reader never sees half of it)."""
    marker = root / CACHE_MARKER
    temporary = root / f"{TAG_TEMPORARY}{os.getpid()}"
    with disk_errors(marker):
        root.mkdir(parents=True, exist_ok=True)
        try:
            temporary.write_text(MARKER_TEXT, encoding="utf-8")
            os.replace(temporary, marker)
        finally:
            temporary.unlink(missing_ok=True)


def _tag_if_writable(root: Path) -> None:
    """Tag an earlier memdec's cache; one on a read-only disk is still read, untagged."""
    from memdec_core.runtime.progress import log

    try:
        _tag(root)
    except DiskError:
        return
    log(f"{root} is a cache of an earlier memdec: tagged it as one ({CACHE_MARKER})")


# --- locks -----------------------------------------------------------------------------------


def lock_file(target: Path) -> Path:
    """Where ``target``'s lock lives: one folder of lock files, so artifacts hold only their own files."""
    folder = cache_folder("locks")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / _lock_name(target)


def _lock_name(target: Path) -> str:
    digest = hashlib.sha256(str(Path(target).expanduser().resolve()).encode()).hexdigest()[:24]
    return f"{Path(target).name}-{digest}.lock"


def entry_busy(target: Path, root: Path) -> bool:
    """Whether a process holds the lock of ``target`` (an entry of the cache ``root``) now: a job is
    building it, in its ``.partial`` work folder. Nothing waits, and no lock file is created."""
    with contextlib.suppress(FileNotFoundError):
        with claimed_if_idle(target, root, create=False) as idle:
            return not idle
    return False


@contextlib.contextmanager
def claimed_if_idle(target: Path, root: Path, *, create: bool = True) -> Iterator[bool]:
    """Take ``target``'s lock (an entry of the cache ``root``) if no other process holds it, and hold
    it for the block: yields True, and no job can start building ``target`` meanwhile. Yields
    False, at once, while a job holds it. A lock that cannot be taken because the cache is
    read-only yields True: no job can be writing there. ``create=False``: a missing lock file
    raises FileNotFoundError rather than being made."""
    from filelock import FileLock, Timeout

    path = Path(root) / "locks" / _lock_name(target)
    if not create and not path.exists():
        raise FileNotFoundError(path)
    lock = FileLock(str(path))
    try:
        path.parent.mkdir(exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        yield False
        return
    except OSError:
        yield True
        return
    try:
        yield True
    finally:
        lock.release()


def remove_stale(target: Path) -> None:
    """Remove temporary folders of ``target`` whose process is dead (killed mid-write)."""
    prefix = f".{Path(target).name}.tmp-"
    parent = Path(target).parent
    if not parent.is_dir():
        return
    for candidate in parent.iterdir():
        pid = temporary_pid(candidate.name) if candidate.name.startswith(prefix) else None
        if pid is not None and pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(candidate, ignore_errors=True)


@contextlib.contextmanager
def entry_lock(target: Path) -> Iterator[None]:
    """Hold ``target``'s lock (a file under the cache's ``locks/``) while it is checked and built.

    Another process building the same entry is waited for, then its result is reused. Where no
    lock can be taken because the cache is read-only, a finished entry is still read; building
    one is refused in one line. The holder works alone: under several processes, the other ranks
    wait on the lock, not in a collective.
    """
    with _holding(target), alone():
        yield


@contextlib.contextmanager
def shared_entry_lock(target: Path) -> Iterator[None]:
    """:func:`entry_lock` for an entry that the ranks of a run check and build together.

    Rank 0 holds the lock, so other runs sharing the cache wait as they do for ``entry_lock``; no
    rank looks at the entry before rank 0 holds it, and none leaves before every rank is done.
    Under one process (or inside another entry's lock) it is ``entry_lock``.
    """
    if sharding().size == 1:
        with entry_lock(target):
            yield
        return
    with _holding(target) if world().main else contextlib.nullcontext():
        barrier()
        yield
        barrier()


@contextlib.contextmanager
def _holding(target: Path) -> Iterator[None]:
    """The file lock of ``target``, with the temporary folders of dead writers cleared."""
    from filelock import FileLock, Timeout

    from memdec_core.runtime.progress import log

    target = Path(target)
    try:
        lock = FileLock(str(lock_file(target)))
        try:
            lock.acquire(timeout=QUIET_WAIT_SECONDS)
        except Timeout:
            log(f"waiting for another memdec process to finish {target}")
            lock.acquire()
    except (DiskError, OSError) as error:
        if target.exists():  # a read-only cache: reading a finished artifact needs no lock
            yield
            return
        if isinstance(error, OSError) and is_refusal(error):
            raise refusal(error, target) from error
        raise
    try:
        remove_stale(target)
        yield
    finally:
        lock.release()
