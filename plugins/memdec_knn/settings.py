"""The settings of ``knn-datastore`` and ``knn-lm``, and the temperatures they try."""

from __future__ import annotations

from dataclasses import dataclass

from memdec_core.errors import ConfigError
from memdec_core.interfaces import setting

#: Temperatures tried on validation. Squared-L2 distances between post-norm states range from
#: ~1 to ~10^4 depending on the model, so the grid is wide and logarithmic.
TEMPERATURE_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0)


@dataclass
class KnnSettings:
    """The settings of ``knn-datastore`` (and of ``knn-lm``, which mixes it)."""

    k: int = setting(1024, "neighbours retrieved per scored position")
    temperatures: tuple = setting(TEMPERATURE_GRID, "temperatures T of the weights softmax(−d/T), tried on validation")
    retriever: str = setting("faiss", "the vectors retriever that searches the datastore (memdec list retrievers)")
    datastore: str = setting("", "a datastore folder (memdec datastore build); empty: build or reuse one in the cache")

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}")
        if isinstance(self.temperatures, (int, float)):
            self.temperatures = (self.temperatures,)
        self.temperatures = tuple(float(t) for t in self.temperatures)
        if not self.temperatures or min(self.temperatures) <= 0:
            raise ConfigError(f"temperatures must be positive, got {self.temperatures}")
