"""kNN targets: for every train position, the sparse kNN distribution of its own context.

The training signal of a Memory Decoder. For position p the datastore is searched with key p
for k + 1 neighbours, p's own entry is dropped **by id** (faiss may return ties or unsorted
results, so "drop the first" is not safe), the k nearest remaining neighbours are weighted by
softmax(−d/T) and summed per token. Rows are stored sparse, CSR-style, in shards of consecutive
positions: ``offsets.npy`` (int64), ``token_ids.npy`` (int32), ``probs.npy`` (fp16; entries
that round to zero are not stored). A full-vocabulary row is never built.

Each shard is written atomically into a ``.partial`` work folder, so an interrupted build
resumes from the last finished shard; the folder is renamed into place when all are done. Under
several processes each rank computes every N-th shard (the shards are those of one process).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from memdec_core.errors import ArtifactError, ConfigError
from memdec_core.inputs.model_cards import write_readme
from memdec_core.runtime.distributed import barrier, sharding
from memdec_core.runtime.progress import progress_bar
from memdec_core.store.artifacts import (
    artifact_reference,
    atomic_directory,
    read_manifest,
    resolve_reference,
    start_or_resume,
    write_manifest,
)
from memdec_knn.api import Datastore, sparse_distribution

ARTIFACT_TYPE = "knn-targets"
MANIFEST_SCHEMA = {"size": int, "shard_size": int, "shards": int, "k": int, "temperature": (int, float),
                   "data_hash": str, "tokenizer_fingerprint": str}


@dataclass(frozen=True)
class TargetSettings:
    """How targets are made; a resumed build must use the same ones."""

    k: int = 1024
    temperature: float = 16.0  # the paper's; tune it for your keys (memdec eval --method knn-lm reports one)
    shard_size: int = 16_384  # positions per shard: the unit of resume and of the work split across processes
    search_batch: int = 8_192  # queries searched at once (an IVF index routes and scans them together)

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.shard_size < 1 or self.search_batch < 1:
            raise ConfigError("shard_size and search_batch must be at least 1")


def exclude_self(distances: np.ndarray, ids: np.ndarray, query_ids: np.ndarray, k: int):
    """Drop each query's own entry by id, sort by distance, keep the ``k`` nearest others.

    Missing neighbours (id −1) sort last and stay −1, so rows with fewer than k others are padded.
    """
    distances = np.where((ids == query_ids[:, None]) | (ids < 0), np.inf, distances.astype(np.float64))
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]
    kept_distances = np.take_along_axis(distances, order, axis=1)
    kept_ids = np.where(np.isinf(kept_distances), -1, np.take_along_axis(ids, order, axis=1))
    return np.where(np.isinf(kept_distances), 0.0, kept_distances), kept_ids


def build_targets(store: Datastore, folder: Path, settings: TargetSettings = TargetSettings()) -> "TargetSet":
    """Write the targets of every datastore row to ``folder``, resuming an interrupted build."""
    folder = Path(folder)
    if folder.exists():
        raise ConfigError(f"targets folder already exists: {folder}")
    work = folder.parent / f".{folder.name}.partial"
    searched_by = [store.index_manifest.get(key) for key in ("retriever", "settings")]
    ranks = sharding()
    if ranks.main:
        start_or_resume(work, {"datastore_data_hash": store.manifest["data_hash"], "size": len(store),
                               "model": store.manifest["model_fingerprint"], "retriever": searched_by,
                               **asdict(settings)}, "targets build")
    barrier()
    n_shards = -(-len(store) // settings.shard_size)
    with progress_bar("kNN targets", len(store), "positions") as advance:
        for shard in range(n_shards):
            start, end = shard * settings.shard_size, min((shard + 1) * settings.shard_size, len(store))
            if ranks.owns(shard) and not (work / shard_name(shard)).exists():
                _write_shard(store, work / shard_name(shard), start, end, settings)
            advance(end - start)
    barrier()  # every rank's shards are written
    if ranks.main:
        _finish(store, work, folder, settings, searched_by, n_shards)
    barrier()
    return TargetSet(folder)


def _finish(store: Datastore, work: Path, folder: Path, settings: TargetSettings, searched_by: list,
            n_shards: int) -> None:
    domain = store.manifest.get("domain")
    write_manifest(work, ARTIFACT_TYPE, datastore=artifact_reference(store.folder), domain=domain,
                   data_hash=store.manifest["data_hash"], base=store.manifest.get("base"),
                   tokenizer_fingerprint=store.manifest["tokenizer_fingerprint"], size=len(store),
                   model_fingerprint=store.manifest["model_fingerprint"], retriever=searched_by,
                   shards=n_shards, **asdict(settings))
    write_readme(work, f"kNN targets of {store.manifest.get('base_model')}", [
        f"- For each of the {len(store):,} train positions, the kNN distribution of its context: the "
        f"k = {settings.k} nearest other keys of the datastore `{artifact_reference(store.folder)}` "
        f"weighted by softmax(−d/T), T = {settings.temperature:g}, summed per token.",
        f"- Sparse rows in {n_shards} shard(s) of {settings.shard_size:,} positions: `offsets.npy` (int64), "
        "`token_ids.npy` (int32), `probs.npy` (fp16).",
        "- The training signal of a Memory Decoder (`memdec train` makes or reuses them); "
        "`memdec targets info THIS_FOLDER` prints the manifest."],
        tags=("memory-decoder", "knn-targets"), domain=domain)
    work.replace(folder)


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def _write_shard(store: Datastore, target: Path, start: int, end: int, settings: TargetSettings) -> None:
    counts, token_ids, probs = [], [], []
    k_search = min(settings.k + 1, len(store))
    for first in range(start, end, settings.search_batch):
        positions = np.arange(first, min(first + settings.search_batch, end))
        queries = np.asarray(store.keys[positions], dtype=np.float32)
        distances, ids = store.search_many(queries, k_search)
        distances, ids = exclude_self(distances, ids, positions, settings.k)
        values = store.vals[np.clip(ids, 0, None)]
        row_ids, row_probs = sparse_distribution(torch.from_numpy(distances), torch.from_numpy(ids),
                                                 torch.from_numpy(values.astype(np.int64)), settings.temperature)
        row_probs = row_probs.to(torch.float16)
        # Entries that round to 0 in fp16 (most of a 1024-neighbour row) add nothing to the KL: drop them.
        keep = (row_ids >= 0) & (row_probs > 0)
        counts.append(keep.sum(dim=1).numpy())
        token_ids.append(row_ids[keep].numpy().astype(np.int32))
        probs.append(row_probs[keep].numpy())
    write_sparse_shard(target, np.concatenate(counts), np.concatenate(token_ids), np.concatenate(probs))


def write_sparse_shard(target: Path, counts: np.ndarray, token_ids: np.ndarray, probs: np.ndarray) -> None:
    """One shard of sparse rows, written atomically: row i holds ``counts[i]`` consecutive entries."""
    with atomic_directory(target) as temporary:
        np.save(temporary / "offsets.npy", np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        np.save(temporary / "token_ids.npy", token_ids.astype(np.int32))
        np.save(temporary / "probs.npy", probs.astype(np.float16))


class TargetSet:
    """Opened kNN targets: ``row(p)`` gives the token ids and probabilities for position p."""

    artifact_type, manifest_schema = ARTIFACT_TYPE, MANIFEST_SCHEMA

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, self.artifact_type, self.manifest_schema)
        self.shard_size = self.manifest["shard_size"]
        self._shards: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return self.manifest["size"]

    @property
    def datastore_folder(self) -> Path:
        """The datastore these targets were searched in (named relative to the cache, or absolute)."""
        return resolve_reference(self.manifest["datastore"])

    def row(self, position: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= position < len(self):
            raise IndexError(f"position {position} outside the {len(self)} targets")
        offsets, token_ids, probs = self._shard(position // self.shard_size)
        local = position % self.shard_size
        return token_ids[offsets[local]:offsets[local + 1]], probs[offsets[local]:offsets[local + 1]]

    def padded(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows for ``positions`` as ``[N, S]`` tensors padded with id −1 and probability 0.

        Vectorised per shard: a training step reads thousands of rows.
        """
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"positions outside the {len(self)} targets")
        shards = positions // self.shard_size
        groups = {}
        for shard in np.unique(shards):
            selected = np.flatnonzero(shards == shard)
            offsets = self._shard(int(shard))[0]
            local = positions[selected] % self.shard_size
            groups[int(shard)] = (selected, offsets[local], offsets[local + 1] - offsets[local])
        width = max([1] + [int(counts.max()) for _, _, counts in groups.values() if len(counts)])
        token_ids = np.full((len(positions), width), -1, dtype=np.int64)
        probs = np.zeros((len(positions), width), dtype=np.float32)
        columns = np.arange(width)
        for shard, (selected, begins, counts) in groups.items():
            _, shard_ids, shard_probs = self._shard(shard)
            if len(shard_ids) == 0:
                continue
            present = columns[None, :] < counts[:, None]
            index = np.where(present, begins[:, None] + columns[None, :], 0)
            token_ids[selected] = np.where(present, shard_ids[index], -1)
            probs[selected] = np.where(present, shard_probs[index], 0.0)
        return torch.from_numpy(token_ids), torch.from_numpy(probs)

    def _shard(self, shard: int):
        if shard not in self._shards:
            path = self.folder / shard_name(shard)
            try:
                arrays = tuple(np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                               for name in ("offsets", "token_ids", "probs"))
            except (OSError, ValueError) as error:
                raise ArtifactError(f"corrupt or missing targets shard {path}: {error}") from error
            self._check_shard(path, shard, *arrays)
            self._shards[shard] = arrays
        return self._shards[shard]

    def _check_shard(self, path: Path, shard: int, offsets, token_ids, probs) -> None:
        """Offsets that start at 0, never decrease and end at the arrays' length, one per row + 1."""
        rows = min(self.shard_size, len(self) - shard * self.shard_size)
        problem = None
        if offsets.shape != (rows + 1,) or token_ids.shape != probs.shape or token_ids.ndim != 1:
            problem = f"offsets of {offsets.shape[0]} entries for {rows} rows, {len(token_ids)} ids, {len(probs)} probs"
        elif offsets[0] != 0 or offsets[-1] != len(token_ids) or (np.diff(offsets) < 0).any():
            problem = "offsets that do not run from 0 to the number of entries in order"
        elif len(token_ids) and token_ids.min() < 0:
            problem = "negative token ids"
        if problem:
            raise ArtifactError(f"corrupt targets shard {path}: {problem}; delete {self.folder} to rebuild it")

    def check_token_range(self, vocab_size: int) -> None:
        """Every token id below ``vocab_size`` (the memory's vocabulary), checked once before training."""
        for shard in range(self.manifest["shards"]):
            token_ids = self._shard(shard)[1]
            if len(token_ids) and int(token_ids.max()) >= vocab_size:
                raise ArtifactError(f"targets shard {self.folder / shard_name(shard)} holds token id "
                                    f"{int(token_ids.max())}, outside the vocabulary of {vocab_size}; "
                                    f"delete {self.folder} to rebuild it")

