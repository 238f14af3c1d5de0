"""The kNN-LM datastore: key = hidden state at position p, value = token p + 1.

On disk: ``keys.npy`` (fp16, memory-mapped), ``vals.npy`` (int32) and ``memdec.json``; beside
them ``indexes/<retriever>-<key>/``, one search index per retriever and build settings as they
resolve for the store (``factory=auto`` and the factory it picks are one index), built on first
use, written atomically. Row p is the global position p of the train stream: the
windows score consecutive positions, so rows are appended in order (and checked to be).

A build works in ``.NAME.partial`` with ordinary buffered writes (a full disk is an error, not a
SIGBUS from a memory map), each batch's rows written at their positions, and records every few
batches how far it got, after flushing to disk: a killed build resumes from there and gives the
same bytes. The folder is renamed into place when complete. Under several processes (see
``memdec_core.runtime.distributed``) each rank computes every N-th batch into the same files, and the
record is the windows every rank has finished, so a build resumes with any number of processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memdec_core.errors import ArtifactError
from memdec_core.inputs.model_cards import write_readme
from memdec_core.interfaces import Retriever
from memdec_core.runtime.distributed import barrier, sharding, sum_across
from memdec_core.runtime.timings import timed
from memdec_core.store.artifacts import (
    artifact_reference,
    atomic_directory,
    cached_artifact,
    content_key,
    read_manifest,
    start_or_resume,
    write_json,
    write_manifest,
)
from memdec_core.store.cache_dir import entry_lock
from memdec_core.store.disk import disk_errors, require_space

ARTIFACT_TYPE = "datastore"
INDEX_TYPE = "datastore-index"
LAYER = "last_ffn_input"
#: Batches between two records of a build's progress (each record flushes the files to disk).
COMMIT_EVERY = 16
MANIFEST_SCHEMA = {"size": int, "dim": int, "data_hash": str, "tokenizer_fingerprint": str,
                   "model_fingerprint": str, "base_model": str}


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

    def search_many(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``search`` for a large batch (kNN targets), through the retriever's batched path if it has one."""
        if self.retriever is None:
            raise ArtifactError(f"datastore {self.folder} has no index attached (call with_index)")
        return self.retriever.search_many(queries, k)

    def check_values(self, vocab_size: int) -> None:
        """Every value a token id of the base's vocabulary (a corrupt store would silently mis-score)."""
        if len(self) and (int(self.vals.min()) < 0 or int(self.vals.max()) >= vocab_size):
            raise ArtifactError(f"datastore {self.folder}: vals.npy holds token ids outside [0, {vocab_size}) "
                                f"(min {int(self.vals.min())}, max {int(self.vals.max())}); delete it to rebuild it")

    @timed("index")
    def with_index(self, retriever: Retriever) -> "Datastore":
        """This datastore searched by ``retriever``: its index opened, or built on first use."""
        folder = self._index_folder(retriever)
        with entry_lock(folder):
            if not (folder / "memdec.json").is_file():
                _build_index(self, retriever, folder)
        manifest = read_manifest(folder, INDEX_TYPE, {"size": int, "retriever": str})
        if manifest.get("size") != len(self):
            raise ArtifactError(f"index {folder} covers {manifest.get('size')} keys, the datastore {len(self)}")
        retriever.load(self.keys, folder)
        self.retriever, self.index_folder, self.index_manifest = retriever, folder, manifest
        return self

    def _index_folder(self, retriever: Retriever) -> Path:
        """Where ``retriever``'s index of this store is: named by its settings as they resolve for
        this store (``factory=auto`` and ``factory=Flat`` are one index, built once); an index an
        earlier memdec named by the settings as given is used where it exists."""
        resolved = self._index_name(retriever, retriever.index_settings(len(self), self.manifest.get("dim")))
        given = self._index_name(retriever, retriever.build_settings())
        folders = [_index_location(self, name) for name in dict.fromkeys((resolved, given))]
        return next((folder for folder in folders if (folder / "memdec.json").is_file()), folders[0])

    def _index_name(self, retriever: Retriever, settings: dict) -> str:
        from memdec_core.components.identity import component_identity

        key = content_key("datastore-index", self.manifest["data_hash"], self.manifest["model_fingerprint"],
                          len(self), retriever.name, component_identity(type(retriever)), settings)
        return f"{retriever.name}-{key}"


def _index_location(store: Datastore, name: str) -> Path:
    """Inside the datastore; in the cache when the datastore's folder cannot be written. There the
    name also holds the datastore's windows: ``name`` says its model, data and size, which two
    datastores of other windows share, and one must not be searched through the other's index."""
    folder = store.folder / "indexes" / name
    if folder.exists() or os.access(store.folder, os.W_OK):
        return folder
    windows = content_key("datastore-windows", *(store.manifest.get(key) for key in ("context", "stride", "layer")))
    return cached_artifact("indexes", f"{name}-{windows}")


def _build_index(store: Datastore, retriever: Retriever, folder: Path) -> None:
    from memdec_core.runtime.progress import log

    log(f"indexing {len(store):,} keys with {retriever.name} in {folder}")
    started = time.perf_counter()
    datastore, domain = artifact_reference(store.folder), store.manifest.get("domain")
    with atomic_directory(folder) as temporary:
        retriever.build(store.keys, temporary)
        write_manifest(temporary, INDEX_TYPE, retriever=retriever.name, settings=retriever.config,
                       size=len(store), datastore=datastore, domain=domain,
                       build_seconds=round(time.perf_counter() - started, 2), **retriever.facts())
        write_readme(temporary, f"{retriever.name} index of a kNN-LM datastore", [
            f"- Searches the {len(store):,} keys of the datastore `{datastore}` (a relative path is inside "
            f"the memdec cache) with the `{retriever.name}` retriever; its build settings are in `memdec.json`."],
            tags=("knn-lm", "index"), domain=domain)


def build_datastore(base, stream: np.ndarray, folder: Path, *, context: int, stride: int,
                    batch_size: int, data_hash: str, domain: str | None = None) -> Datastore:
    """Run ``base`` over ``stream`` (the train split of ``domain``) and write a complete datastore
    (keys and values) to ``folder``, resuming the work an interrupted build left.

    Under several processes every rank calls it (inside ``shared_entry_lock``): rank 0 prepares
    and finishes the folder, and each rank writes the rows of its batches.
    """
    from memdec_core.inputs.data import make_windows

    windows = make_windows(len(stream), context, stride)
    n_rows, dim = len(stream) - 1, base.model.config.get_text_config().hidden_size
    work, needed = folder.parent / f".{folder.name}.partial", n_rows * (2 * dim + 4)
    identity = {"model": base.fingerprint, "data_hash": data_hash, "rows": n_rows, "dim": dim, "context": context,
                "stride": stride, "batch_size": batch_size}
    main = sharding().main
    with disk_errors(folder, needed):
        if main:
            _prepare(work, identity, folder, needed, n_rows, dim)
        barrier()  # the files exist and the progress record is final before anyone reads it
        done = _progress(work)
        started = time.perf_counter() - done["seconds"]
        _write_keys_and_values(base, stream, windows, work, done["windows"], n_rows, dim, batch_size, started)
        if main:
            _finish(base, work, folder, n_rows=n_rows, dim=dim, data_hash=data_hash, domain=domain, context=context,
                    stride=stride, seconds=time.perf_counter() - started)
        barrier()
    return open_datastore(folder)


def _prepare(work: Path, identity: dict, folder: Path, needed: int, n_rows: int, dim: int) -> None:
    """The work folder of a new or resumed build, with its two files at their final size."""
    if not work.exists():
        require_space(folder.parent, needed, folder)
    start_or_resume(work, identity, "datastore build")
    for name, shape, dtype in (("keys.npy", (n_rows, dim), np.float16), ("vals.npy", (n_rows,), np.int32)):
        if not (work / name).is_file() or _progress(work)["windows"] == 0:
            RowFile.create(work / name, shape, dtype)


def _finish(base, work: Path, folder: Path, *, n_rows: int, dim: int, data_hash: str, domain: str | None,
            context: int, stride: int, seconds: float) -> None:
    from memdec_core.inputs.models import base_reference

    write_manifest(work, ARTIFACT_TYPE, base_model=base.model_id, model_fingerprint=base.fingerprint,
                   base=base_reference(base), domain=domain,
                   tokenizer_fingerprint=base.tokenizer_fingerprint, layer=LAYER, size=n_rows, dim=dim,
                   data_hash=data_hash, context=context, stride=stride, build_seconds=round(seconds, 1))
    write_readme(work, f"kNN-LM datastore for {base.model_id}", [
        f"- {n_rows} keys of dimension {dim} ({LAYER}), fp16, in `keys.npy`; next-token ids in `vals.npy`.",
        "- search indexes under `indexes/`, one per retriever and build settings.",
        f"- windows of {context} tokens, stride {stride}; train data hash `{data_hash}`."],
        tags=("knn-lm", "datastore"), base=base.model_id, domain=domain)
    for name in ("settings.json", "progress.json"):
        (work / name).unlink(missing_ok=True)
    os.replace(work, folder)


def _progress(work: Path) -> dict:
    """How far a build got: the windows whose rows are written and flushed, seconds spent."""
    path = work / "progress.json"
    if not path.is_file():
        return {"windows": 0, "seconds": 0.0}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"windows": 0, "seconds": 0.0}  # an unreadable record: start over


def _write_keys_and_values(base, stream, windows, work: Path, first_window: int, n_rows: int, dim: int,
                           batch_size: int, started: float) -> None:
    """This rank's batches of ``windows[first_window:]``, each batch's rows at their positions."""
    # Here, not at the top: an index of stored keys is built without torch (1.2 s of imports).
    from memdec_core.engine.scoring import iter_scored_batches

    shard = sharding()
    remaining = windows[first_window:]
    # Records only where every rank has finished the same number of batches, so a record's
    # windows are done by all.
    batches_everyone_has = -(-len(remaining) // batch_size) // shard.size
    written = 0
    # closing(): a failed write ends the pass's inference mode now, not when the traceback is collected.
    scored = iter_scored_batches(base.model, stream, remaining, batch_size=batch_size, capture_hidden=True,
                                 with_logits=False, sharded=True, description=f"datastore {base.short_name}")
    with RowFile(work / "keys.npy") as keys, RowFile(work / "vals.npy") as vals, contextlib.closing(scored) as batches:
        for number, batch in enumerate(batches, 1):
            positions = batch.positions.numpy()
            if not np.array_equal(positions, np.arange(positions[0], positions[0] + len(positions))):
                raise ArtifactError(f"datastore build in {work}: the positions of a batch are not consecutive "
                                    f"from row {positions[0]}")
            keys.write(int(positions[0]), batch.hidden.numpy())
            vals.write(int(positions[0]), batch.targets.numpy())
            written += len(positions)
            if number % COMMIT_EVERY == 0 and number <= batches_everyone_has:
                _commit(work, (keys, vals), first_window + number * shard.size * batch_size, started)
        _commit(work, (keys, vals), len(windows), started)
    expected = n_rows - (remaining[0].score_from if remaining else n_rows)
    if int(sum_across([written])[0]) != expected:
        raise ArtifactError(f"datastore build in {work} wrote {written} of {expected} rows")


def _commit(work: Path, files: tuple["RowFile", ...], windows_done: int, started: float) -> None:
    """Flush this rank's rows, wait for every rank's, then record the windows done."""
    for file in files:
        file.flush()
    barrier()
    if sharding().main:
        write_json(work / "progress.json", {"windows": windows_done, "seconds": time.perf_counter() - started})


class RowFile:
    """An ``.npy`` file of a known final shape whose rows are written at their positions.

    Positional writes straight to the file (``os.pwrite``): several processes write disjoint rows
    of one file, and a buffered writer could write back a stale neighbouring block over theirs.
    """

    def __init__(self, path: Path):
        self.path = Path(path)

    @staticmethod
    def create(path: Path, shape: tuple, dtype) -> None:
        """The header, and the file extended to its final size (the rows still zero)."""
        dtype = np.dtype(dtype)
        with open(path, "wb") as handle:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(handle, header)
            handle.truncate(handle.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)

    def __enter__(self) -> "RowFile":
        with open(self.path, "rb") as handle:
            np.lib.format.read_magic(handle)
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            self.dtype, self.data_start = dtype, handle.tell()
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        self.descriptor = os.open(self.path, os.O_WRONLY)
        return self

    def write(self, first_row: int, rows: np.ndarray) -> None:
        data = memoryview(np.ascontiguousarray(rows, dtype=self.dtype)).cast("B")
        offset = self.data_start + first_row * self.row_bytes
        while data:  # pwrite may write less than asked
            written = os.pwrite(self.descriptor, data, offset)
            data, offset = data[written:], offset + written

    def flush(self) -> None:
        os.fsync(self.descriptor)

    def __exit__(self, *exc) -> None:
        os.close(self.descriptor)


def open_datastore(folder: Path) -> Datastore:
    """Open a datastore written by ``build_datastore``, checking that its parts agree."""
    folder = Path(folder)
    manifest = read_manifest(folder, ARTIFACT_TYPE, MANIFEST_SCHEMA)
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
