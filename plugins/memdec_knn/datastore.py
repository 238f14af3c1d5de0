"""The kNN-LM datastore: key = hidden state at position p, value = token p + 1.

On disk: ``keys.npy`` (fp16, memory-mapped), ``vals.npy`` (int32) and ``memdec.json``; beside
them ``indexes/<retriever>-<key>/``, one search index per retriever and build settings (built
on first use, written atomically). Row p is written at the global position p of the train
stream, so the key/value alignment never depends on batching order.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memdec_core.artifacts import (
    atomic_directory,
    cached_artifact,
    content_key,
    read_manifest,
    write_manifest,
    write_readme,
)
from memdec_core.errors import ArtifactError
from memdec_core.evaluate import iter_scored_batches
from memdec_core.interfaces import Retriever

ARTIFACT_TYPE = "datastore"
INDEX_TYPE = "datastore-index"
LAYER = "last_ffn_input"


@dataclass
class Datastore:
    """An opened datastore: memory-mapped keys and values, its manifest, and the index searched."""

    folder: Path
    keys: np.ndarray  # [n, dim] fp16, memory-mapped
    vals: np.ndarray  # [n] int32
    manifest: dict
    retriever: Retriever | None = None  # attached by ``with_index``
    index_folder: Path | None = None
    index_manifest: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.vals)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances and ids ``[n, k]`` of the nearest keys (id −1: none)."""
        if self.retriever is None:
            raise ArtifactError(f"datastore {self.folder} has no index attached (call with_index)")
        return self.retriever.search(queries, k)

    def with_index(self, retriever: Retriever) -> "Datastore":
        """This datastore searched by ``retriever``: its index opened, or built on first use."""
        from memdec_core.identity import component_identity

        key = content_key("datastore-index", self.manifest["data_hash"], self.manifest["model_fingerprint"],
                          len(self), retriever.name, component_identity(type(retriever)), retriever.build_settings())
        folder = _index_location(self.folder, f"{retriever.name}-{key}")
        if not (folder / "memdec.json").is_file():
            _build_index(self, retriever, folder)
        manifest = read_manifest(folder, INDEX_TYPE)
        if manifest.get("size") != len(self):
            raise ArtifactError(f"index {folder} covers {manifest.get('size')} keys, the datastore {len(self)}")
        retriever.load(self.keys, folder)
        self.retriever, self.index_folder, self.index_manifest = retriever, folder, manifest
        return self


def _index_location(store_folder: Path, name: str) -> Path:
    """Inside the datastore; in the cache when the datastore's folder cannot be written."""
    folder = store_folder / "indexes" / name
    if folder.exists() or os.access(store_folder, os.W_OK):
        return folder
    return cached_artifact("indexes", name)


def _build_index(store: Datastore, retriever: Retriever, folder: Path) -> None:
    from memdec_core.progress import log

    log(f"indexing {len(store):,} keys with {retriever.name} in {folder}")
    started = time.perf_counter()
    with atomic_directory(folder) as temporary:
        retriever.build(store.keys, temporary)
        write_manifest(temporary, INDEX_TYPE, retriever=retriever.name, settings=retriever.config,
                       size=len(store), build_seconds=round(time.perf_counter() - started, 2), **retriever.facts())


def build_datastore(base, stream: np.ndarray, folder: Path, *, context: int, stride: int,
                    batch_size: int, data_hash: str) -> Datastore:
    """Run ``base`` over ``stream`` and write a complete datastore (keys and values) to ``folder``."""
    from memdec_core.data import make_windows

    windows = make_windows(len(stream), context, stride)
    n_rows, dim = len(stream) - 1, base.model.config.get_text_config().hidden_size
    started = time.perf_counter()
    with atomic_directory(folder) as temporary:
        _write_keys_and_values(base, stream, windows, temporary, n_rows, dim, batch_size)
        write_manifest(temporary, ARTIFACT_TYPE, base_model=base.model_id, model_fingerprint=base.fingerprint,
                       tokenizer_fingerprint=base.tokenizer_fingerprint, layer=LAYER, size=n_rows, dim=dim,
                       data_hash=data_hash, context=context, stride=stride,
                       build_seconds=round(time.perf_counter() - started, 1))
        write_readme(temporary, f"kNN-LM datastore for {base.model_id}", [
            f"- {n_rows} keys of dimension {dim} ({LAYER}), fp16, in `keys.npy`; next-token ids in `vals.npy`.",
            "- search indexes under `indexes/`, one per retriever and build settings.",
            f"- windows of {context} tokens, stride {stride}; train data hash `{data_hash}`."])
    return open_datastore(folder)


def _write_keys_and_values(base, stream, windows, folder: Path, n_rows: int, dim: int, batch_size: int) -> None:
    keys = np.lib.format.open_memmap(folder / "keys.npy", mode="w+", dtype=np.float16, shape=(n_rows, dim))
    vals = np.lib.format.open_memmap(folder / "vals.npy", mode="w+", dtype=np.int32, shape=(n_rows,))
    for batch in iter_scored_batches(base.model, stream, windows, batch_size=batch_size,
                                     capture_hidden=True, with_logits=False,
                                     description=f"datastore {base.short_name}"):
        positions = batch.positions.numpy()
        keys[positions] = batch.hidden.numpy().astype(np.float16)
        vals[positions] = batch.targets.numpy()
    keys.flush()
    vals.flush()
    del keys, vals


def open_datastore(folder: Path) -> Datastore:
    """Open a datastore written by ``build_datastore``, checking that its parts agree."""
    folder = Path(folder)
    manifest = read_manifest(folder, ARTIFACT_TYPE)
    keys, vals = _load_array(folder / "keys.npy"), _load_array(folder / "vals.npy")
    if keys.shape != (manifest["size"], manifest["dim"]) or vals.shape != (manifest["size"],):
        raise ArtifactError(f"datastore {folder} is inconsistent: keys {keys.shape}, values {vals.shape}, "
                            f"manifest says {manifest['size']} × {manifest['dim']}")
    return Datastore(folder, keys, vals, manifest)


def _load_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ArtifactError(f"datastore file missing: {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise ArtifactError(f"corrupt datastore file {path}: {error}") from error
