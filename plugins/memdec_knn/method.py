"""kNN-LM (Khandelwal et al.): mix the base with a distribution over its nearest training contexts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memdec_core.artifacts import cached_artifact, content_key, folder_bytes
from memdec_core.errors import ArtifactError, ConfigError
from memdec_core.evaluate import EvalContext, MethodResult, ScoredBatch, evaluate_mixture
from memdec_core.interfaces import Method
from memdec_core.progress import log
from memdec_knn import distribution
from memdec_knn.datastore import LAYER, Datastore, build_datastore, open_datastore
from memdec_knn.index import FaissRetriever

#: Temperatures tried on validation. Squared-L2 distances between post-norm states range from
#: ~1 to ~10^4 depending on the model, so the grid is wide and logarithmic.
TEMPERATURE_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0)


@dataclass
class KnnSettings:
    """The settings of ``knn-lm`` (also used by ``memdec datastore build``)."""

    k: int = 1024
    temperatures: tuple = TEMPERATURE_GRID
    factory: str = "auto"  # Flat up to 100k keys, then IVF (see memdec_knn.index.resolve_factory)
    nprobe: int = 32
    train_size: int = 100_000
    datastore: str = ""  # a prebuilt datastore folder; empty: build (or reuse) one in the cache

    def __post_init__(self):
        if self.k < 1:
            raise ConfigError(f"k must be at least 1, got {self.k}")
        if isinstance(self.temperatures, (int, float)):
            self.temperatures = (self.temperatures,)
        self.temperatures = tuple(float(t) for t in self.temperatures)
        if not self.temperatures or min(self.temperatures) <= 0:
            raise ConfigError(f"temperatures must be positive, got {self.temperatures}")

    def retriever(self) -> FaissRetriever:
        return FaissRetriever(factory=self.factory, nprobe=self.nprobe, train_size=self.train_size)


class KnnLM(Method):
    """kNN-LM: a faiss datastore of (hidden state → next token) over the train split; λ and T tuned."""

    name = "knn-lm"
    Config = KnnSettings

    def evaluate(self, ctx: EvalContext) -> MethodResult:
        store = self.datastore_for(ctx)
        memory = KnnMemory(store, self.config.k, self.config.temperatures)
        result = evaluate_mixture(ctx, memory)
        result.details.update(datastore=str(store.folder), datastore_size=len(store), params_added=0,
                              bytes_added=folder_bytes(store.folder),
                              train_seconds=store.manifest.get("build_seconds"))
        return result

    def datastore_for(self, ctx: EvalContext) -> Datastore:
        """The given datastore (checked against this base), or the cached one, built on first use."""
        if self.config.datastore:
            store = open_datastore(Path(self.config.datastore), self.config.retriever().config)
            check_datastore_matches(store, ctx)
            return store
        folder = cached_artifact("datastores", datastore_key(ctx, self.config))
        if folder.exists():
            log(f"reusing datastore {folder}")
            return open_datastore(folder, self.config.retriever().config)
        return self.build_datastore(ctx, folder)

    def build_datastore(self, ctx: EvalContext, folder: Path) -> Datastore:
        log(f"building datastore for {ctx.base.model_id} in {folder}")
        return build_datastore(ctx.base, ctx.corpus.streams["train"], folder, context=ctx.context,
                               stride=ctx.stride, batch_size=ctx.settings.batch_size,
                               retriever=self.config.retriever(), data_hash=ctx.corpus.data_hash("train"))


def datastore_key(ctx: EvalContext, settings: KnnSettings) -> str:
    return content_key("datastore", ctx.base.fingerprint, ctx.base.tokenizer_fingerprint,
                       ctx.corpus.data_hash("train"), ctx.context, ctx.stride, LAYER,
                       settings.factory, settings.train_size)


def check_datastore_matches(store: Datastore, ctx: EvalContext) -> None:
    manifest = store.manifest
    if manifest["tokenizer_fingerprint"] != ctx.base.tokenizer_fingerprint:
        raise ArtifactError(f"datastore {store.folder} was built with another tokenizer "
                            f"({manifest['base_model']}) than {ctx.base.model_id}")
    if manifest["model_fingerprint"] != ctx.base.fingerprint:
        raise ArtifactError(f"datastore {store.folder} holds hidden states of {manifest['base_model']}, "
                            f"not of {ctx.base.model_id}: kNN-LM needs the same model for keys and queries")


class KnnMemory:
    """The kNN distribution as a mixture memory: one search per batch, every temperature from it."""

    capture_hidden = True

    def __init__(self, store: Datastore, k: int, temperatures: tuple):
        self.store, self.k, self.temperatures = store, min(k, len(store)), temperatures

    def grid(self) -> list[dict]:
        return [{"temperature": temperature} for temperature in self.temperatures]

    def prepare(self, batch: ScoredBatch):
        distances, ids = self.store.retriever.search(batch.hidden.numpy(), self.k)
        values = self.store.vals[np.clip(ids, 0, None)]  # id -1 (no neighbour) is masked later
        return torch.from_numpy(distances), torch.from_numpy(ids), torch.from_numpy(values.astype(np.int64))

    def gold_logprobs(self, state, batch: ScoredBatch, knobs: dict) -> torch.Tensor:
        distances, ids, values = state
        return distribution.gold_logprobs(distances, ids, values, batch.targets, knobs["temperature"])

    def logprobs(self, state, batch: ScoredBatch, knobs: dict) -> torch.Tensor:
        distances, ids, values = state
        return distribution.dense_logprobs(distances, ids, values, knobs["temperature"],
                                           vocab_size=batch.logits.shape[1])
