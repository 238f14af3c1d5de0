"""Continuations scored as each method scores text: batched equals one by one, every method's
``MethodResult.loglikelihood`` agrees with its own scorer, a mixture's knobs can be overridden."""

import dataclasses
import random

import numpy as np
import pytest
import torch
from conftest import SMALL_WINDOWS

from memdec_core.api import prepare_context
from memdec_core.components.plan import Plan
from memdec_core.engine.loglikelihood import base_loglikelihood, model_loglikelihood
from memdec_core.errors import ConfigError
from memdec_core.inputs.data import make_windows
from memdec_core.inputs.models import load_model
from memdec_core.interfaces import EvalSettings


def reference(model, requests, start_id, max_length):
    """Token by token, each prediction from its own forward pass over the tokens before it, after
    the whole sequence was cut on the left to ``max_length`` inputs (lm-evaluation-harness's rule)."""
    values = []
    for context, continuation in requests:
        inputs = ((list(context) or [start_id]) + list(continuation))[-(max_length + 1):-1]
        first = len(inputs) - len(continuation)
        total = 0.0
        for i, token in enumerate(continuation):
            with torch.no_grad():
                logits = model(torch.tensor([inputs[:first + i + 1]])).logits[0, -1]
            total += float(torch.log_softmax(logits.double(), -1)[token])
        values.append(total)
    return values


def mixed_requests(vocab_size, seed=0, count=11):
    rng = random.Random(seed)
    requests = [([], [rng.randrange(vocab_size) for _ in range(3)]),  # empty context: starts from BOS
                ([rng.randrange(vocab_size) for _ in range(70)], [rng.randrange(vocab_size) for _ in range(5)])]
    for _ in range(count - len(requests)):
        requests.append(([rng.randrange(vocab_size) for _ in range(rng.randint(1, 30))],
                         [rng.randrange(vocab_size) for _ in range(rng.randint(1, 8))]))
    # Requests that share a forward pass: one-token words after one prompt, and a two-token word
    # whose first token extends the prompt (its input is the prompt and that token).
    prompt = [rng.randrange(vocab_size) for _ in range(12)]
    requests += [(prompt, [token]) for token in (3, 4, 5)] + [(prompt[:-1], prompt[-1:] + [6]), (prompt, [3])]
    return requests


@pytest.mark.parametrize("family", ["tiny_gpt2", "tiny_llama"])
def test_batched_scoring_equals_scoring_each_request_alone(family, request):
    base = load_model(str(request.getfixturevalue(family)))
    requests = mixed_requests(base.vocab_size)
    # 40 positions: the 70-token context is cut on the left, its continuation kept whole
    score = model_loglikelihood(base.model, batch_size=3, pad_id=0, start_id=0, max_length=40)
    np.testing.assert_allclose(score(requests), reference(base.model, requests, 0, 40), rtol=1e-4, atol=1e-4)


def test_continuations_are_checked_and_an_empty_one_scores_zero(tiny_gpt2):
    base = load_model(str(tiny_gpt2))
    score = base_loglikelihood(base, batch_size=2)
    assert score([([5, 6], []), ([5], [7])])[0] == 0.0
    with pytest.raises(ConfigError, match="a continuation of 300 tokens does not fit the model's 256 positions"):
        score([([1], [2] * 300)])


def stream_check(result, ctx, length=40):
    """A method's loglikelihood of a short stream equals its scorer's NLL over that stream."""
    stream = ctx.corpus.streams["test"][:length]
    nll = result.score(stream, make_windows(len(stream), ctx.context, ctx.stride), "check")
    got = result.loglikelihood([(stream[:1].tolist(), stream[1:].tolist())])[0]
    assert got == pytest.approx(-nll.total, rel=1e-4)
    return got


@pytest.fixture(scope="module")
def ctx(corpus_dir, tiny_llama):
    return prepare_context(str(corpus_dir), str(tiny_llama), EvalSettings(**SMALL_WINDOWS))


def evaluate(ctx, method, settings):
    plan = Plan(settings)
    return plan.create("methods", method).evaluate(dataclasses.replace(ctx, plan=plan))


def test_the_base_and_lora_score_continuations_as_their_scorers_do(ctx):
    base = evaluate(ctx, "base", {})
    lora = evaluate(ctx, "lora", {"lora": {"rank": 2, "epochs": 1, "lrs": (3e-3,)}})
    assert stream_check(lora, ctx) != pytest.approx(stream_check(base, ctx), rel=1e-4)


@pytest.mark.parametrize("method", ["memdec", "knn-lm"])
def test_a_mixture_scores_continuations_as_its_scorer_does_and_takes_other_knobs(ctx, trained_memory, method):
    settings = {"memdec": {"path": str(trained_memory)}, "knn-lm": {"k": 8, "temperatures": (1.0, 3.0)}}[method]
    mixture = evaluate(ctx, method, {method: settings})
    stream_check(mixture, ctx)
    requests = [([3, 4, 5], [6, 7]), ([], [8])]
    base = evaluate(ctx, "base", {}).loglikelihood(requests)
    np.testing.assert_allclose(mixture.loglikelihood(requests, knobs={"lam": 0.0}), base, rtol=1e-5)
    if method == "knn-lm":  # a memory knob builds another composite
        text = ctx.corpus.streams["test"][:30].tolist()
        domain = [(text[:20], text[20:])]  # domain text: tokens the datastore names
        other = mixture.loglikelihood(domain, knobs={"temperature": 100.0, "lam": 0.5})
        assert other != pytest.approx(mixture.loglikelihood(domain, knobs={"lam": 0.5}))
    with pytest.raises(ConfigError, match="λ"):
        mixture.loglikelihood(requests, knobs={"lam": 1.5})
    with pytest.raises(ConfigError, match="unknown knob.*lamda"):
        mixture.loglikelihood(requests, knobs={"lamda": 0.5})


def test_rag_prepends_the_passage_it_retrieves_for_the_context(ctx, monkeypatch):
    from memdec_rag.index import PassageIndex

    rag = evaluate(ctx, "rag", {"rag": {"passage_tokens": 16, "query_tokens": 4}})
    index = PassageIndex.for_corpus(ctx, 16, ctx.create("retrievers", "bm25"))
    queries = []

    def best_ids(self, tokenizer, batch):
        queries.extend(query.tolist() for query in batch)
        return [0, -1]

    monkeypatch.setattr(PassageIndex, "best_ids", best_ids)
    long_context = list(range(10, 260))  # with the passage, longer than the model's 256 positions
    got = rag.loglikelihood([(long_context, [5, 6]), ([3, 4, 5], [6])])
    assert queries == [long_context[-4:], [3, 4, 5]]
    passage = index.passage(0).tolist()
    kept = long_context[-(257 - len(passage) - 2):]  # the context's newest tokens, the passage whole
    expected = base_loglikelihood(ctx.base, 4)([(passage + kept, [5, 6]), ([3, 4, 5], [6])])
    np.testing.assert_allclose(got, expected, rtol=1e-5)
