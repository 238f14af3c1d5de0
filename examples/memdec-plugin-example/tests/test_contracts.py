"""This plugin's components pass memdec's contracts, and work through memdec's built-in methods."""

import math

from memdec_core import api
from memdec_core.interfaces import EvalSettings
from memdec_core.testing import CombinerContract, MemoryModelContract, RetrieverContract


class TestNumpyExact(RetrieverContract):
    component = "numpy-exact"


class TestUnigram(MemoryModelContract):
    component = "unigram"


class TestProduct(CombinerContract):
    component = "product"


def test_knn_lm_searches_with_this_retriever(memdec_corpus_dir, memdec_tiny_llama):
    def knn_lm(retriever):
        return api.evaluate(str(memdec_corpus_dir), [str(memdec_tiny_llama)], ["knn-lm"],
                            settings=EvalSettings(context=64),
                            method_settings={"knn-lm": {"k": 16, "retriever": retriever},
                                             "faiss": {"factory": "Flat"}} if retriever == "faiss" else
                            {"knn-lm": {"k": 16, "retriever": retriever}})["results"][0]

    exact, faiss = knn_lm("numpy-exact"), knn_lm("faiss")
    assert exact["knobs"] == faiss["knobs"]
    assert math.isclose(exact["test_ppl"], faiss["test_ppl"], rel_tol=1e-4)


def test_the_unigram_memory_is_mixed_by_name(memdec_corpus_dir, memdec_tiny_llama):
    base, mixed = api.evaluate(str(memdec_corpus_dir), [str(memdec_tiny_llama)], ["base", "mixture"],
                               settings=EvalSettings(context=64), combiner="product",
                               method_settings={"mixture": {"memory": "unigram"}})["results"]
    assert mixed["test_ppl"] < base["test_ppl"] and "alpha" in mixed["knobs"]
    assert mixed["costs"]["params_added"] > 0
