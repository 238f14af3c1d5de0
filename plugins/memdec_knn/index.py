"""The faiss retriever: an index built from a factory string, trained on a seeded sample."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memdec_core.errors import ArtifactError, ConfigError
from memdec_core.interfaces import Retriever

ADD_CHUNK = 65_536  # keys converted fp16 → fp32 and added per step, to bound memory


class FaissRetriever(Retriever):
    """Exact or approximate L2 search over vectors with faiss (any factory string)."""

    name = "faiss"

    @dataclass
    class Config:
        factory: str = "Flat"  # e.g. "IVF4096,PQ64" for large stores
        nprobe: int = 32  # inverted lists visited per query (IVF only)
        train_size: int = 100_000  # keys sampled to train an IVF/PQ index
        seed: int = 0

        def __post_init__(self):
            if self.nprobe < 1:
                raise ConfigError(f"nprobe must be at least 1, got {self.nprobe}")
            if self.train_size < 1:
                raise ConfigError(f"train_size must be at least 1, got {self.train_size}")

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.index = None

    def build(self, items: np.ndarray, path: str) -> None:
        """Index the rows of ``items`` (any float dtype, memory-mapped is fine) into ``path``."""
        import faiss

        index = self._empty_index(items.shape[1])
        if not index.is_trained:
            self._train(index, items)
        for start in range(0, len(items), ADD_CHUNK):
            index.add(np.ascontiguousarray(items[start:start + ADD_CHUNK], dtype=np.float32))
        faiss.write_index(index, str(path))
        self.index = index
        self._set_nprobe()

    def _empty_index(self, dim: int):
        import faiss

        try:
            return faiss.index_factory(dim, self.config.factory, faiss.METRIC_L2)
        except RuntimeError as error:
            raise ConfigError(f"invalid faiss factory string {self.config.factory!r} "
                              f"for dimension {dim}: {_faiss_message(error)}") from error

    def _train(self, index, items: np.ndarray) -> None:
        needed = _minimum_training_points(index)
        if len(items) < needed:
            raise ConfigError(f"index {self.config.factory!r} needs at least {needed} keys to train, "
                              f"the store has {len(items)}; use a smaller index or factory 'Flat'")
        rng = np.random.default_rng(self.config.seed)
        size = min(len(items), max(self.config.train_size, needed))
        sample = np.sort(rng.choice(len(items), size=size, replace=False))
        try:
            index.train(np.ascontiguousarray(items[sample], dtype=np.float32))
        except RuntimeError as error:
            raise ConfigError(f"training index {self.config.factory!r} failed: {_faiss_message(error)}") from error

    def load(self, path: str) -> None:
        import faiss

        if not Path(path).is_file():
            raise ArtifactError(f"index file missing: {path}")
        try:
            self.index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            try:  # not every index type can be memory-mapped
                self.index = faiss.read_index(str(path))
            except RuntimeError as error:
                raise ArtifactError(f"corrupt faiss index {path}: {_faiss_message(error)}") from error
        self._set_nprobe()

    def _set_nprobe(self) -> None:
        import faiss

        try:
            faiss.extract_index_ivf(self.index).nprobe = self.config.nprobe
        except RuntimeError:
            pass  # not an IVF index

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances and ids ``[n, k]``; missing neighbours have id -1."""
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def _minimum_training_points(index) -> int:
    import faiss

    try:
        return faiss.extract_index_ivf(index).nlist
    except RuntimeError:
        return 256  # a PQ codebook has 256 centroids per sub-quantiser


def _faiss_message(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
