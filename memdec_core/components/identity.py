"""What made an artifact or a result, for cache keys that cannot go stale.

A cached datastore, memory or compare row is reused only when everything that made it is the
same: the engines' versions (torch, transformers, faiss, ...), memdec's own code, and for each
component the plugin's distribution and version. A version number pins the code only when the
code is installed in site-packages; elsewhere — a plugin installed editable (``pip install -e``),
one registered from a module on the path, a combiner file — the hash of the source files stands
in for it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import sys
import sysconfig
from pathlib import Path
from typing import Any

ENGINES = ("torch", "transformers", "tokenizers", "peft", "faiss-cpu", "faiss-gpu", "numpy", "bm25s")


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    """The versions of the engines results depend on, and memdec's own code."""
    versions = {}
    for package in ENGINES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"engines": versions, "memdec": _package_identity("memdec_core")}


def component_identity(cls: type) -> dict[str, Any]:
    """The plugin, distribution, version and (where the version does not pin it) code of ``cls``.

    A component learns its plugin when the registry collects its kind; the registry is collected
    first, so that a key made before and one made after (a datastore's, in one run) are the same."""
    from memdec_core.components import plugins, registry

    if getattr(cls, "plugin", None) is None:
        registry.collect_all()
    record = next((record for record in plugins.records() if record.name == cls.plugin), None)
    identity = {"plugin": cls.plugin, "distribution": record.distribution if record else None,
                "version": record.version if record else None}
    source = _source_of(cls)
    if record is None or record.distribution is None or not _installed(source):
        identity["code"] = source_hash(source) if source else "unknown"
    return identity


def _package_identity(module_name: str) -> dict[str, Any]:
    """Version of memdec, and the hash of ``module_name``'s package when it is not installed."""
    folder = Path(sys.modules[module_name].__file__).parent
    identity = {"version": importlib.metadata.version("memdec")}
    if not _installed(folder):
        identity["code"] = source_hash(folder)
    return identity


def _installed(path: Path | None) -> bool:
    """True for code inside site-packages, where the distribution's version pins it."""
    if path is None:
        return False
    roots = {Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")}
    resolved = Path(path).resolve()
    return any(root == resolved or root in resolved.parents for root in roots)


def _source_of(cls: type) -> Path | None:
    """What defines ``cls``: its top-level package's folder, or its single file."""
    module = sys.modules.get(cls.__module__)
    package = (getattr(module, "__package__", "") or "").split(".")[0]
    top = sys.modules.get(package) if package else None
    if top is not None and getattr(top, "__file__", None):
        return Path(top.__file__).parent
    file = getattr(module, "__file__", None) or _source_file(cls)
    return Path(file) if file else None


def _source_file(cls: type) -> str | None:
    try:
        return inspect.getsourcefile(cls)
    except TypeError:
        return None


def source_hash(path: Path) -> str:
    """sha256 of a file, or of every ``.py`` file under a folder (names and contents)."""
    path = Path(path)
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        if "__pycache__" in file.parts:
            continue
        stat = file.stat()
        digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0".encode())
        digest.update(_file_bytes_hash(str(file), stat.st_size, stat.st_mtime_ns).encode())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=4096)
def _file_bytes_hash(file: str, size: int, mtime_ns: int) -> str:
    """Memoised by path, size and modification time: an edited file is hashed again."""
    return hashlib.sha256(Path(file).read_bytes()).hexdigest()
