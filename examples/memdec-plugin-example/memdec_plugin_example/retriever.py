"""``numpy-exact``: exact squared-L2 search in numpy, a vectors retriever for ``knn-lm``."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memdec_core.errors import ArtifactError
from memdec_core.interfaces import Retriever, setting


class NumpyExact(Retriever):
    """Exact squared-L2 search in numpy: ‖q‖² − 2·q·k + ‖k‖², keys' norms precomputed."""

    name = "numpy-exact"
    kind = "vectors"

    @dataclass
    class Config:
        block: int = setting(1024, "queries compared with every key per block (bounds memory)", build=False)

    def build(self, items, folder: Path) -> None:
        keys = np.asarray(items, dtype=np.float32)
        np.save(Path(folder) / "norms.npy", (keys * keys).sum(axis=1))

    def load(self, items, folder: Path) -> None:
        self.keys = np.asarray(items, dtype=np.float32)
        self.norms = np.load(Path(folder) / "norms.npy", allow_pickle=False)
        if len(self.norms) != len(self.keys):
            raise ArtifactError(f"{folder}: norms of {len(self.norms)} keys, the store has {len(self.keys)}")

    def search(self, queries, k: int):
        queries = np.asarray(queries, dtype=np.float32)
        k = min(k, len(self.keys))
        found = [self._search_block(queries[start:start + self.config.block], k)
                 for start in range(0, len(queries), self.config.block)]
        return np.concatenate([d for d, _ in found]), np.concatenate([i for _, i in found])

    def _search_block(self, queries: np.ndarray, k: int):
        distances = (queries * queries).sum(axis=1)[:, None] - 2 * queries @ self.keys.T + self.norms[None, :]
        nearest = np.argpartition(distances, k - 1, axis=1)[:, :k]
        chosen = np.take_along_axis(distances, nearest, axis=1)
        order = np.argsort(chosen, axis=1, kind="stable")
        return np.take_along_axis(chosen, order, axis=1), np.take_along_axis(nearest, order, axis=1).astype(np.int64)
