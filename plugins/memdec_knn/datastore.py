"""The kNN-LM datastore: key = hidden state at position p, value = token p + 1.

On disk: ``keys.npy`` (fp16, memory-mapped), ``vals.npy`` (int32), ``index.faiss`` and
``memdec.json``. Row p is written at the global position p of the train stream, so the
key/value alignment never depends on batching order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memdec_core.artifacts import atomic_directory, read_manifest, write_manifest, write_readme
from memdec_core.data import make_windows
from memdec_core.errors import ArtifactError
from memdec_core.evaluate import iter_scored_batches
from memdec_core.models import LoadedModel
from memdec_knn.index import FaissRetriever

ARTIFACT_TYPE = "datastore"
LAYER = "last_ffn_input"


@dataclass
class Datastore:
    """An opened datastore: memory-mapped keys and values, the faiss index and the manifest."""

    folder: Path
    keys: np.ndarray  # [n, dim] fp16, memory-mapped
    vals: np.ndarray  # [n] int32
    retriever: FaissRetriever
    manifest: dict

    def __len__(self) -> int:
        return len(self.vals)


def build_datastore(base: LoadedModel, stream: np.ndarray, folder: Path, *, context: int, stride: int,
                    batch_size: int, retriever: FaissRetriever, data_hash: str) -> Datastore:
    """Run ``base`` over ``stream`` and write a complete datastore to ``folder`` atomically."""
    windows = make_windows(len(stream), context, stride)
    n_rows, dim = len(stream) - 1, base.model.config.get_text_config().hidden_size
    started = time.perf_counter()
    with atomic_directory(folder) as temporary:
        _write_keys_and_values(base, stream, windows, temporary, n_rows, dim, batch_size)
        keys = np.load(temporary / "keys.npy", mmap_mode="r")
        retriever.build(keys, str(temporary / "index.faiss"))
        write_manifest(temporary, ARTIFACT_TYPE, base_model=base.model_id, model_fingerprint=base.fingerprint,
                       tokenizer_fingerprint=base.tokenizer_fingerprint, layer=LAYER, size=n_rows, dim=dim,
                       data_hash=data_hash, context=context, stride=stride, index_factory=retriever.factory,
                       retriever=retriever.config, build_seconds=round(time.perf_counter() - started, 1))
        write_readme(temporary, f"kNN-LM datastore for {base.model_id}", [
            f"- {n_rows} keys of dimension {dim} ({LAYER}), fp16, in `keys.npy`; next-token ids in `vals.npy`.",
            f"- faiss index `{retriever.factory}` in `index.faiss`.",
            f"- windows of {context} tokens, stride {stride}; train data hash `{data_hash}`."])
    return open_datastore(folder, retriever_config=retriever.config)


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


def open_datastore(folder: Path, retriever_config=None) -> Datastore:
    """Open a datastore written by ``build_datastore``, checking that its parts agree."""
    folder = Path(folder)
    manifest = read_manifest(folder, ARTIFACT_TYPE)
    keys, vals = _load_array(folder / "keys.npy"), _load_array(folder / "vals.npy")
    if keys.shape != (manifest["size"], manifest["dim"]) or vals.shape != (manifest["size"],):
        raise ArtifactError(f"datastore {folder} is inconsistent: keys {keys.shape}, values {vals.shape}, "
                            f"manifest says {manifest['size']} × {manifest['dim']}")
    retriever = FaissRetriever(retriever_config or FaissRetriever.Config(**manifest["retriever"]))
    retriever.load(str(folder / "index.faiss"))
    if retriever.ntotal != manifest["size"]:
        raise ArtifactError(f"datastore {folder}: index holds {retriever.ntotal} keys, expected {manifest['size']}")
    return Datastore(folder, keys, vals, retriever, manifest)


def _load_array(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ArtifactError(f"datastore file missing: {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:
        raise ArtifactError(f"corrupt datastore file {path}: {error}") from error
