"""The faiss-gpu retriever's own logic: refused in one line without a GPU build of faiss; which GPU
it places the index on, with which cloner options, what it writes and reloads; and every faiss
result comes back nearest first, as self-exclusion and the mixtures assume.

faiss's GPU API is played by CPU indexes here (conftest's ``fake_gpu_faiss``): these tests check
memdec's placement and file handling, not what faiss computes on a GPU — that needs a GPU build of
faiss on a GPU, which this suite does not have."""

import numpy as np
import pytest

from memdec_core.errors import ConfigError
from memdec_knn.gpu_index import FaissGpuRetriever
from memdec_knn.index import FaissRetriever, sorted_by_distance


@pytest.fixture
def keys():
    return np.random.default_rng(0).normal(size=(2_000, 32)).astype(np.float16)


def test_without_a_gpu_build_of_faiss_it_says_what_to_install():
    import faiss

    if hasattr(faiss, "StandardGpuResources"):
        pytest.skip("this faiss has GPU support")
    with pytest.raises(ConfigError, match="no GPU support; pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12"):
        FaissGpuRetriever()


def test_the_index_is_moved_to_gpu_0_with_fp16_tables_written_as_the_cpu_file_and_reloaded(fake_gpu_faiss, keys,
                                                                                          tmp_path):
    """Placement and files: the index is trained and filled after one move to GPU 0 with fp16
    lookup tables, the file written is the CPU retriever's, and a reload searches through the same
    wrapper. (The "GPU" is a CPU clone: equal results only show the wrapper changes nothing.)"""
    settings = dict(factory="IVF16,PQ8", nprobe=4, train_size=1_000)
    cpu, gpu = FaissRetriever(**settings), FaissGpuRetriever(**settings)
    (tmp_path / "cpu").mkdir(), (tmp_path / "gpu").mkdir()
    cpu.build(keys, tmp_path / "cpu")
    gpu.build(keys, tmp_path / "gpu")
    assert fake_gpu_faiss == [(0, True)]  # trained and filled on GPU 0, with fp16 lookup tables for PQ
    assert (tmp_path / "gpu" / "index.faiss").read_bytes() == (tmp_path / "cpu" / "index.faiss").read_bytes()
    reloaded = FaissGpuRetriever(**settings)
    reloaded.load(keys, tmp_path / "gpu")
    queries = np.asarray(keys[:50], dtype=np.float32)
    expected = cpu.search(queries, 10)
    for retriever in (gpu, reloaded):
        for found, wanted in zip(retriever.search(queries, 10), expected):
            np.testing.assert_array_equal(found, wanted)
    np.testing.assert_array_equal(reloaded.search_many(queries, 10)[1], expected[1])


def test_gpu_number_follows_the_device_and_the_rank(fake_gpu_faiss, monkeypatch):
    """Which GPU the retriever asks faiss for (faiss's GPU count is faked to 1)."""
    from memdec_core.runtime import distributed

    monkeypatch.setenv("MEMDEC_DEVICE", "cuda:3")
    with pytest.raises(ConfigError, match="GPU 3 asked for, faiss sees 1"):
        FaissGpuRetriever()
    monkeypatch.setenv("MEMDEC_DEVICE", "cpu")
    with pytest.raises(ConfigError, match="with --device cpu: use retriever faiss"):
        FaissGpuRetriever()
    monkeypatch.delenv("MEMDEC_DEVICE")
    assert FaissGpuRetriever().gpu == 0
    monkeypatch.setattr(distributed, "_WORLD", [distributed.World(rank=1, size=2, local_rank=1)])
    with pytest.raises(ConfigError, match="GPU 1 asked for"):  # rank 1 of a launcher: its own GPU
        FaissGpuRetriever()


def test_the_cpu_retrievers_disk_settings_are_refused_on_a_gpu(fake_gpu_faiss):
    with pytest.raises(ConfigError, match="on_disk is the faiss retriever's"):
        FaissGpuRetriever(on_disk=True)
    with pytest.raises(ConfigError, match="batched_search is the faiss retriever's"):
        FaissGpuRetriever(batched_search=True)


def test_results_out_of_order_are_sorted_nearest_first(fake_gpu_faiss, keys, tmp_path):
    retriever = FaissGpuRetriever(factory="Flat")
    retriever.build(keys, tmp_path)
    queries = np.asarray(keys[:20], dtype=np.float32)
    distances, ids = retriever.search(queries, 8)

    class Disordered:  # what faiss's GPU search returned with the cuVS bug: the right set, shuffled
        def search(self, queries, k):
            order = np.random.default_rng(1).permuted(np.tile(np.arange(k), (len(queries), 1)), axis=1)
            return np.take_along_axis(distances, order, 1), np.take_along_axis(ids, order, 1)

    retriever.index = Disordered()
    found_distances, found_ids = retriever.search(queries, 8)
    np.testing.assert_array_equal(found_distances, distances)
    np.testing.assert_array_equal(found_ids, ids)
    assert (found_ids[:, 0] == np.arange(20)).all()  # each key is its own nearest: self-exclusion relies on it


def test_sorting_leaves_ordered_rows_and_missing_neighbours_alone():
    top = np.float32(np.finfo(np.float32).max)  # faiss's distance for a missing neighbour (id -1)
    distances = np.array([[0.5, 1.0, top], [2.0, 1.0, 3.0]], dtype=np.float32)
    ids = np.array([[4, 7, -1], [1, 2, 3]])
    sorted_distances, sorted_ids = sorted_by_distance(distances, ids)
    np.testing.assert_array_equal(sorted_distances, [[0.5, 1.0, top], [1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(sorted_ids, [[4, 7, -1], [2, 1, 3]])
    assert ids[1, 0] == 1  # the caller's arrays are not changed
    first_row = distances[:1]
    assert sorted_by_distance(first_row, ids[:1])[0] is first_row  # nothing to sort: no copy
