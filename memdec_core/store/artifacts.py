"""Artifacts: directories with a ``memdec.json`` manifest, written atomically, cached by content.

A directory is built under a temporary name beside its target and renamed into place only when
complete, so an interrupted build leaves nothing that a rerun could mistake for a finished one;
a disk that refuses the write (full, read-only) is one ``DiskError`` line and the temporary
folder is removed. Manifests carry a ``format_version`` and are checked when opened. Nothing
here uses pickle: loading an artifact never executes code (training checkpoints hold the
optimizer state in ``optimizer.pt``, read with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from memdec_core import __version__
from memdec_core.errors import ArtifactError, shorten
from memdec_core.store.cache_dir import cache_folder, cache_root
from memdec_core.store.disk import disk_errors, require_space

MANIFEST = "memdec.json"
#: The layout version of every manifest memdec writes; a newer one is refused, not misread.
FORMAT_VERSION = 1


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (model, data hash, settings), and of the
    environment that made them (engine versions, memdec's code: ``memdec_core.components.identity``)."""
    from memdec_core.components.identity import environment

    payload = json.dumps([environment(), *parts], sort_keys=True, default=_jsonable, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@contextlib.contextmanager
def atomic_directory(target: Path, needed_bytes: int | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``target`` only if the block succeeds.

    ``needed_bytes``, when known, is checked against the free space before anything is written.
    """
    target = Path(target)
    with disk_errors(target, needed_bytes):
        target.parent.mkdir(parents=True, exist_ok=True)
        if needed_bytes:
            require_space(target.parent, needed_bytes, target)
        temporary = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temporary.mkdir()
    try:
        with disk_errors(target, needed_bytes):
            yield temporary
            if target.exists():  # another process finished the same artifact first
                shutil.rmtree(temporary)
            else:
                os.replace(temporary, target)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_manifest(folder: Path, artifact_type: str, **fields: Any) -> dict:
    """Write ``memdec.json``: type, version, time, command line and the given fields."""
    manifest = {"type": artifact_type, "format_version": FORMAT_VERSION, "memdec_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "command": " ".join(sys.argv), **fields}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=_jsonable) + "\n")
    return manifest


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return str(value)


def read_manifest(folder: Path, expected_type: str, required: dict[str, type | tuple] | None = None) -> dict:
    """Read and check ``memdec.json``: its type, its format version and the ``required`` keys' types.

    A missing, corrupt, foreign or incomplete manifest raises ArtifactError naming the folder;
    keys the schema does not name are kept as they are (a newer memdec may have added them).
    """
    manifest = _load_manifest(folder)
    if manifest.get("type") != expected_type:
        raise ArtifactError(f"{folder} holds a {manifest.get('type')!r} artifact, not a {expected_type!r}")
    version = manifest.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{folder} was written in format {version!r}, newer than this memdec reads "
                            f"({FORMAT_VERSION}); upgrade memdec, or delete the folder and rebuild it")
    _warn_if_newer(folder, manifest)
    for key, kind in (required or {}).items():
        value = manifest.get(key)
        if value is None or isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            expected = " or ".join(t.__name__ for t in kind) if isinstance(kind, tuple) else kind.__name__
            raise ArtifactError(f"{folder}/{MANIFEST} lacks a valid {key!r} (a {expected}, got {value!r}); "
                                f"delete the folder (memdec cache rm {Path(folder).name}) and rerun to rebuild it")
    return manifest


def _warn_if_newer(folder: Path, manifest: dict) -> None:
    """A manifest from a newer memdec may hold fields this one does not know: they are ignored, said once."""
    from packaging.version import InvalidVersion, Version

    from memdec_core.runtime.progress import log

    try:
        newer = Version(str(manifest.get("memdec_version", __version__))) > Version(__version__)
    except InvalidVersion:
        newer = False
    if newer and str(folder) not in _WARNED:
        _WARNED.add(str(folder))
        log(f"warning: {folder} was written by memdec {manifest['memdec_version']} (this is {__version__}); "
            f"fields this version does not know are ignored")


_WARNED: set[str] = set()


def read_manifest_type(folder: Path) -> str | None:
    """The ``type`` of the artifact in ``folder``; ArtifactError when it is not a memdec artifact."""
    return _load_manifest(folder).get("type")


def _load_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a memdec artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path} is corrupt: {error}") from error
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is corrupt: not a JSON object")
    return manifest


def artifact_reference(folder: Path | str) -> str:
    """How a manifest names another artifact: its path relative to the cache root when it lies
    inside the cache (so a cache that is moved, copied or uploaded keeps its links), else absolute."""
    path = Path(folder).expanduser().resolve()
    try:
        return path.relative_to(cache_root().expanduser().resolve()).as_posix()
    except ValueError:
        return str(path)


def resolve_reference(reference: str) -> Path:
    """The folder a manifest's reference names: a relative one lies in the cache (one whose ``..``
    leave it is refused); an absolute one (a folder outside the cache, or what manifests held
    before references became relative) is taken as it is."""
    path = Path(reference).expanduser()
    if path.is_absolute():
        return path
    refuse_climbing(reference, f"the memdec cache ({cache_root()})")
    return cache_root() / path


def refuse_climbing(reference: str, within: str) -> None:
    """ArtifactError when a relative ``reference`` climbs out of ``within`` with ``..``.

    memdec never writes such a reference (``artifact_reference`` is absolute outside the cache),
    so one in a manifest or a composite's config was edited in: a folder from elsewhere must not
    point memdec at arbitrary files on this machine. ``..`` that stay inside are harmless.
    """
    path = Path(reference).expanduser()
    if not path.is_absolute() and Path(os.path.normpath(path)).parts[:1] == ("..",):
        raise ArtifactError(f"the reference {shorten(repr(reference))} points outside {within}: its '..' climb out; "
                            f"refused (name the folder by its absolute path instead)")


def folder_bytes(folder: Path) -> int:
    """Bytes of the files in an artifact folder (what a method adds on disk)."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def cached_artifact(kind: str, key: str) -> Path:
    """Where the cached artifact of ``kind`` with content ``key`` lives (it may not exist yet), in a
    cache that is memdec's (``memdec_core.store.cache_dir``)."""
    return cache_folder(kind) / key


def write_json(path: Path, data: Any) -> None:
    """Write a JSON file atomically (a reader never sees half of it); valid JSON only (no NaN)."""
    text = json.dumps(data, indent=2, sort_keys=False, default=_jsonable, allow_nan=False) + "\n"
    with atomic_file(path) as temporary:
        temporary.write_text(text)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; what the block writes there becomes ``path`` at
    once when it succeeds, and is removed when it fails (disk faults as one line)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with disk_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            yield temporary
            os.replace(temporary, path)
    except BaseException:
        # On a read-only disk even removing a file that was never made fails: the refusal is the news.
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise


def start_or_resume(work: Path, identity: dict[str, Any], what: str) -> bool:
    """Create the work folder of a resumable job, or check that a left-over one used ``identity``.

    Returns True when resuming. An interrupted job may only be continued with identical inputs
    and settings; anything else is refused rather than silently mixed.
    """
    work = Path(work)
    stamp = work / "settings.json"
    identity = json.loads(json.dumps(identity, sort_keys=True, default=_jsonable))
    if stamp.exists():
        try:
            previous = json.loads(stamp.read_text())
        except (OSError, ValueError) as error:
            raise ArtifactError(f"the interrupted {what} in {work} has an unreadable settings.json ({error}); "
                                f"delete that folder to start over") from error
        if previous != identity:
            changed = sorted(key for key in set(identity) | set(previous) if previous.get(key) != identity.get(key))
            raise ArtifactError(f"an interrupted {what} in {work} used other settings ({', '.join(changed)}); "
                                f"rerun with the same settings, or delete that folder to start over")
        return True
    write_json(stamp, identity)
    return False


@contextlib.contextmanager
def replacing_directory(target: Path) -> Iterator[Path]:
    """Like ``atomic_directory``, but an existing ``target`` (an older checkpoint) is replaced.

    Between the two renames the previous version sits at ``.{name}.old``; ``previous_version``
    finds it if a crash falls exactly there.
    """
    target = Path(target)
    temporary = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with disk_errors(target):
            temporary.mkdir(parents=True)
            yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _swap_in(temporary, target)


def _swap_in(temporary: Path, target: Path) -> None:
    """``temporary`` becomes ``target``, the older version deleted. A swap the OS refuses (a full
    disk, a folder in use) leaves the older version at ``target`` and removes ``temporary``."""
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    try:
        with disk_errors(target):
            if target.exists():
                os.replace(target, old)
            os.replace(temporary, target)
    except BaseException:
        if old.exists() and not target.exists():
            with contextlib.suppress(OSError):  # failing that, previous_version still finds it
                os.replace(old, target)
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def previous_version(target: Path) -> Path | None:
    """``target``, or the version a crash inside ``replacing_directory`` left aside, or None."""
    target = Path(target)
    for candidate in (target, target.parent / f".{target.name}.old"):
        if candidate.is_dir():
            return candidate
    return None
