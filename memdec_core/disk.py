"""Writing to a disk that may be full, read-only or shared with other memdec processes.

- ``disk_errors(target)`` turns the OS's refusals (ENOSPC, EDQUOT, EROFS, EACCES, EIO) into one
  ``DiskError`` line that says what could not be written, why, and how much space it needs.
- ``require_space(folder, needed)`` refuses up front a write that cannot fit.
- ``entry_lock(target)`` is a per-entry file lock (filelock): two runs sharing a cache wait for
  each other's artifact instead of racing to build it; a read-only cache can still be read.
  ``shared_entry_lock(target)`` is the same for an entry the ranks of one run build together.
- ``remove_stale(target)`` clears the temporary folders that killed processes left beside a target.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from memdec_core.distributed import alone, barrier, sharding, world
from memdec_core.errors import DiskError

#: errno → what the user is told.
REFUSALS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.EIO: "an input/output error (a failing disk?)"}
#: How long a wait for another process's lock is silent before memdec says it is waiting.
QUIET_WAIT_SECONDS = 1.0


def human_bytes(count: int) -> str:
    """1234567 → ``1.2 MB`` (powers of 1000, as the rest of memdec reports sizes)."""
    if count < 1000:
        return f"{count} B"
    value = float(count)
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if value < 999.95 or unit == "PB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def free_bytes(path: Path) -> int | None:
    """Free space on the file system holding ``path`` (or its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def is_refusal(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in REFUSALS


def refusal(error: OSError, target: Path, needed: int | None = None) -> DiskError:
    """The one-line error for an OS refusal while writing ``target``."""
    message = f"cannot write {target}: {REFUSALS.get(error.errno, error.strerror)}"
    free = free_bytes(target)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        needs = f"needs about {human_bytes(needed)}, " if needed else ""
        message += f" ({needs}{human_bytes(free or 0)} free); free some space (memdec cache rm ...) or set " \
                   f"MEMDEC_CACHE to a larger disk"
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        message += "; set MEMDEC_CACHE to a writable folder"
    return DiskError(message)


@contextlib.contextmanager
def disk_errors(target: Path, needed: int | None = None) -> Iterator[None]:
    """Inside: an OS refusal becomes a one-line DiskError about ``target``."""
    try:
        yield
    except OSError as error:
        if not is_refusal(error):
            raise
        raise refusal(error, Path(target), needed) from error


def require_space(folder: Path, needed: int, target: Path | None = None) -> None:
    """Refuse before starting a write of ``needed`` bytes that the disk cannot hold."""
    free = free_bytes(folder)
    if free is not None and needed > free:
        raise refusal(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), target or Path(folder), needed)


def lock_file(target: Path) -> Path:
    """Where ``target``'s lock lives: one folder of lock files, so artifacts hold only their own files."""
    import hashlib

    from memdec_core.artifacts import cache_root

    folder = cache_root() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(str(Path(target).expanduser().resolve()).encode()).hexdigest()[:24]
    return folder / f"{Path(target).name}-{digest}.lock"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs; when that cannot be told, True (a live job's files are never stale)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill would terminate the process there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):  # larger than any pid
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


#: The name of a folder or file being written atomically: ``.KEY.tmp-PID-xxxxxxxx``.
TEMPORARY_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)(?:-[0-9a-f]+)?$")


def temporary_pid(name: str) -> int | None:
    """The PID in a temporary folder's name, or None when it is not one."""
    match = TEMPORARY_NAME.match(name)
    return int(match["pid"]) if match else None


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

    from memdec_core.progress import log

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
