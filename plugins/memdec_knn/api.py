"""Python entry points of the kNN-LM plugin."""

from __future__ import annotations

from pathlib import Path

from memdec_core.api import prepare_context
from memdec_core.errors import ConfigError
from memdec_knn.method import KnnLM


def build_datastore(domain, base: str, *, settings=None, output: Path | None = None, **knn_settings) -> str:
    """Build (or reuse from the cache) ``base``'s datastore over ``domain``'s train split.

    With ``output``, write it to that new folder instead of the cache. Returns the folder.
    """
    method = KnnLM(**knn_settings)
    if output is not None and Path(output).exists():
        raise ConfigError(f"output folder already exists: {output}")
    ctx = prepare_context(domain, base, settings)
    store = method.build_datastore(ctx, Path(output)) if output else method.datastore_for(ctx)
    return str(store.folder)
