"""The public API of the kNN-LM plugin, for Python users and for other plugins.

    from memdec_knn import api
    store = api.datastore_for(ctx)                          # the base's datastore, built once, cached
    store = store.with_index(ctx.create("retrievers", "faiss"))
    distances, ids = store.search(queries, k=16)            # squared L2, ascending; id −1: none

Other plugins (the Memory Decoder's kNN targets) use these functions and ``Datastore``'s public
attributes (``keys``, ``vals``, ``manifest``, ``folder``, ``search``), nothing else.
"""

from __future__ import annotations

from pathlib import Path

from memdec_core.errors import ArtifactError, ConfigError
from memdec_core.interfaces import EvalContext
from memdec_core.runtime.progress import log
from memdec_core.runtime.timings import timed
from memdec_core.store.artifacts import cached_artifact, content_key
from memdec_core.store.cache_dir import shared_entry_lock
from memdec_knn.datastore import LAYER, Datastore, open_datastore
from memdec_knn.settings import TEMPERATURE_GRID

__all__ = ["Datastore", "LAYER", "TEMPERATURE_GRID", "datastore_for", "open_datastore", "build_datastore",
           "check_datastore_matches", "sparse_distribution"]


def sparse_distribution(distances, ids, values, temperature: float):
    """Per row, the distinct tokens among the neighbours and their summed softmax(−d/T) weight:
    ``(token_ids, probs)``, both ``[N, k]`` tensors padded with id −1 and probability 0."""
    from memdec_knn.distribution import sparse_distribution as compute

    return compute(distances, ids, values, temperature)


def datastore_for(ctx: EvalContext, folder: str | Path = "") -> Datastore:
    """The datastore at ``folder`` (checked against ``ctx.base``), or the base's cached one over the
    train split, built on first use."""
    if folder:
        store = open_datastore(Path(folder).expanduser())
        check_datastore_matches(store, ctx)
        return store
    location = cached_artifact("datastores", datastore_key(ctx))
    with shared_entry_lock(location):  # a second run sharing the cache waits, then reuses it; ranks build it together
        if location.exists():
            log(f"reusing datastore {location}")
            return open_datastore(location)
        return _build(ctx, location)


@timed("datastore")
def _build(ctx: EvalContext, folder: Path) -> Datastore:
    from memdec_knn.datastore import build_datastore as write_datastore

    corpus = ctx.require_corpus("a kNN datastore")
    log(f"building datastore for {ctx.base.model_id} in {folder}")
    return write_datastore(ctx.base, corpus.streams["train"], folder, context=ctx.context, stride=ctx.stride,
                           batch_size=ctx.settings.batch_size, data_hash=corpus.data_hash("train"),
                           domain=corpus.corpus.name)


def datastore_key(ctx: EvalContext) -> str:
    """The cache key of ``ctx.base``'s datastore over the train split, in ``ctx``'s windows; the
    plugin's version (or code) is the ``knn-datastore`` memory model's, looked up by name (that
    component sits above this module)."""
    from memdec_core.components import registry
    from memdec_core.components.identity import component_identity

    corpus = ctx.require_corpus("a kNN datastore")
    return content_key("datastore", ctx.base.fingerprint, ctx.base.tokenizer_fingerprint, corpus.data_hash("train"),
                       ctx.context, ctx.stride, LAYER,
                       component_identity(registry.get("memory-models", "knn-datastore")))


def check_datastore_matches(store: Datastore, ctx: EvalContext) -> None:
    manifest = store.manifest
    if manifest["tokenizer_fingerprint"] != ctx.base.tokenizer_fingerprint:
        raise ArtifactError(f"datastore {store.folder} was built with another tokenizer "
                            f"({manifest['base_model']}) than {ctx.base.model_id}")
    if manifest["model_fingerprint"] != ctx.base.fingerprint:
        raise ArtifactError(f"datastore {store.folder} holds hidden states of {manifest['base_model']}, "
                            f"not of {ctx.base.model_id}: kNN-LM needs the same model for keys and queries")


def build_datastore(domain, base: str, *, settings=None, output: Path | None = None, retriever: str = "faiss",
                    component_settings: dict | None = None, index: bool = True) -> str:
    """Build (or reuse from the cache) ``base``'s datastore over ``domain``'s train split, indexed
    by ``retriever`` (its settings in ``component_settings``, e.g. ``{"faiss": {"factory": "Flat"}}``).

    With ``output``, write it to that new folder instead of the cache; with ``index=False``, the
    keys and values only (a search builds its index on first use). Returns the folder.
    """
    from memdec_core.components.plan import Plan
    from memdec_core.inputs.context import prepare_context
    from memdec_core.interfaces import Use

    if output is not None and Path(output).exists():
        raise ConfigError(f"output folder already exists: {output}")
    plan = Plan(component_settings)
    retriever_component = plan.create_use(Use("retrievers", retriever, "--retriever", accepts=("vectors",)))
    plan.check_all_used([retriever_component])
    ctx = prepare_context(domain, base, settings, plan=plan, lazy=True)  # the weights only if the keys are computed
    store = _build(ctx, Path(output)) if output else datastore_for(ctx)
    return str((store.with_index(retriever_component) if index else store).folder)
