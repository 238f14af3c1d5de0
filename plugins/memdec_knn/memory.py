"""``knn-datastore``: the kNN-LM distribution as a memory model.

Per batch the base's ``last_ffn_input`` at every scored position is searched once for its k
nearest datastore keys; every temperature of the grid is computed from that one search. The
search goes through a registered vectors retriever (``retriever=faiss`` by default), so a
third party's retriever (an hnswlib graph, a GPU index, a vector database) plugs in by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memdec_core.errors import ArtifactError, ConfigError
from memdec_core.interfaces import Costs, MemoryModel, Use
from memdec_knn.settings import KnnSettings

if TYPE_CHECKING:
    from memdec_core.interfaces import EvalContext
    from memdec_knn.datastore import Datastore

RETRIEVER_KIND = "retrievers"


class KnnDatastore(MemoryModel):
    """A datastore of (hidden state → next token) over the train split, searched at every token."""

    name = "knn-datastore"
    Config = KnnSettings
    needs_hidden = True
    artifact_type = "datastore"
    artifact_setting = "datastore"
    knob_bounds = {"temperature": (0.0, float("inf"))}
    feature_names = ("knn_nearest_distance",)
    skippable = True

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.store: Datastore | None = None
        self._groups = None  # (the search's ids, their token_groups): the last search's grouping

    def uses(self) -> list[Use]:
        return [Use(RETRIEVER_KIND, self.config.retriever, f"{self.name}.retriever", accepts=("vectors",))]

    def prepare(self, ctx: "EvalContext") -> None:
        from memdec_knn.api import datastore_for

        retriever = ctx.create(RETRIEVER_KIND, self.config.retriever)
        self.store = datastore_for(ctx, self.config.datastore).with_index(retriever)
        self.store.check_values(ctx.base.vocab_size)
        self.tokenizer_fingerprint = self.store.manifest["tokenizer_fingerprint"]

    def grid(self) -> list[dict]:
        return [{"temperature": temperature} for temperature in self.config.temperatures]

    def _k(self) -> int:
        return min(self.config.k, len(self._store()))

    def _store(self) -> "Datastore":
        if self.store is None:
            raise ArtifactError("knn-datastore: prepare() was not called")
        return self.store

    def score(self, batch):
        return self.neighbours(batch.hidden)

    def neighbours(self, hidden):
        """``(distances, ids, values)`` of the k nearest keys to each row of ``hidden``."""
        import numpy as np
        import torch

        store = self._store()
        distances, ids = store.search(hidden.float().numpy(), self._k())
        values = store.vals[np.clip(ids, 0, None)]  # id -1 (no neighbour) is masked later
        return torch.from_numpy(distances), torch.from_numpy(ids), torch.from_numpy(values.astype(np.int64))

    def gold_logprobs(self, state, batch, knobs: dict):
        from memdec_knn import distribution

        distances, ids, values = state
        return distribution.gold_logprobs(distances, ids, values, batch.targets, knobs["temperature"])

    def logprobs(self, state, batch, knobs: dict):
        return self._dense(state, knobs, batch.logits.shape[1])

    def support(self, state, batch, knobs: dict):
        from memdec_knn import distribution

        distances, ids, values = state
        if self._groups is None or self._groups[0] is not ids:  # one sort per search, for every temperature
            self._groups = ids, distribution.token_groups(ids, values)
        token_ids, probs = distribution.sparse_distribution(distances, ids, values, knobs["temperature"],
                                                            self._groups[1])
        return token_ids, probs.log()

    def features(self, state, batch):
        return nearest_distance(state[0])

    def _dense(self, state, knobs: dict, width: int):
        from memdec_knn import distribution

        distances, ids, values = state
        return distribution.dense_logprobs(distances, ids, values, knobs["temperature"], vocab_size=width)

    def stepper(self, knobs: dict) -> "KnnStepper":
        return KnnStepper(self, knobs)

    def costs(self) -> Costs:
        from memdec_core.store.artifacts import folder_bytes

        store = self._store()
        index_bytes = folder_bytes(store.index_folder) if store.index_folder else 0
        return Costs(bytes_added=folder_bytes(store.folder), memory_bytes=index_bytes + store.vals.nbytes,
                     train_seconds=float(store.manifest.get("build_seconds") or 0)
                     + float(store.index_manifest.get("build_seconds") or 0))

    def describe_prepared(self) -> dict:
        store = self._store()
        return {"datastore": str(store.folder), "datastore_size": len(store), "retriever": self.config.retriever,
                "index": str(store.index_folder)}


def nearest_distance(distances):
    """``[N, 1]`` log(1 + the squared distance to the nearest key): how close the store comes."""
    return distances[:, :1].float().clamp(min=0).log1p()


class KnnStepper:
    """kNN-LM in generation: the base's hidden state at each position is the query; no state."""

    def __init__(self, memory: KnnDatastore, knobs: dict):
        self.memory, self.knobs = memory, knobs
        self._features = None

    def logprobs(self, input_ids, attention_mask, hidden, width: int, keep: int, needed=None):
        """``needed`` ``[rows, keep]`` bool (a retrieval gate): only those positions are searched;
        the others get −inf rows and feature 0 (the composite gives them the base's log-probs)."""
        import torch

        if hidden is None:
            raise ConfigError("knn-datastore needs the base's hidden states in generation")
        rows, kept, dim = hidden.shape
        queries = hidden.reshape(rows * kept, dim).float().cpu()
        if needed is None:
            state = self.memory.neighbours(queries)
            self._features = nearest_distance(state[0]).reshape(rows, kept, -1)
            return self.memory._dense(state, self.knobs, width).reshape(rows, kept, width)
        searched = needed.reshape(-1).cpu()
        dense = torch.full((rows * kept, width), float("-inf"))
        features = torch.zeros(rows * kept, len(self.memory.feature_names))
        if searched.any():
            state = self.memory.neighbours(queries[searched])
            features[searched] = nearest_distance(state[0])
            dense[searched] = self.memory._dense(state, self.knobs, width)
        self._features = features.reshape(rows, kept, -1)
        return dense.reshape(rows, kept, width)

    def features(self):
        """``[rows, keep, 1]`` the memory's own features at the positions of the last call."""
        return self._features

    def select(self, rows) -> None:
        pass  # every query is the base's hidden state: nothing to keep
