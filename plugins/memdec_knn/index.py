"""The faiss retriever: an index built from a factory string, trained on a seeded sample."""

from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memdec_core.errors import ArtifactError, ConfigError
from memdec_core.interfaces import Retriever, setting

ADD_CHUNK = 65_536  # keys converted fp16 → fp32 and added per step, to bound memory
INDEX_FILE = "index.faiss"
#: The inverted lists of an ``on_disk`` index, memory-mapped when searched.
LISTS_FILE = "lists.ivfdata"
#: Fewer queries gain nothing from scanning each inverted list once for all of them.
BATCHED_SEARCH_MIN_QUERIES = 4096
#: Keys per block of an ``on_disk`` build: one block's codes are in memory at a time.
ON_DISK_BLOCK = 1_048_576


class FaissRetriever(Retriever):
    """Exact or approximate L2 search over vectors with faiss (any factory string)."""

    name = "faiss"
    kind = "vectors"

    @dataclass
    class Config:
        factory: str = setting("auto", 'a faiss factory string ("Flat", "IVF4096,PQ64"); "auto": exact up to '
                                       '100k keys, then an inverted file (with OPQ-rotated PQ codes above 2M keys)')
        nprobe: int = setting(32, "inverted lists visited per query (IVF indexes only)", build=False)
        train_size: int = setting(100_000, "keys sampled (seeded) to train an IVF/PQ index")
        seed: int = setting(0, "seed of the training sample")
        on_disk: bool = setting(False, "IVF indexes only: add the keys block by block, each written to disk, and "
                                       "merge the blocks into one inverted-lists file searched memory-mapped "
                                       "(faiss merge_ondisk): a store larger than memory can be indexed")
        batched_search: bool = setting(False, "IVF indexes only: kNN targets search every key through faiss's "
                                              "big_batch_search (queries routed once, each inverted list read once "
                                              "for all of its queries), for lists that do not fit in memory; "
                                              "slower when they do (benchmarks/RESULTS.md)", build=False)

        def __post_init__(self):
            if self.nprobe < 1:
                raise ConfigError(f"nprobe must be at least 1, got {self.nprobe}")
            if self.train_size < 1:
                raise ConfigError(f"train_size must be at least 1, got {self.train_size}")

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.index = None
        self.factory = self.config.factory  # the concrete factory string once "auto" is resolved

    def facts(self) -> dict:
        return {"index_factory": self.factory}

    def index_settings(self, n_items: int, dim: int | None) -> dict:
        """``factory="auto"`` resolved for the store: the same index as its explicit factory string."""
        return {**self.build_settings(), "factory": resolve_factory(self.config.factory, n_items, dim or 0)}

    def build(self, items: np.ndarray, folder: Path) -> None:
        """Index the rows of ``items`` (any float dtype, memory-mapped is fine) into ``folder``."""
        self.factory = resolve_factory(self.config.factory, *items.shape)
        index = self._empty_index(items.shape[1])
        if self.config.on_disk:
            self._check_ivf(index)
        sample = None if index.is_trained else self._training_sample(index, items)
        index = self._placed(index)
        if sample is not None:
            self._train(index, sample)
        if self.config.on_disk:
            self._add_on_disk(index, items, Path(folder))
        else:
            for start in range(0, len(items), ADD_CHUNK):
                index.add(np.ascontiguousarray(items[start:start + ADD_CHUNK], dtype=np.float32))
        write_index(self._on_cpu(index), Path(folder) / INDEX_FILE)
        self.index = index
        self._set_nprobe()

    def _placed(self, index):
        """The index where it is trained, filled and searched (a subclass moves it to a GPU)."""
        return index

    def _on_cpu(self, index):
        """The index as faiss writes it to disk (a subclass brings it back from a GPU)."""
        return index

    def _check_ivf(self, index) -> None:
        import faiss

        try:
            faiss.extract_index_ivf(index)
        except RuntimeError:
            raise ConfigError(f"on_disk needs an inverted-file index (a factory with IVF), not "
                              f"{self.factory!r}") from None

    def _add_on_disk(self, index, items: np.ndarray, folder: Path) -> None:
        """Blocks of keys added to copies of the trained empty index and written to disk, then
        merged into ``LISTS_FILE``; ids are the keys' rows."""
        import faiss
        from faiss.contrib.ondisk import merge_ondisk

        blocks = []
        for number, start in enumerate(range(0, len(items), ON_DISK_BLOCK)):
            block = faiss.clone_index(index)
            for first in range(start, min(start + ON_DISK_BLOCK, len(items)), ADD_CHUNK):
                keys = np.ascontiguousarray(items[first:min(first + ADD_CHUNK, start + ON_DISK_BLOCK)],
                                            dtype=np.float32)
                block.add_with_ids(keys, np.arange(first, first + len(keys), dtype=np.int64))
            blocks.append(folder / f"block-{number:05d}.index")
            write_index(block, blocks[-1])
            del block
        try:
            with _stdout_to_stderr():  # faiss prints its resizing of the lists file; stdout is for results
                merge_ondisk(index, [str(path) for path in blocks], str(folder / LISTS_FILE))
        except RuntimeError as error:
            raise ArtifactError(f"merging the index blocks in {folder} failed: {_faiss_message(error)}") from error
        for path in blocks:
            path.unlink()

    def _empty_index(self, dim: int):
        import faiss

        try:
            return faiss.index_factory(dim, self.factory, faiss.METRIC_L2)
        except RuntimeError as error:
            raise ConfigError(f"invalid faiss factory string {self.factory!r} "
                              f"for dimension {dim}: {_faiss_message(error)}") from error

    def _training_sample(self, index, items: np.ndarray) -> np.ndarray:
        """The seeded sample of keys an untrained index learns its lists and codes from (fp32)."""
        needed = _minimum_training_points(index)
        if len(items) < needed:
            raise ConfigError(f"index {self.factory!r} needs at least {needed} keys to train, "
                              f"the store has {len(items)}; use a smaller index or factory 'Flat'")
        rng = np.random.default_rng(self.config.seed)
        size = min(len(items), max(self.config.train_size, needed))
        rows = np.sort(rng.choice(len(items), size=size, replace=False))
        return np.ascontiguousarray(items[rows], dtype=np.float32)

    def _train(self, index, sample: np.ndarray) -> None:
        try:
            index.train(sample)
        except RuntimeError as error:
            raise ConfigError(f"training index {self.factory!r} failed: {_faiss_message(error)}") from error

    def load(self, items: np.ndarray, folder: Path) -> None:
        """Open ``folder``'s index memory-mapped (where the index type allows), checking its size."""
        import faiss

        path = Path(folder) / INDEX_FILE
        if not path.is_file():
            raise ArtifactError(f"index file missing: {path}")
        if self.config.on_disk and not (Path(folder) / LISTS_FILE).is_file():
            raise ArtifactError(f"index lists missing: {Path(folder) / LISTS_FILE}")
        try:
            self.index = faiss.read_index(str(path), self._read_flags())
        except RuntimeError:
            try:  # not every index type can be memory-mapped
                self.index = faiss.read_index(str(path))
            except RuntimeError as error:
                raise ArtifactError(f"corrupt faiss index {path}: {_faiss_message(error)}") from error
        if self.index.ntotal != len(items):
            raise ArtifactError(f"faiss index {path} holds {self.index.ntotal} keys, the datastore {len(items)}")
        self.index = self._placed(self.index)
        self._set_nprobe()

    def _read_flags(self) -> int:
        """How faiss opens the index file: memory-mapped, its on-disk lists read beside it (an
        on-disk index names its lists file by the path it was built at)."""
        import faiss

        return faiss.IO_FLAG_ONDISK_SAME_DIR if self.config.on_disk else faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY

    def _set_nprobe(self) -> None:
        import faiss

        try:
            faiss.extract_index_ivf(self.index).nprobe = self.config.nprobe
        except RuntimeError:
            pass  # not an IVF index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances and ids ``[n, k]``; missing neighbours have id -1."""
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        with database_block(len(queries)):
            return sorted_by_distance(*self.index.search(queries, k))

    def search_many(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """With ``batched_search``, many queries of an IVF index through faiss's batched path: the
        queries are routed once and each visited inverted list is read once for all of its
        queries (``faiss.contrib.big_batch_search``), not once per query — for lists read from
        disk. With the lists in memory faiss's own search is faster on a CPU (measured:
        benchmarks/RESULTS.md), so that is the default."""
        import faiss
        from faiss.contrib.big_batch_search import big_batch_search

        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        index = faiss.downcast_index(self.index)
        rotated = isinstance(index, faiss.IndexPreTransform)  # OPQ: the inverted file is behind a rotation
        ivf = faiss.downcast_index(index.index) if rotated else index
        if (not self.config.batched_search or not isinstance(ivf, faiss.IndexIVF)
                or len(queries) < BATCHED_SEARCH_MIN_QUERIES or len(queries) * ivf.nprobe <= ivf.nlist):
            # not asked, not an inverted file, or too few queries (faiss's bucket sort of the routed queries
            # needs more of them than lists)
            return self.search(queries, k)
        for number in range(index.chain.size() if rotated else 0):  # rotate the queries as the index does
            queries = index.chain.at(number).apply(queries)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # it reports every list at verbose=0
            return big_batch_search(ivf, queries, k, verbose=0)


#: Up to this many keys, "auto" searches exactly; above, an inverted file visits a few lists only.
EXACT_SEARCH_MAX_KEYS = 100_000
#: Above this many keys, "auto" also compresses keys with (OPQ-rotated) product quantisation.
UNCOMPRESSED_MAX_KEYS = 2_000_000


def resolve_factory(factory: str, n_keys: int, dim: int) -> str:
    """The factory string for ``factory``; "auto" picks one from the store's size.

    Exact ``Flat`` for small stores; ``IVF{n},Flat`` (exact distances within the visited lists)
    up to two million keys; beyond, 64-byte PQ codes as in the paper, behind an OPQ rotation
    (``OPQ{m},IVF{n},PQ{m}``). OPQ spreads the keys' variance evenly over the PQ's sub-vectors:
    on Qwen2.5-Coder-0.5B's real keys it won back half of the recall that PQ64 loses (0.675 →
    0.717 at k = 1,024, against 0.757 uncompressed), for a rotation trained once on the training
    sample. The coarse quantiser stays flat: an HNSW one lost recall at 10M keys with these 8,192
    lists (benchmarks/RESULTS.md).
    """
    if factory != "auto":
        return factory
    if n_keys <= EXACT_SEARCH_MAX_KEYS:
        return "Flat"
    lists = inverted_lists(n_keys)
    if n_keys <= UNCOMPRESSED_MAX_KEYS:
        return f"IVF{lists},Flat"
    codes = max(m for m in range(1, 65) if dim % m == 0)
    return f"OPQ{codes},IVF{lists},PQ{codes}"


#: Distances an exact search holds per block of keys (floats): 64 MiB, the block's buffer.
SEARCH_BLOCK_FLOATS = 1 << 24
#: Keys per block of an exact search: at most this many (faiss's default is 1,024).
SEARCH_BLOCK_MAX_KEYS = 16_384


@contextlib.contextmanager
def database_block(n_queries: int):
    """faiss's exact search computes the distances of a block of queries to a block of keys with
    one matrix product, then keeps each query's k nearest of the block. Its default block of 1,024
    keys makes that second step, with k = 1,024, run once per 1,024 keys: the block is widened
    here to as many keys as 64 MiB of distances hold for these queries (up to 16,384), which made
    memdec-demo-l's search of 1,024 queries among 32,767 keys a third faster
    (benchmarks/RESULTS.md). The distances and ids are the same: each is the same dot product, and
    the keys are still visited in order (a test)."""
    import faiss

    rows = max(1, min(n_queries, faiss.cvar.distance_compute_blas_query_bs))
    saved = faiss.cvar.distance_compute_blas_database_bs
    faiss.cvar.distance_compute_blas_database_bs = max(saved, min(SEARCH_BLOCK_MAX_KEYS, SEARCH_BLOCK_FLOATS // rows))
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_database_bs = saved


def sorted_by_distance(distances: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row nearest first, as a retriever promises. faiss sorts its results, but its GPU search
    has not always (the cuVS bug): rows out of order are sorted, the others left as they are."""
    disordered = np.flatnonzero((np.diff(distances, axis=1) < 0).any(axis=1))
    if len(disordered):
        order = np.argsort(distances[disordered], axis=1, kind="stable")
        distances, ids = distances.copy(), ids.copy()
        distances[disordered] = np.take_along_axis(distances[disordered], order, axis=1)
        ids[disordered] = np.take_along_axis(ids[disordered], order, axis=1)
    return distances, ids


def inverted_lists(n_keys: int) -> int:
    """The inverted lists "auto" gives a store: about 4·√n, a power of two (at least 16)."""
    return 1 << max(4, int(math.log2(4 * math.sqrt(n_keys))))


def write_index(index, path: Path) -> None:
    """faiss's writer reports a full or read-only disk as a RuntimeError: say what happened."""
    import errno

    import faiss

    from memdec_core.store.disk import refusal

    try:
        faiss.write_index(index, str(path))
    except RuntimeError as error:
        message = _faiss_message(error)
        causes = ((errno.ENOSPC, "No space left"), (errno.EDQUOT, "quota"), (errno.EROFS, "Read-only"),
                  (errno.EACCES, "Permission denied"), (errno.EIO, "Input/output error"))
        code = next((number for number, words in causes if words in str(error)), None)
        if code is None:
            raise ArtifactError(f"cannot write the faiss index {path}: {message}") from error
        raise refusal(OSError(code, message), path) from error


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 pointed at stderr for the block (what C++ code prints goes there too)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _minimum_training_points(index) -> int:
    import faiss

    try:
        return faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return 256  # a PQ codebook has 256 centroids per sub-quantiser


def _faiss_message(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
