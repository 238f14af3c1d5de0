"""``meta``: what made a report, in every report ``memdec eval`` and ``memdec compare`` write.

The keys are documented for scripts in docs/reports.md; a change to them that a script could
notice raises SCHEMA_VERSION.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from memdec_core.inputs.models import compute_dtype
from memdec_core.runtime.distributed import world

#: The version of the report layout (top-level keys, ``meta``, the rows) that docs/reports.md describes.
SCHEMA_VERSION = 1
#: memdec loads every model in float32 (memdec_core.inputs.models): the dtype when no model says otherwise.
DEFAULT_DTYPE = "float32"


def run_meta(*, settings, bases: Sequence[str], methods: Sequence[str], combiner: Any,
             contexts: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any] | None = None,
             command: Sequence[str] | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``meta`` of a report, JSON-serialisable.

    ``settings`` is the run's EvalSettings; ``combiner`` its combiner class (or its name), or the
    list of a head-to-head's;
    ``contexts`` maps each base's model id to ``context_entry(ctx)`` (the resolved window and
    dtype); ``config`` is ``{"file", "overridden", "values"}`` (the CLI's, or ``call_config``'s);
    ``command`` the command line (``sys.argv``; None from Python); ``extra`` is merged in last.
    """
    meta = {
        "schema_version": SCHEMA_VERSION,
        "versions": versions(),
        "seeds": {"eval": settings.seed},
        "git": git_hash(),
        "device": device(),
        "world_size": world().size,  # processes that shared the scoring (torchrun, accelerate launch)
        "dtype": _dtype_of(contexts),
        "precision": compute_dtype(),  # of the model passes (--dtype); the weights' dtype is "dtype"
        "contexts": {base: dict(entry) for base, entry in contexts.items()},
        "command": list(command) if command is not None else None,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": dict(config) if config is not None else _bare_config(settings, bases, methods, combiner),
        "settings": dataclasses.asdict(settings),
        "combiner": combiner_name(combiner),
        "bases": list(bases),
        "methods": list(methods),
    }
    meta.update(extra or {})
    # Paths, tuples and the like as JSON would write them, so that the meta in memory equals the file's.
    return json.loads(json.dumps(meta, default=str))


def context_entry(ctx) -> dict[str, Any]:
    """One base's entry in ``contexts``: the window it was scored with, its weights' dtype and its tokenizer."""
    return {"context": ctx.context, "stride": ctx.stride, "dtype": model_dtype(ctx.base.model),
            "tokenizer": ctx.base.tokenizer_fingerprint}


def model_dtype(model: Any) -> str:
    """``float32`` for a torch model in float32 (``torch.float32`` without the prefix)."""
    dtype = getattr(model, "dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else DEFAULT_DTYPE


def call_config(*, domain: str, bases: Sequence[str], methods: Sequence[str], combiner: Any, settings,
                component_settings: Mapping[str, Mapping[str, Any]] | None = None,
                options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``meta["config"]`` of a call from Python: what the function was called with, in config-file
    form; ``options`` adds a command's own keys (compare's ``budget``, ``general_tokens``, ...)."""
    from memdec_core.runs.runconfig import window_values

    values = {"domain": domain, "bases": list(bases), "methods": list(methods),
              "combiner": combiner_name(combiner), **window_values(settings), **(options or {}),
              "settings": {name: dict(values) for name, values in (component_settings or {}).items()}}
    return {"file": None, "overridden": [], "values": values}


def _bare_config(settings, bases, methods, combiner) -> dict[str, Any]:
    from memdec_core.runs.runconfig import window_values

    values = {"bases": list(bases), "methods": list(methods), "combiner": combiner_name(combiner),
              **window_values(settings)}
    return {"file": None, "overridden": [], "values": values}


def combiner_name(combiner: Any) -> str | list[str]:
    """A combiner's name (of a spec, a class or an instance); a list of names for a head-to-head's
    list of several (``["linear", "adaptive"]``), as a config file gives them."""
    if isinstance(combiner, (list, tuple)):
        names = [combiner_name(item) for item in combiner]
        return names[0] if len(names) == 1 else names
    if isinstance(combiner, str):
        return combiner
    cls = combiner if isinstance(combiner, type) else type(combiner)
    return getattr(cls, "name", "") or cls.__name__


def versions() -> dict[str, str | None]:
    """memdec's version and those of the engines results depend on (None: not installed)."""
    import torch

    from memdec_core import __version__

    found = {"memdec": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for package, distributions in VERSIONED.items():
        found[package] = _version(package, distributions)
    return found


#: The packages whose versions a report names, and the distributions that install each.
VERSIONED = {"transformers": ("transformers",), "peft": ("peft",), "faiss": ("faiss-cpu", "faiss-gpu", "faiss"),
             "bm25s": ("bm25s",)}


def _version(package: str, distributions: tuple[str, ...]) -> str | None:
    """A package's version from its installed metadata: importing it to ask would cost a run that
    does not use it its start-up (peft alone, about 0.2 s). Imported already, or installed
    without metadata (a conda build), the module says."""
    import importlib.metadata
    import sys

    if package not in sys.modules:
        for distribution in distributions:
            try:
                return importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                continue
    try:
        return __import__(package).__version__
    except (ImportError, AttributeError):
        return None


def device() -> str:
    """The GPU's name, or the CPU and torch's thread count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_hash() -> str | None:
    """The commit memdec's code is checked out at; None outside a git checkout (an installed wheel)."""
    try:
        output = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return output.stdout.strip() or None if output.returncode == 0 else None


def _dtype_of(contexts: Mapping[str, Mapping[str, Any]]) -> str:
    """The dtype the bases ran in: one name, or the names joined by ", " if bases differ."""
    dtypes = sorted({str(entry["dtype"]) for entry in contexts.values() if entry.get("dtype")})
    return ", ".join(dtypes) if dtypes else DEFAULT_DTYPE


__all__ = ["SCHEMA_VERSION", "call_config", "context_entry", "run_meta"]
