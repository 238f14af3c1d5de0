"""Writing to a disk that may be full or read-only, and telling whose temporary files are on it.

- ``disk_errors(target)`` turns the OS's refusals (ENOSPC, EDQUOT, EROFS, EACCES, EIO) into one
  ``DiskError`` line that says what could not be written, why, and how much space it needs.
- ``require_space(folder, needed)`` refuses up front a write that cannot fit.
- ``pid_alive`` and ``TEMPORARY_NAME`` tell a running writer's temporary folder from a killed one's.

The cache's per-entry locks are ``memdec_core.store.cache_dir``'s.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from memdec_core.errors import DiskError

#: errno → what the user is told.
REFUSALS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.EIO: "an input/output error (a failing disk?)"}


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
