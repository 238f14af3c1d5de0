"""In-context RAG: every position scored once, aligned with a brute-force reference; BM25 finds passages."""

import numpy as np
import pytest
import torch

from memdec_core.api import prepare_context
from memdec_core.errors import ConfigError
from memdec_core.evaluate import EvalSettings
from memdec_rag.index import PassageIndex
from memdec_rag.method import Rag


@pytest.fixture(scope="module")
def ctx(corpus_dir, tiny_gpt2):
    return prepare_context(str(corpus_dir), str(tiny_gpt2), EvalSettings(context=48, stride=24))


def reference_logprobs(ctx, stream, passage_for, stride, context):
    """Token by token: log p(stream[p + 1] | passage + the text up to p), with the block's window."""
    model, values = ctx.base.model, []
    for start in range(0, len(stream) - 1, stride):
        end = min(start + stride, len(stream) - 1)
        passage = passage_for(start)
        window = np.concatenate([passage, stream[max(0, end - (context - len(passage))):end]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.from_numpy(window.astype(np.int64))[None]).logits[0], -1)
        for position in range(start, end):
            column = len(window) - (end - position)
            values.append(float(logprobs[column, stream[position + 1]]))
    return np.array(values)


@pytest.mark.parametrize("with_passage", [False, True])
def test_rag_scores_every_position_once_as_the_reference_does(ctx, monkeypatch, with_passage):
    stream = ctx.corpus.streams["test"][:150]
    fixed = ctx.corpus.streams["train"][:10] if with_passage else np.zeros(0, dtype=stream.dtype)
    monkeypatch.setattr(PassageIndex, "best", lambda self, tokenizer, queries: [fixed for _ in queries])
    rag = Rag(retrieval_stride=4, passage_tokens=10, batch_size=5)
    index = PassageIndex.for_corpus(ctx, 10)
    got = torch.cat([rag._score_blocks(ctx, index, stream, list(range(first, min(first + 5 * 4, 149), 4)))
                     for first in range(0, 149, 20)]).numpy()
    expected = reference_logprobs(ctx, stream, lambda start: fixed, 4, ctx.context)
    assert len(got) == len(stream) - 1
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_bm25_finds_the_passage_a_query_quotes(ctx):
    tokenizer = ctx.base.tokenizer
    texts = ["the bank raised rates again", "quarterly earnings beat revenue", "tax credit loans slowed growth"]
    passages = [np.array(tokenizer(text)["input_ids"]) for text in texts]
    index = PassageIndex(passages, texts)
    queries = [np.array(tokenizer(query)["input_ids"]) for query in ("earnings beat", "credit loans", "the of")]
    found = index.best(tokenizer, queries)
    assert np.array_equal(found[0], passages[1]) and np.array_equal(found[1], passages[2])
    assert len(found[2]) == 0  # only stopwords: nothing is retrieved, nothing prepended


def test_rag_evaluates_and_refuses_passages_longer_than_the_window(ctx):
    result = Rag(passage_tokens=16).evaluate(ctx)
    assert result.test_ppl > 1 and result.details["test_tokens"] == len(ctx.corpus.streams["test"]) - 1
    with pytest.raises(ConfigError, match="lower rag.passage_tokens"):
        Rag(passage_tokens=46).evaluate(ctx)
