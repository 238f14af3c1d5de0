"""kNN targets for Memory Decoder training, against brute-force references."""

import numpy as np
import pytest

from memdec_core.errors import ArtifactError, ConfigError
from memdec_decoder import targets as targets_module
from memdec_decoder.targets import TargetSet, TargetSettings, build_targets, exclude_self
from memdec_knn.api import Datastore
from memdec_knn.index import FaissRetriever


def test_self_exclusion_is_by_id_even_when_results_are_unsorted():
    distances = np.array([[0.5, 0.0, 0.2, 0.9], [0.0, 0.0, 0.3, 0.1]])
    ids = np.array([[7, 3, 9, 4], [5, 8, 2, -1]])  # row 0: self (3) not first; row 1: a tie at 0
    kept_distances, kept_ids = exclude_self(distances, ids, np.array([3, 8]), k=3)
    assert kept_ids.tolist() == [[9, 7, 4], [5, 2, -1]]
    assert kept_distances.tolist() == [[0.2, 0.5, 0.9], [0.0, 0.3, 0.0]]


def make_store(tmp_path, stream: np.ndarray, dim: int = 8, seed: int = 0) -> Datastore:
    """A datastore whose key at p depends on the last two tokens: repeated contexts are neighbours."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(int(stream.max()) + 1, dim)).astype(np.float32)
    keys = table[stream[:-1]] + 0.5 * table[np.roll(stream, 1)[:-1]] + rng.normal(0, 0.01, (len(stream) - 1, dim))
    retriever = FaissRetriever(factory="Flat")
    retriever.build(keys.astype(np.float16), tmp_path)
    manifest = {"data_hash": "h", "tokenizer_fingerprint": "t", "size": len(keys), "model_fingerprint": "m"}
    return Datastore(tmp_path, keys.astype(np.float16), stream[1:].astype(np.int32), manifest, retriever)


def brute_force_target(store: Datastore, position: int, k: int, temperature: float) -> dict:
    keys = np.asarray(store.keys, dtype=np.float32).astype(np.float64)
    distances = ((keys - keys[position]) ** 2).sum(axis=1)
    distances[position] = np.inf
    nearest = np.argsort(distances, kind="stable")[:k]
    weights = np.exp(-(distances[nearest] - distances[nearest].min()) / temperature)
    weights /= weights.sum()
    result: dict[int, float] = {}
    for index, weight in zip(nearest, weights):
        result[int(store.vals[index])] = result.get(int(store.vals[index]), 0.0) + weight
    return result


@pytest.fixture
def periodic_store(tmp_path):
    rng = np.random.default_rng(1)
    stream = np.tile(rng.integers(0, 40, size=25), 12)  # period 25: every context recurs
    return make_store(tmp_path, stream)


def test_targets_equal_brute_force_sum_to_one_and_align_with_the_gold_token(periodic_store, tmp_path):
    settings = TargetSettings(k=6, temperature=0.5, shard_size=70, search_batch=16)
    built = build_targets(periodic_store, tmp_path / "targets", settings)
    assert len(built) == len(periodic_store)
    for position in range(len(periodic_store)):
        ids, probs = built.row(position)
        assert abs(float(probs.astype(np.float64).sum()) - 1) < 2e-3
        expected = brute_force_target(periodic_store, position, 6, 0.5)
        got = dict(zip(ids.tolist(), probs.astype(np.float64).tolist()))
        assert got.keys() == expected.keys()
        assert all(abs(got[t] - expected[t]) < 2e-3 for t in got)
        # the same context recurs every 25 tokens, so the mass sits on the gold next token
        assert ids[np.argmax(probs)] == periodic_store.vals[position]
    reopened = TargetSet(tmp_path / "targets")
    assert reopened.manifest["k"] == 6 and reopened.manifest["shards"] == 5


def test_an_interrupted_build_resumes_and_changed_settings_are_refused(periodic_store, tmp_path, monkeypatch):
    settings = TargetSettings(k=4, temperature=1.0, shard_size=50, search_batch=20)
    reference = build_targets(periodic_store, tmp_path / "reference", settings)
    real, written = targets_module._write_shard, []

    def fails_on_third_shard(store, target, start, end, shard_settings):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(target.name)
        real(store, target, start, end, shard_settings)

    monkeypatch.setattr(targets_module, "_write_shard", fails_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        build_targets(periodic_store, tmp_path / "resumed", settings)
    assert not (tmp_path / "resumed").exists()
    with pytest.raises(ArtifactError, match="other settings .*temperature"):
        build_targets(periodic_store, tmp_path / "resumed", TargetSettings(k=4, temperature=2.0, shard_size=50,
                                                                         search_batch=20))
    monkeypatch.setattr(targets_module, "_write_shard", real)
    resumed_shards = []
    monkeypatch.setattr(targets_module, "_write_shard",
                        lambda *args: (resumed_shards.append(args[1].name), real(*args)))
    resumed = build_targets(periodic_store, tmp_path / "resumed", settings)
    assert resumed_shards == ["shard-00002", "shard-00003", "shard-00004", "shard-00005"]
    for position in range(len(periodic_store)):
        assert [a.tolist() for a in resumed.row(position)] == [a.tolist() for a in reference.row(position)]


def test_bad_target_settings(periodic_store, tmp_path):
    with pytest.raises(ConfigError, match="k must be at least 1"):
        TargetSettings(k=0)
    with pytest.raises(ConfigError, match="temperature must be positive"):
        TargetSettings(temperature=0)
    (tmp_path / "exists").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        build_targets(periodic_store, tmp_path / "exists")


def test_entries_that_round_to_zero_in_fp16_are_not_stored(periodic_store, tmp_path):
    built = build_targets(periodic_store, tmp_path / "sharp", TargetSettings(k=12, temperature=0.02))
    dropped = 0
    for position in range(len(periodic_store)):
        ids, probs = built.row(position)
        expected = brute_force_target(periodic_store, position, 12, 0.02)
        assert (probs > 0).all() and abs(float(probs.astype(np.float64).sum()) - 1) < 2e-3
        assert set(ids.tolist()) == {token for token, p in expected.items() if np.float16(p) > 0}
        dropped += len(expected) - len(ids)
    assert dropped > 0  # the sharp temperature made some neighbours negligible
