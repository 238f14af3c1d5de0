"""What made an artifact or a result, for cache keys that cannot go stale.

A cached datastore, memory or compare row is reused only when everything that made it is the
same: the engines' versions (torch, transformers, faiss, ...), memdec's own code, and for each
component the plugin's distribution and version. Where a version number does not pin the code
— a plugin installed editable (``pip install -e``), a plugin registered from a module on the
path, a combiner file — the hash of the source files stands in for it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import json
import sys
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
    """The plugin, distribution, version and (where the version does not pin it) code of ``cls``."""
    from memdec_core.plugins import plugin_records

    record = next((record for record in plugin_records() if record.name == cls.plugin), None)
    distribution = record.distribution if record else None
    identity = {"plugin": cls.plugin, "distribution": distribution, "version": record.version if record else None}
    if distribution is None or _is_editable(distribution):
        identity["code"] = _code_hash_of(cls)
    return identity


def _package_identity(module_name: str) -> dict[str, Any]:
    """Version of the distribution that ships ``module_name``, and its code hash when editable."""
    distribution = _distribution_of(module_name)
    identity = {"version": importlib.metadata.version(distribution) if distribution else None}
    if distribution is None or _is_editable(distribution):
        identity["code"] = source_hash(Path(sys.modules[module_name].__file__).parent)
    return identity


def _distribution_of(module_name: str) -> str | None:
    top = module_name.split(".")[0]
    names = importlib.metadata.packages_distributions().get(top) or []
    return names[0] if names else None


@functools.lru_cache(maxsize=None)
def _is_editable(distribution: str) -> bool:
    """True for a ``pip install -e`` install: its version number does not pin its code."""
    try:
        text = importlib.metadata.distribution(distribution).read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return False
    if not text:
        return False
    return bool(json.loads(text).get("dir_info", {}).get("editable"))


def _code_hash_of(cls: type) -> str:
    """The hash of the source that defines ``cls``: its whole top-level package, or its single file."""
    module = sys.modules.get(cls.__module__)
    package = (getattr(module, "__package__", "") or "").split(".")[0]
    top = sys.modules.get(package) if package else None
    if top is not None and getattr(top, "__file__", None):
        return source_hash(Path(top.__file__).parent)
    file = getattr(module, "__file__", None) or _source_file(cls)
    return source_hash(Path(file)) if file else "unknown"


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
