"""Writing to a disk that may be full or read-only, and telling whose temporary files are on it.

- ``disk_errors(target)`` turns the OS's refusals (ENOSPC, EDQUOT, EROFS, EACCES, EIO) into one
  ``DiskError`` line that says what could not be written, why, and how much space it needs; also
  those that libraries report as their own errors (torch.save's RuntimeError, safetensors').
  The advice names the cache (``MEMDEC_CACHE``) only when the write was into the cache.
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

from memdec_core.errors import DiskError, MemdecError

#: errno → what the user is told.
REFUSALS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
            errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
            errno.EPERM: "permission denied", errno.EIO: "an input/output error (a failing disk?)"}
#: A RuntimeError raised while less than this is free on the disk being written is taken for a full disk:
#: torch.save's names no cause ("[enforce fail at inline_container.cc] unexpected pos"), and the write
#: that failed has filled the disk to its last block or two.
FULL_BELOW = 1 << 20
#: How Rust's I/O errors (safetensors, tokenizers) give the OS's error number.
RUST_ERRNO = re.compile(r"\(os error (\d+)\)")


def cache_root() -> Path:
    """``MEMDEC_CACHE``, or ``~/.cache/memdec`` (a path only: nothing is checked or created).

    It lives here, not in ``cache_dir``, so that a refusal can tell a write into the cache from one
    into a command's output (``cache_dir`` imports this module)."""
    return Path(os.environ.get("MEMDEC_CACHE") or Path.home() / ".cache" / "memdec").expanduser()


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


def nearest_existing(path: Path) -> Path:
    """``path``, or its nearest parent that exists."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int | None:
    """Free space on the file system holding ``path`` (or its nearest existing parent)."""
    try:
        return shutil.disk_usage(nearest_existing(path)).free
    except OSError:
        return None


def is_refusal(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in REFUSALS


def hidden_refusal(error: BaseException, target: Path) -> OSError | None:
    """The OS refusal behind ``error``: an OSError's own, the one a Rust library's message names, or
    ENOSPC for a RuntimeError raised while the disk is full; None when ``error`` is something else."""
    if isinstance(error, OSError):
        return error if is_refusal(error) else None
    match = RUST_ERRNO.search(str(error))
    code = int(match[1]) if match else None
    if code is None and isinstance(error, RuntimeError) and _disk_is_full(target):
        code = errno.ENOSPC
    return OSError(code, os.strerror(code)) if code in REFUSALS else None


def _disk_is_full(target: Path) -> bool:
    free = free_bytes(target)
    return free is not None and free < FULL_BELOW


def refusal(error: OSError, target: Path, needed: int | None = None) -> DiskError:
    """The one-line error for an OS refusal while writing ``target``."""
    message = f"cannot write {target}: {REFUSALS.get(error.errno, error.strerror)}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        needs = f"needs about {human_bytes(needed)}, " if needed else ""
        message += f" ({needs}{human_bytes(free_bytes(target) or 0)} free); {_make_room(target)}"
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        message += f"; {_write_elsewhere(target)}"
    return DiskError(message)


def in_cache(target: Path) -> bool:
    """Whether ``target`` lies in the cache: only then is MEMDEC_CACHE the remedy for a refused write."""
    root, path = cache_root().resolve(), Path(target).expanduser().resolve()
    return path == root or root in path.parents


def _make_room(target: Path) -> str:
    if in_cache(target):
        return "free some space (memdec cache rm ...) or set MEMDEC_CACHE to a larger disk"
    return "free some space there or write the output to a larger disk"


def _write_elsewhere(target: Path) -> str:
    if in_cache(target):
        return "set MEMDEC_CACHE to a writable folder"
    return f"{nearest_existing(target)} is not writable: write the output to another folder"


@contextlib.contextmanager
def disk_errors(target: Path, needed: int | None = None) -> Iterator[None]:
    """Inside: an OS refusal becomes a one-line DiskError about ``target`` (``hidden_refusal``)."""
    try:
        yield
    except MemdecError:
        raise  # already one line, perhaps about another file
    except Exception as error:
        cause = hidden_refusal(error, Path(target))
        if cause is None:
            raise
        raise refusal(cause, Path(target), needed) from error


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
