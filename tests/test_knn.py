"""kNN-LM datastore and distribution against brute-force references."""

from pathlib import Path

import numpy as np
import pytest
import torch

from memdec_combiners.linear import LAMBDA_GRID
from memdec_core.api import prepare_context
from memdec_core.errors import ArtifactError, ConfigError
from memdec_core.inputs.data import make_windows
from memdec_core.interfaces import EvalSettings
from memdec_knn import datastore as datastore_module
from memdec_knn import distribution
from memdec_knn.api import datastore_for
from memdec_knn.datastore import build_datastore, open_datastore
from memdec_knn.index import FaissRetriever
from memdec_knn.memory import KnnDatastore
from memdec_knn.method import KnnLM

CONTEXT, STRIDE = 64, 32


@pytest.fixture(scope="module")
def ctx(tiny_gpt2, corpus_dir):
    return prepare_context(str(corpus_dir), str(tiny_gpt2), EvalSettings(context=CONTEXT, stride=STRIDE))


@pytest.fixture(scope="module")
def store(ctx, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stores") / "store"
    stream = ctx.corpus.streams["train"][:400]
    store = build_datastore(ctx.base, stream, folder, context=CONTEXT, stride=STRIDE, batch_size=3, data_hash="test")
    return store.with_index(FaissRetriever())


def ln_2_outputs(model, input_ids: np.ndarray) -> torch.Tensor:
    """The last GPT-2 block's ln_2 output (= its MLP input), read by a hook on ln_2 itself."""
    seen = {}
    handle = model.transformer.h[-1].ln_2.register_forward_hook(lambda m, a, out: seen.update(out=out))
    with torch.no_grad():
        model(torch.from_numpy(input_ids[None].astype(np.int64)))
    handle.remove()
    return seen["out"][0]


def test_row_i_holds_hidden_state_at_i_and_token_at_i_plus_1(ctx, store):
    stream = ctx.corpus.streams["train"][:400]
    assert len(store) == len(stream) - 1
    keys, vals = np.load(store.folder / "keys.npy"), np.load(store.folder / "vals.npy")  # real NPY files
    assert keys.dtype == np.float16 and vals.dtype == np.int32
    assert np.array_equal(vals, stream[1:])
    for window in make_windows(len(stream), CONTEXT, STRIDE):
        hidden = ln_2_outputs(ctx.base.model, stream[window.start:window.end])
        for position in range(window.score_from, window.end - 1):
            expected = hidden[position - window.start].numpy()
            assert np.allclose(keys[position], expected, atol=2e-2, rtol=1e-2), position


def brute_force_knn(keys: np.ndarray, vals: np.ndarray, query: np.ndarray, k: int, temperature: float) -> dict:
    distances = ((keys.astype(np.float64) - query.astype(np.float64)) ** 2).sum(axis=1)
    nearest = np.argsort(distances, kind="stable")[:k]
    weights = np.exp(-(distances[nearest] - distances[nearest].min()) / temperature)
    weights /= weights.sum()
    result: dict[int, float] = {}
    for index, weight in zip(nearest, weights):
        result[int(vals[index])] = result.get(int(vals[index]), 0.0) + weight
    return result


@pytest.mark.parametrize("temperature", [1.0, 10.0, 100.0])
def test_knn_distribution_equals_numpy_brute_force(store, temperature):
    keys = np.asarray(store.keys, dtype=np.float32)
    rng = np.random.default_rng(0)
    queries = keys[rng.choice(len(keys), 5)] + rng.normal(0, 0.05, (5, keys.shape[1])).astype(np.float32)
    k = 16
    distances, ids = store.search(queries, k)
    values = torch.from_numpy(np.asarray(store.vals)[ids].astype(np.int64))
    token_ids, probs = distribution.sparse_distribution(torch.from_numpy(distances), torch.from_numpy(ids),
                                                        values, temperature)
    for row, query in enumerate(queries):
        expected = brute_force_knn(keys, np.asarray(store.vals), query, k, temperature)
        got = {int(t): float(p) for t, p in zip(token_ids[row], probs[row]) if t >= 0}
        assert got.keys() == expected.keys()
        assert all(abs(got[t] - expected[t]) < 1e-4 for t in got)
        assert abs(sum(got.values()) - 1) < 1e-5
        for target in list(expected)[:3]:
            gold = distribution.gold_logprobs(torch.from_numpy(distances[row:row + 1]),
                                              torch.from_numpy(ids[row:row + 1]), values[row:row + 1],
                                              torch.tensor([target]), temperature)
            assert float(gold.exp()) == pytest.approx(expected[target], abs=1e-4)


def test_missing_neighbours_get_no_mass():
    distances = torch.tensor([[1.0, 2.0, 0.0]])
    ids = torch.tensor([[5, 6, -1]])
    values = torch.tensor([[7, 7, 9]])
    token_ids, probs = distribution.sparse_distribution(distances, ids, values, 1.0)
    support = {int(t): float(p) for t, p in zip(token_ids[0], probs[0]) if t >= 0}
    assert support == {7: pytest.approx(1.0)}
    dense = distribution.dense_logprobs(distances, ids, values, 1.0, vocab_size=10).exp()
    assert float(dense.sum()) == pytest.approx(1.0) and float(dense[0, 7]) == pytest.approx(1.0)


def test_ivf_pq_index_is_trained_on_a_sample_and_searchable(ctx, tmp_path):
    stream = ctx.corpus.streams["train"][:1200]
    retriever = FaissRetriever(factory="IVF4,PQ4", nprobe=4, train_size=600)
    store = build_datastore(ctx.base, stream, tmp_path / "ivf", context=CONTEXT, stride=STRIDE, batch_size=4,
                            data_hash="x").with_index(retriever)
    assert store.index_manifest["index_factory"] == "IVF4,PQ4" and store.index_manifest["retriever"] == "faiss"
    assert store.index_folder.parent == store.folder / "indexes"
    distances, ids = store.search(np.asarray(store.keys[:3], dtype=np.float32), 8)
    assert (ids >= 0).all() and (np.diff(distances, axis=1) >= -1e-4).all()
    again = FaissRetriever(factory="IVF4,PQ4", nprobe=2, train_size=600)  # nprobe: a search setting, same index
    assert open_datastore(store.folder).with_index(again).index_folder == store.index_folder


def test_datastores_that_cannot_be_written_get_their_own_index_in_the_cache(ctx, tmp_path, monkeypatch):
    """Two datastores of one model and data in other windows have the same size and other keys:
    where their folders cannot be written, each is indexed in the cache, and searched through its
    own index (an index found by model, data and size alone would have served the other's keys)."""
    import os

    stream = ctx.corpus.streams["train"][:300]
    stores = [build_datastore(ctx.base, stream, tmp_path / name, context=context, stride=context // 2,
                              batch_size=4, data_hash="x") for name, context in (("short", 16), ("long", CONTEXT))]
    writable = os.access
    monkeypatch.setattr(datastore_module.os, "access",
                        lambda path, *args, **kwargs: Path(path).parent != tmp_path and writable(path, *args, **kwargs))
    folders = [store.with_index(FaissRetriever(factory="Flat")).index_folder for store in stores]
    assert folders[0] != folders[1] and not any(tmp_path in folder.parents for folder in folders)
    for store in stores:
        distances, _ = store.search(np.asarray(store.keys[:5], dtype=np.float32), 1)
        assert np.allclose(distances[:, 0], 0.0)  # every key finds itself


def test_bad_index_settings(ctx, tmp_path):
    stream = ctx.corpus.streams["train"][:200]
    store = build_datastore(ctx.base, stream, tmp_path / "a", context=CONTEXT, stride=STRIDE, batch_size=4,
                            data_hash="x")
    with pytest.raises(ConfigError, match="needs at least 4096 keys"):
        store.with_index(FaissRetriever(factory="IVF4096,Flat"))
    with pytest.raises(ConfigError, match="invalid faiss factory"):
        store.with_index(FaissRetriever(factory="Nonsense12"))
    assert not list((store.folder / "indexes").iterdir())  # nothing half-written


def test_k_must_be_positive():
    with pytest.raises(ConfigError, match="k must be at least 1"):
        KnnLM(k=0)


def test_interrupted_build_is_never_reused(ctx, monkeypatch, tmp_path):
    from memdec_core.engine import scoring  # the datastore pass imports its batches from here when it runs

    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "own-cache"))
    real = scoring.iter_scored_batches

    def interrupted(*args, **kwargs):
        for number, batch in enumerate(real(*args, **kwargs)):
            if number == 1:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(scoring, "iter_scored_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        datastore_for(ctx)
    from memdec_core.store.artifacts import cached_artifact
    from memdec_knn.api import datastore_key

    folder = cached_artifact("datastores", datastore_key(ctx))
    assert not folder.exists()
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(scoring, "iter_scored_batches", real)
    store = datastore_for(ctx)
    assert store.folder == folder and len(store) == len(ctx.corpus.streams["train"]) - 1


def test_corrupt_or_foreign_datastores_are_refused(store, tmp_path):
    import shutil

    copy = Path(shutil.copytree(store.folder, tmp_path / "copy"))
    np.save(copy / "vals.npy", np.zeros(3, dtype=np.int32))
    with pytest.raises(ArtifactError, match="inconsistent"):
        open_datastore(copy)
    (copy / "memdec.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        open_datastore(copy)
    (copy / "memdec.json").unlink()
    with pytest.raises(ArtifactError, match="not a memdec artifact"):
        open_datastore(copy)


def test_datastore_of_another_model_is_refused(ctx, store, tiny_llama, corpus_dir):
    other = prepare_context(str(corpus_dir), str(tiny_llama), EvalSettings(context=CONTEXT, stride=STRIDE))
    with pytest.raises(ArtifactError, match="same model for keys and queries"):
        datastore_for(other, store.folder)


def test_knn_lm_lowers_perplexity_and_reports_knobs(ctx):
    result = KnnLM(k=32).evaluate(ctx)
    from memdec_core.engine.scoring import perplexity

    base = perplexity(ctx.base.model, ctx.corpus.streams["test"], ctx.windows("test"), batch_size=4)
    assert result.test_ppl < base
    assert set(result.knobs) == {"temperature", "lam"}
    assert 0 < result.knobs["lam"] < 1
    assert len(result.tuning) == len(KnnLM.Config().temperatures) * len(LAMBDA_GRID)
    assert result.costs.params_added == 0 and result.costs.bytes_added > 0 and result.costs.train_seconds > 0


def test_knn_memory_dense_rows_match_gold(store, ctx):
    memory = KnnDatastore(k=8, temperatures=(5.0,), datastore=str(store.folder))
    memory.prepare(ctx)
    from memdec_core.engine.scoring import iter_scored_batches

    batch = next(iter_scored_batches(ctx.base.model, ctx.corpus.streams["valid"], ctx.windows("valid"),
                                     batch_size=2, capture_hidden=True))
    state = memory.score(batch)
    dense = memory.logprobs(state, batch, {"temperature": 5.0})
    gold = memory.gold_logprobs(state, batch, {"temperature": 5.0})
    from_dense = dense.gather(1, batch.targets[:, None])[:, 0]
    finite = torch.isfinite(gold)
    assert torch.equal(finite, torch.isfinite(from_dense))
    assert torch.allclose(gold[finite], from_dense[finite], atol=1e-5)


@pytest.mark.parametrize("n_queries", [1, 300, 5000])  # the widened block: 16,384 keys, then 4,096 (64 MiB)
def test_an_exact_search_in_wide_key_blocks_finds_faiss_own_neighbours_and_distances(tmp_path, n_queries):
    import faiss

    rng = np.random.default_rng(3)
    keys = rng.normal(size=(20_000, 24)).astype(np.float16)  # > 16,384: several blocks either way
    queries = np.concatenate([keys[:n_queries // 2].astype(np.float32),  # exact hits (distance 0) and ties
                              rng.normal(size=(n_queries - n_queries // 2, 24)).astype(np.float32)])
    retriever = FaissRetriever(factory="Flat")
    retriever.build(keys, tmp_path)
    default, index, blocks = faiss.cvar.distance_compute_blas_database_bs, retriever.index, []

    class Recording:  # the block of keys faiss is told to use while memdec searches
        def search(self, *args):
            blocks.append(faiss.cvar.distance_compute_blas_database_bs)
            return index.search(*args)

    retriever.index = Recording()
    for k in (10, 1024):  # a heap below faiss's reservoir threshold (100), the reservoir above
        expected = index.search(queries, k)  # faiss's own blocks of 1,024 keys
        distances, ids = retriever.search(queries, k)
        assert blocks[-1] == (16_384 if n_queries <= 1024 else 4_096)
        assert faiss.cvar.distance_compute_blas_database_bs == default  # the global is put back
        assert np.array_equal(distances, expected[0]) and np.array_equal(ids, expected[1])


def test_auto_factory_is_exact_for_small_stores_and_inverted_for_large():
    from memdec_knn.index import resolve_factory

    assert resolve_factory("auto", 50_000, 384) == "Flat"
    assert resolve_factory("auto", 400_000, 384) == "IVF2048,Flat"
    assert resolve_factory("auto", 10_000_000, 896) == "OPQ64,IVF8192,PQ64"
    assert resolve_factory("auto", 10_000_000, 576) == "OPQ64,IVF8192,PQ64"
    assert resolve_factory("auto", 10_000_000, 100) == "OPQ50,IVF8192,PQ50"
    assert resolve_factory("HNSW32", 10, 8) == "HNSW32"


def test_an_on_disk_index_gives_the_neighbours_of_the_in_memory_one_and_opens_where_it_is_moved(tmp_path,
                                                                                               monkeypatch):
    import shutil

    from memdec_knn import index as index_module
    from memdec_knn.index import FaissRetriever

    rng = np.random.default_rng(0)
    keys = (rng.normal(size=(64, 16))[rng.integers(0, 64, 6000)] + 0.3 * rng.normal(size=(6000, 16)))
    keys = keys.astype(np.float16)  # as a datastore stores them
    queries = np.asarray(keys[rng.choice(6000, 200, replace=False)], dtype=np.float32)
    monkeypatch.setattr(index_module, "ON_DISK_BLOCK", 1500)  # four blocks, merged
    in_memory, on_disk = FaissRetriever(factory="IVF32,Flat"), FaissRetriever(factory="IVF32,Flat", on_disk=True)
    (tmp_path / "memory").mkdir(), (tmp_path / "disk").mkdir()
    in_memory.build(keys, tmp_path / "memory")
    on_disk.build(keys, tmp_path / "disk")
    assert sorted(path.name for path in (tmp_path / "disk").iterdir()) == ["index.faiss", "lists.ivfdata"]
    expected = in_memory.search(queries, 50)
    got = on_disk.search(queries, 50)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)

    shutil.move(tmp_path / "disk", tmp_path / "moved")  # as an atomic write renames the folder it built in
    reopened = FaissRetriever(factory="IVF32,Flat", on_disk=True)
    reopened.load(keys, tmp_path / "moved")
    np.testing.assert_array_equal(reopened.search(queries, 50)[1], expected[1])
    with pytest.raises(ConfigError, match="on_disk needs an inverted-file index"):
        FaissRetriever(factory="Flat", on_disk=True).build(keys, tmp_path / "flat")


@pytest.mark.parametrize("factory", ["IVF16,Flat", "OPQ4,IVF16,Flat"])  # auto puts OPQ before large stores' lists
def test_many_queries_of_an_ivf_index_take_the_batched_path_and_find_the_same_neighbours(factory, monkeypatch, capfd,
                                                                                         tmp_path):
    from faiss.contrib import big_batch_search

    from memdec_knn import index as index_module
    from memdec_knn.index import FaissRetriever

    rng = np.random.default_rng(1)
    keys = (rng.normal(size=(32, 8))[rng.integers(0, 32, 5000)] + 0.5 * rng.normal(size=(5000, 8))).astype(np.float32)
    queries = keys[:3000]
    retriever = FaissRetriever(factory=factory, nprobe=4, on_disk=True, batched_search=True)
    retriever.build(keys, tmp_path)  # pytest's folder: nothing is left in the system's temporary folder
    calls = []
    real = big_batch_search.big_batch_search
    monkeypatch.setattr(big_batch_search, "big_batch_search", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    monkeypatch.setattr(index_module, "BATCHED_SEARCH_MIN_QUERIES", 1000)
    retriever.config.batched_search = False
    retriever.search_many(queries, 20)
    assert not calls  # in memory faiss's own search is faster: the default
    retriever.config.batched_search = True
    distances, ids = retriever.search_many(queries, 20)
    assert calls  # the batched path ran
    expected_distances, expected_ids = retriever.search(queries, 20)
    np.testing.assert_allclose(distances, expected_distances, rtol=1e-4, atol=1e-4)
    assert np.mean(ids == expected_ids) > 0.999  # the same neighbours; equal distances may swap places
    assert (ids[:, 0] == np.arange(3000)).all()  # each key finds itself first (what self-exclusion removes)
    assert "list" not in capfd.readouterr().out  # faiss's per-list report is silenced
    calls.clear()
    monkeypatch.setattr(index_module, "BATCHED_SEARCH_MIN_QUERIES", 1)
    few = retriever.search_many(queries[:4], 20)  # 4 queries × nprobe 4 ≤ 16 lists: faiss's bucket sort refuses
    assert not calls and (few[1] == retriever.search(queries[:4], 20)[1]).all()


def plain_forward(model, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One window through the model alone, without memdec's scoring: the last GPT-2 block's ln_2
    output (its MLP input, the kNN key) and the log-probs, in float64."""
    seen = {}
    handle = model.transformer.h[-1].ln_2.register_forward_hook(lambda m, a, out: seen.update(out=out))
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens[None].astype(np.int64))).logits[0]
    handle.remove()
    return seen["out"][0].double().numpy(), torch.log_softmax(logits.double(), dim=-1).numpy()


def brute_force_knn_lm_perplexity(model, train: np.ndarray, test: np.ndarray, k: int, temperature: float,
                                  lam: float) -> tuple[float, int]:
    """kNN-LM written out: keys the hidden state at every train position p (fp16, as the datastore
    keeps them), values the token p + 1; every test position's exact k nearest keys by squared L2,
    weights softmax(−d/T) summed per token, λ·p_kNN + (1−λ)·p_LM of the gold token. The windows are
    those of the run, each scoring its own positions once. Nothing is excluded: the queries are
    test positions and the keys train ones (self-exclusion is the kNN targets', over the train
    split). Returns (perplexity, tokens scored)."""
    keys, values = [], []
    for window in make_windows(len(train), CONTEXT, STRIDE):
        hidden, _ = plain_forward(model, train[window.start:window.end])
        scored = np.arange(window.score_from, window.end - 1)
        keys.append(hidden[scored - window.start])
        values.append(train[scored + 1])
    keys = np.concatenate(keys).astype(np.float16).astype(np.float64)
    values = np.concatenate(values)
    nll = []
    for window in make_windows(len(test), CONTEXT, STRIDE):
        hidden, logprobs = plain_forward(model, test[window.start:window.end])
        for position in range(window.score_from, window.end - 1):
            column, gold = position - window.start, test[position + 1]
            distances = ((keys - hidden[column]) ** 2).sum(axis=1)
            nearest = np.argsort(distances, kind="stable")[:k]
            weights = np.exp(-(distances[nearest] - distances[nearest].min()) / temperature)
            p_knn = weights[values[nearest] == gold].sum() / weights.sum()
            nll.append(-np.log(lam * p_knn + (1 - lam) * np.exp(logprobs[column, gold])))
    return float(np.exp(np.mean(nll))), len(nll)


def test_knn_lm_perplexity_equals_a_brute_force_knn_lm(ctx, corpus_dir, tiny_gpt2, tmp_path, monkeypatch):
    """memdec's knn-lm row (the cached datastore, faiss, the sparse distribution, the linear
    combiner, the sliding windows) against kNN-LM written out with numpy over a plain forward of
    the tiny GPT-2, at the same k, T and λ."""
    from memdec_combiners.linear import Linear
    from memdec_core import api

    k, temperature, lam = 8, 10.0, 0.3
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "cache"))
    row, = api.evaluate(str(corpus_dir), [str(tiny_gpt2)], ["knn-lm"], settings=ctx.settings,
                        component_settings={"knn-lm": {"k": k, "temperatures": (temperature,)}},
                        combiner=Linear(lam=lam))["results"]
    assert row["knobs"] == {"temperature": temperature, "lam": lam}
    train, test = ctx.corpus.streams["train"], ctx.corpus.streams["test"]
    expected, scored = brute_force_knn_lm_perplexity(ctx.base.model, train, test, k, temperature, lam)
    assert row["details"]["test_tokens"] == scored
    assert row["test_ppl"] == pytest.approx(expected, rel=1e-5)
    base_alone, _ = brute_force_knn_lm_perplexity(ctx.base.model, train[:2], test, 1, temperature, 0.0)
    assert abs(expected - base_alone) > 0.01 * base_alone  # the memory moves the number: the check has teeth
