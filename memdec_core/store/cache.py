"""The artifact cache: what it holds, how much room it takes, and removing what is no longer wanted.

The cache (``memdec_core.store.cache_dir``) holds ``<kind>/<key>`` entries: artifact folders with a
``memdec.json`` manifest, compare rows (``results/<key>/row.json``), converted GGUF models
(``models/<name>-<key>/``) and small memo files (``fingerprints/<hash>``). Beside them, interrupted
or killed jobs leave hidden folders: ``.<key>.tmp-<PID>-<hex>`` (an atomic write; stale once the
process is gone) and ``.<key>.partial`` (the work folder that a rerun resumes).

Only what memdec writes is ever listed or removed: the folder must be a memdec cache
(``cache_dir.open_cache``), and an entry must be one of memdec's kinds with a content key in its
name, or carry a memdec manifest (a plugin's kind); everything else in the folder is left alone.

This module only reads and deletes files: it imports neither torch nor faiss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable, Sequence

from memdec_core.errors import ArtifactError, ConfigError, UnknownComponentError
from memdec_core.store.artifacts import MANIFEST
from memdec_core.store.cache_dir import (
    INFRASTRUCTURE,
    KEYED,
    KNOWN_KINDS,
    MANIFEST_KINDS,
    claimed_if_idle,
    entry_busy,
    open_cache,
)
from memdec_core.store.disk import TEMPORARY_NAME, human_bytes, pid_alive  # noqa: F401 (human_bytes: re-exported for the CLI)

COMPLETE, PARTIAL, IN_PROGRESS, STALE = "complete", "partial", "in progress", "stale"
#: Why a ``.partial`` folder is left alone: the job building its entry holds the entry's lock.
RUNNING_JOB = "a running job is writing it (it holds the entry's lock)"


#: What a finished ``hub/`` snapshot holds beside its splits (``memdec_domains.hub`` writes it last).
HUB_SNAPSHOT_RECORD = "snapshot.json"
#: How short a key prefix may be (a shorter one would too easily match the wrong entry).
MIN_PREFIX = 6
MADE_BY_WIDTH = 60

_MEMO_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)$")  # fingerprints' files in the making
_PARTIAL = re.compile(r"^\.(?P<target>.+)\.partial$")
_AGE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[smhdw])\s*$")
_AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One entry of the cache: a ``<kind>/<key>`` folder or file, or a job's left-over beside one."""

    kind: str
    key: str
    path: Path
    type: str | None
    bytes: int
    created: dt.datetime  # timezone-aware (UTC)
    made_by: str
    status: str
    pid: int | None = None

    @property
    def name(self) -> str:
        """``kind/key``: how ``memdec cache rm`` accepts it, whatever else shares the key."""
        return f"{self.kind}/{self.key}"

    def as_dict(self) -> dict:
        """A JSON-ready dict (sizes in bytes, ``created`` in ISO 8601 UTC)."""
        return {"kind": self.kind, "key": self.key, "type": self.type, "bytes": self.bytes,
                "created": self.created.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "made_by": self.made_by, "status": self.status, "pid": self.pid, "path": str(self.path)}


@dataclasses.dataclass
class Removal:
    """What ``remove_entries`` did: the entries removed, those it could not remove (and why), and
    those it left alone because a running job is writing them (and why)."""

    removed: list[CacheEntry] = dataclasses.field(default_factory=list)
    failed: list[tuple[CacheEntry, str]] = dataclasses.field(default_factory=list)
    skipped: list[tuple[CacheEntry, str]] = dataclasses.field(default_factory=list)

    @property
    def freed(self) -> int:
        """Bytes freed."""
        return sum(entry.bytes for entry in self.removed)


# --- listing ---------------------------------------------------------------------------------


def cache_entries(kind: str | None = None, root: Path | None = None) -> list[CacheEntry]:
    """Every entry of the cache (of one ``kind``), sorted by kind then creation time.

    A missing cache is empty; a folder that is not a memdec cache raises ConfigError. An entry
    that vanishes while it is read is left out; one that cannot be read is listed with what could
    be learnt about it; anything memdec did not write is not an entry.
    """
    root = open_cache(root)
    entries = [entry for folder in _kind_folders(root, kind) for entry in _folder_entries(folder)]
    return sorted(entries, key=lambda entry: (entry.kind, entry.created, entry.key))


def _kind_folders(root: Path, kind: str | None) -> list[Path]:
    try:
        folders = sorted(path for path in root.iterdir() if path.is_dir())
    except FileNotFoundError:
        folders = []
    except OSError as error:
        raise ArtifactError(f"cannot read the cache {root}: {error.strerror or error}") from error
    folders = [folder for folder in folders if folder.name not in INFRASTRUCTURE]
    if kind is None:
        return folders
    present = {folder.name: folder for folder in folders}
    if kind not in present and kind not in KNOWN_KINDS:  # a typo, or a path: never look outside the cache
        raise UnknownComponentError("cache kind", kind, sorted(KNOWN_KINDS | set(present)))
    return [present[kind]] if kind in present else []


def _folder_entries(folder: Path) -> list[CacheEntry]:
    try:
        children = sorted(folder.iterdir())
    except OSError:  # vanished or unreadable: nothing to list in it
        return []
    entries = [_entry_or_none(folder.name, path) for path in children if is_memdec_entry(folder.name, path)]
    return [entry for entry in entries if entry is not None]


def is_memdec_entry(kind: str, path: Path) -> bool:
    """Whether ``path`` in the cache's ``kind`` folder is something memdec wrote: under one of
    memdec's kinds, a name holding a content key; under another kind (a plugin's), a memdec manifest."""
    work = TEMPORARY_NAME.match(path.name) or _PARTIAL.match(path.name) or _MEMO_TEMPORARY.match(path.name)
    if kind in KNOWN_KINDS or work:
        return bool(KEYED.search(work["target"] if work else path.name))
    return not path.is_symlink() and _read_object(path / MANIFEST) is not None


def _entry_or_none(kind: str, path: Path) -> CacheEntry | None:
    try:
        return describe_entry(kind, path)
    except FileNotFoundError:  # removed while we looked
        return None
    except OSError as error:
        return _unreadable(kind, path, error)


def describe_entry(kind: str, path: Path) -> CacheEntry:
    """The entry ``path`` of ``kind``: its type, size, creation time, maker and status."""
    info = path.lstat()
    mtime = dt.datetime.fromtimestamp(info.st_mtime, dt.timezone.utc)
    size = path_bytes(path)
    temporary = TEMPORARY_NAME.match(path.name) or (kind == "fingerprints" and _MEMO_TEMPORARY.match(path.name))
    if temporary:
        pid = int(temporary["pid"])
        alive = pid_alive(pid)
        return CacheEntry(kind, path.name, path, None, size, mtime,
                          f"process {pid} ({'running' if alive else 'gone'})", IN_PROGRESS if alive else STALE, pid)
    partial = _PARTIAL.match(path.name)
    if partial:
        manifest = _read_object(path / MANIFEST) if path.is_dir() else None
        created, artifact_type = _created(manifest, mtime), (manifest or {}).get("type")
        if entry_busy(path.parent / partial["target"], path.parent.parent):  # its job runs: never stale, never gone
            return CacheEntry(kind, path.name, path, artifact_type, size, created, RUNNING_JOB, IN_PROGRESS)
        return CacheEntry(kind, path.name, path, artifact_type, size, created,
                          made_by(manifest) if manifest else "interrupted job (a rerun resumes it)", PARTIAL)
    artifact_type, description, status, created = _contents(kind, path, mtime)
    return CacheEntry(kind, path.name, path, artifact_type, size, created, description, status)


def _contents(kind: str, path: Path, mtime: dt.datetime) -> tuple[str | None, str, str, dt.datetime]:
    """(type, made by, status, created) of a finished-looking entry."""
    if not path.is_dir():
        return ("fingerprint" if kind == "fingerprints" else "file"), "-", COMPLETE, mtime
    if kind == "results":
        return _result_row(path, mtime)
    if kind == "hub":
        return _hub_snapshot(path, mtime)
    if kind == "models" and not (path / MANIFEST).exists():
        if (path / "config.json").is_file():
            return "converted-model", f"GGUF conversion of {_model_stem(path.name)}", COMPLETE, mtime
        return None, "no config.json", STALE, mtime
    manifest = _read_object(path / MANIFEST)
    if manifest is not None:
        return manifest.get("type"), made_by(manifest), COMPLETE, _created(manifest, mtime)
    if (path / MANIFEST).exists():
        return None, f"corrupt {MANIFEST}", STALE, mtime
    if kind in MANIFEST_KINDS:
        return None, f"no {MANIFEST}", STALE, mtime
    return None, "-", COMPLETE, mtime  # a plugin's kind: memdec cannot tell what is expected


def _result_row(path: Path, mtime: dt.datetime) -> tuple[str | None, str, str, dt.datetime]:
    row_file = path / "row.json"
    row = _read_object(row_file)
    if row is None or "method" not in row:
        return None, "corrupt row.json" if row_file.exists() else "no row.json", STALE, mtime
    created = dt.datetime.fromtimestamp(row_file.stat().st_mtime, dt.timezone.utc)
    return "compare-row", _shorten(f"{row.get('base', '?')} / {row['method']}"), COMPLETE, created


def _hub_snapshot(path: Path, mtime: dt.datetime) -> tuple[str | None, str, str, dt.datetime]:
    record = _read_object(path / HUB_SNAPSHOT_RECORD)
    if record is None or "dataset" not in record:
        return None, f"no {HUB_SNAPSHOT_RECORD}", STALE, mtime
    documents = sum((record.get("documents") or {}).values())
    return "hub-snapshot", _shorten(f"{documents:,} documents of {record['dataset']}"), COMPLETE, mtime


def _model_stem(name: str) -> str:
    stem, _, key = name.rpartition("-")
    return stem if stem and re.fullmatch(r"[0-9a-f]{8,}", key) else name


def _unreadable(kind: str, path: Path, error: OSError) -> CacheEntry:
    """An entry memdec may not read: listed, never called stale (so ``--stale`` leaves it)."""
    status = PARTIAL if _PARTIAL.match(path.name) else COMPLETE
    return CacheEntry(kind, path.name, path, None, 0, dt.datetime.fromtimestamp(0, dt.timezone.utc),
                      f"unreadable: {error.strerror or error}", status)


def made_by(manifest: dict) -> str:
    """A short description of what made an artifact: its base model, teacher and init, or its command."""
    if manifest.get("base_model"):
        text = str(manifest["base_model"])
    elif manifest.get("teacher"):
        text = f"{manifest['teacher']} → {manifest['init']}" if manifest.get("init") else str(manifest["teacher"])
    elif manifest.get("retriever"):
        text = f"{manifest['retriever']} index"
    else:
        text = str(manifest.get("command") or "-")
    return _shorten(text)


def _shorten(text: str) -> str:
    return text if len(text) <= MADE_BY_WIDTH else text[:MADE_BY_WIDTH - 1] + "…"


def _created(manifest: dict | None, fallback: dt.datetime) -> dt.datetime:
    """The manifest's ``created`` time (ISO 8601, UTC when it names no zone), else ``fallback``."""
    text = (manifest or {}).get("created")
    if not isinstance(text, str):
        return fallback
    try:
        created = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return fallback
    return created if created.tzinfo else created.replace(tzinfo=dt.timezone.utc)


def _read_object(path: Path) -> dict | None:
    """The JSON object in ``path``; None when it is missing, corrupt or not an object."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: bad JSON or bad UTF-8
        return None
    return data if isinstance(data, dict) else None


def path_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (a file: its size); links are not followed, vanished files skipped."""
    info = path.lstat()
    if not path.is_dir() or path.is_symlink():
        return info.st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


# --- summing up ------------------------------------------------------------------------------


def disk_usage(entries: Iterable[CacheEntry]) -> dict:
    """Bytes and entry count per kind and in total: ``{"kinds": [{"kind", "entries", "bytes"}], "total": {...}}``."""
    kinds: dict[str, dict] = {}
    for entry in entries:
        row = kinds.setdefault(entry.kind, {"kind": entry.kind, "entries": 0, "bytes": 0})
        row["entries"] += 1
        row["bytes"] += entry.bytes
    rows = sorted(kinds.values(), key=lambda row: row["kind"])
    return {"kinds": rows, "total": {"entries": sum(row["entries"] for row in rows),
                                     "bytes": sum(row["bytes"] for row in rows)}}


def parse_age(text: str) -> dt.timedelta:
    """``7d``, ``12h``, ``30m``, ``45s`` or ``2w`` as a timedelta; ConfigError otherwise."""
    match = _AGE.match(str(text))
    if not match:
        raise ConfigError(f"age {text!r} is not a number and a unit, like 7d, 12h or 30m (units: s m h d w)")
    return dt.timedelta(**{_AGE_UNITS[match["unit"]]: float(match["number"])})


# --- choosing and removing -------------------------------------------------------------------


def select_entries(entries: Sequence[CacheEntry], keys: Sequence[str] = (), *, kind: str | None = None,
                   older_than: dt.timedelta | None = None, stale: bool = False, partial: bool = False,
                   now: dt.datetime | None = None) -> list[CacheEntry]:
    """The entries to remove: those that match every selector given.

    ``keys`` are keys, unique key prefixes (at least 6 characters) or ``kind/key`` names; an unknown,
    too short or ambiguous one raises ConfigError, as does naming an entry a live process is writing.
    ``stale`` picks stale left-overs, ``partial`` resumable work folders (and those a running job is
    writing, which ``remove_entries`` skips, saying so). Without either, entries chosen by ``kind``
    or ``older_than`` alone are complete or stale ones: a resumable ``.partial`` folder goes only
    when asked for, and a live job's folder never.
    """
    if not (keys or kind or older_than is not None or stale or partial):
        raise ConfigError("nothing selected: give KEYs, a kind, an age, stale or partial (never everything at once)")
    pool = [entry for entry in entries if kind is None or entry.kind == kind]
    if keys:
        pool = resolve_keys(pool, keys)
    statuses = {status for status, wanted in ((STALE, stale), (PARTIAL, partial)) if wanted}
    if not statuses:
        statuses = {COMPLETE, STALE, PARTIAL} if keys else {COMPLETE, STALE}
    chosen = [entry for entry in pool if entry.status in statuses or (partial and is_work_folder(entry))]
    if older_than is not None:
        limit = (now or dt.datetime.now(dt.timezone.utc)) - older_than
        chosen = [entry for entry in chosen if entry.created <= limit]
    return chosen


def resolve_keys(entries: Sequence[CacheEntry], keys: Sequence[str]) -> list[CacheEntry]:
    """The entries that ``keys`` name (each exactly one), in the order given, without repeats."""
    chosen: dict[str, CacheEntry] = {}
    for key in keys:
        entry = _resolve_key(entries, key)
        if entry.status == IN_PROGRESS:
            writer = f"process {entry.pid}, which is running" if entry.pid is not None else "a running job"
            raise ConfigError(f"{entry.name} is being written by {writer}; nothing removed")
        chosen.setdefault(entry.name, entry)
    return list(chosen.values())


def _resolve_key(entries: Sequence[CacheEntry], key: str) -> CacheEntry:
    exact = [entry for entry in entries if key in (entry.key, entry.name)]
    if len(exact) == 1:
        return exact[0]
    if exact:
        raise ConfigError(f"cache key {key!r} is ambiguous: {_names(exact)}; give KIND/KEY or --kind")
    if _is_a_path(key, entries):
        raise _a_path_given(entries, key)
    if len(key.rpartition("/")[2]) < MIN_PREFIX:
        raise ConfigError(f"cache key {key!r} is no entry's key, and too short a prefix "
                          f"(at least {MIN_PREFIX} characters); see memdec cache ls")
    matches = [entry for entry in entries if entry.key.startswith(key) or entry.name.startswith(key)]
    if not matches:
        raise _unknown_key(entries, key)
    if len(matches) > 1:
        raise ConfigError(f"cache key {key!r} is ambiguous: {_names(matches)}; give more characters")
    return matches[0]


def _is_a_path(key: str, entries: Sequence[CacheEntry]) -> bool:
    """Whether ``key`` is a file system path rather than a key: ``/``, ``~``, ``./`` or ``../`` in
    front, more than one ``/``, or ``FOLDER/NAME`` where FOLDER is no kind of the cache."""
    if key.startswith(("/", "~", "./", "../")) or key.count("/") > 1 or (os.sep != "/" and os.sep in key):
        return True
    folder, slash, _ = key.partition("/")
    return bool(slash) and folder not in KNOWN_KINDS | {entry.kind for entry in entries}


def _a_path_given(entries: Sequence[CacheEntry], key: str) -> ConfigError:
    """The error for a path given as a key; it names the entry when the path is one of the cache's."""
    where = os.path.realpath(os.path.expanduser(key))
    named = next((entry for entry in entries if os.path.realpath(entry.path) == where), None)
    that = f"; that path is the entry {named.name}" if named else ""
    return ConfigError(f"{key!r} is a path; memdec cache rm takes the keys that memdec cache ls lists "
                       f"(KEY, a unique prefix of {MIN_PREFIX}+ characters, or KIND/KEY){that}")


def _unknown_key(entries: Sequence[CacheEntry], key: str, limit: int = 10) -> Exception:
    """The error for a key no entry has: every key of a small cache, or those that look alike."""
    keys = sorted({entry.key for entry in entries})
    if len(keys) <= limit:
        return UnknownComponentError("cache entry", key, keys, hint="see memdec cache ls")
    import difflib

    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    guess = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    return ConfigError(f"unknown cache entry {key!r}{guess} ({len(keys)} entries: see memdec cache ls)")


def _names(entries: Sequence[CacheEntry], limit: int = 4) -> str:
    names = [entry.name for entry in entries[:limit]]
    return ", ".join(names) + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def remove_entries(entries: Iterable[CacheEntry], root: Path | None = None) -> Removal:
    """Delete ``entries`` (each must be memdec's, directly in a kind folder of the cache); report what went.

    The cache and every entry are checked again first: anything memdec did not write raises
    ConfigError before anything is deleted. An entry that cannot be deleted (a read-only cache) is
    reported in ``failed``, not raised; one that a job started writing since it was listed is left
    alone, as is a ``.partial`` work folder whose job runs (it holds the entry's lock): ``skipped``.
    """
    root = open_cache(root)
    entries = list(entries)
    for entry in entries:
        if entry.path.parent.parent != root or entry.path.parent.name != entry.kind \
                or not is_memdec_entry(entry.kind, entry.path):
            raise ConfigError(f"{entry.path} is not an entry of the memdec cache {root}; nothing removed")
    removal = Removal()
    for entry in entries:
        if entry.pid is not None and pid_alive(entry.pid):
            removal.failed.append((entry, f"process {entry.pid} is writing it"))
            continue
        with _unless_a_job_writes(entry, root) as idle:
            if not idle:
                removal.skipped.append((entry, RUNNING_JOB))
                continue
            try:
                _delete(entry.path)
            except OSError as error:
                removal.failed.append((entry, error.strerror or str(error)))
            else:
                removal.removed.append(entry)
    return removal


def _unless_a_job_writes(entry: CacheEntry, root: Path):
    """For a work folder, its entry's lock (``claimed_if_idle``): it goes only while the lock is
    ours, so no job can start writing it meanwhile. Any other entry: True."""
    partial = _PARTIAL.match(entry.path.name)
    if not partial:
        return contextlib.nullcontext(True)
    return claimed_if_idle(entry.path.parent / partial["target"], root)


def is_work_folder(entry: CacheEntry) -> bool:
    """Whether ``entry`` is a ``.partial`` work folder (resumable, or a running job's)."""
    return bool(_PARTIAL.match(entry.key))


def _delete(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    try:
        shutil.rmtree(path)
    except FileNotFoundError:  # something inside vanished meanwhile: once more for the rest
        if path.exists():
            shutil.rmtree(path)
