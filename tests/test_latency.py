"""Latency: the statistics of alternating repeats (on a fake clock), and every method's generator:
exactly n greedy tokens as the method generates at inference, with its KV caches."""

import copy
import time
import warnings

import numpy as np
import pytest
import torch

from memdec_combiners.linear import Linear
from memdec_core.engine.generation import mixture_generator, model_generator
from memdec_core.engine.latency import Timing, generation_latency, ratio_statistics, scoring_latency, time_pairs
from memdec_core.errors import ConfigError, ResultError
from memdec_rag.index import PassageIndex
from memdec_rag.method import Rag
from memdec_rag.retrievers import Bm25Retriever

NEW = 10  # not a multiple of rag's retrieval stride: the last block is shorter


# ----------------------------------------------------------------------------------------------
# Statistics and timing, on a fake clock


class FakeClock:
    """A clock that moves only when a fake call says it took time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def taking(self, *durations: float):
        """A call that takes each of ``durations`` in turn (cycling); called as a generator
        ``(prompt, n)`` it returns ``[1, n]`` ids, as a scorer ``(stream, windows, description)`` None."""
        calls = iter(range(10**9))

        def call(*args):
            self.now += durations[next(calls) % len(durations)]
            return torch.zeros((1, args[1]), dtype=torch.long) if len(args) == 2 else None

        return call


def test_ratio_statistics_are_the_median_and_half_the_relative_iqr():
    ratio, spread = ratio_statistics([1.0] * 5, [1.0, 2.0, 3.0, 4.0, 5.0])
    assert ratio == 3.0 and spread == pytest.approx((4.0 - 2.0) / 2 / 3.0)
    ratio, spread = ratio_statistics([2.0, 4.0, 1.0], [5.0, 10.0, 2.5])  # the ratio of each pair, not of sums
    assert ratio == 2.5 and spread == 0.0
    with pytest.raises(ConfigError):
        ratio_statistics([1.0], [2.0])


def test_scoring_latency_on_a_fake_clock_is_the_true_ratio():
    clock = FakeClock()
    ratio, spread = scoring_latency(clock.taking(0.01), clock.taking(0.03), "stream", "windows", clock=clock)
    assert ratio == pytest.approx(3.0) and spread == pytest.approx(0.0, abs=1e-9)


def test_noisy_times_give_the_median_ratio_and_a_finite_spread():
    clock = FakeClock()
    ratio, spread = scoring_latency(clock.taking(0.10, 0.11, 0.09), clock.taking(0.20, 0.24, 0.2), None, None,
                                    clock=clock, timing=Timing(sample_seconds=0))
    assert 1.8 < ratio < 2.7 and 0 < spread < 0.2


def test_timing_runs_min_pairs_and_min_seconds_per_side_within_the_caps():
    clock = FakeClock()  # durations that are exact binary fractions, so that sums are exact
    base, method = time_pairs(clock.taking(0.125), clock.taking(0.25), Timing(min_pairs=5, min_seconds=2.0,
                                                                              sample_seconds=0), clock)
    assert len(base) == len(method) == 16  # the base side needs 16 × 0.125 s
    base, method = time_pairs(clock.taking(1.0), clock.taking(1.0), Timing(min_pairs=5, min_seconds=0.5), clock)
    assert len(base) == 5  # the minimum number of pairs, however long each is
    base, method = time_pairs(clock.taking(0.125), clock.taking(0.25), Timing(max_pairs=8, sample_seconds=0), clock)
    assert len(base) == 8
    base, method = time_pairs(clock.taking(0.125), clock.taking(0.25), Timing(max_seconds=3.0, sample_seconds=0),
                              clock)
    assert len(base) == 8  # 8 × 0.375 s reaches the cap on both sides together


def test_a_very_slow_method_stops_once_its_own_side_is_timed_enough():
    clock = FakeClock()
    base, method = time_pairs(clock.taking(0.0625), clock.taking(0.5), Timing(min_pairs=5, min_seconds=2.0,
                                                                              sample_seconds=0), clock)
    assert len(base) == 4  # the method has run 2 s, before min_pairs; its base side only 0.25 s
    clock = FakeClock()
    base, method = time_pairs(clock.taking(0.3), clock.taking(10.0), Timing(min_pairs=5, min_seconds=0.5), clock)
    assert len(base) == 2  # a method 30× slower (RAG re-reading its window): two pairs, not five


def test_short_calls_are_repeated_within_a_sample():
    clock = FakeClock()
    counted = {"base": 0}

    def base(*args):
        counted["base"] += 1
        clock.now += 0.001

    time_pairs(base, clock.taking(0.05), Timing(min_pairs=2, min_seconds=0, sample_seconds=0.01), clock)
    assert counted["base"] == 1 + 2 * 10  # one warm-up call, then 10 calls per sample


def test_generation_latency_reports_milliseconds_per_token_and_checks_the_shape():
    clock = FakeClock()
    ratio, spread, base_ms, method_ms = generation_latency(clock.taking(0.032), clock.taking(0.064),
                                                           torch.zeros((1, 3), dtype=torch.long), 32, clock=clock)
    assert ratio == pytest.approx(2.0) and spread == pytest.approx(0.0, abs=1e-9)
    assert base_ms == pytest.approx(1.0) and method_ms == pytest.approx(2.0)
    with pytest.raises(ResultError, match=r"shape \(1, 31\)"):
        generation_latency(clock.taking(0.01), lambda prompt, n: torch.zeros((1, n - 1)), torch.zeros((1, 3)), 32,
                           clock=clock)


def test_real_sleeps_give_about_the_true_ratio():
    """The real clock (the default), with tiny sleeps: a loaded machine oversleeps both by the same
    scheduling delay, which pulls the ratio towards 1 but never below it; the arithmetic itself
    is checked on a fake clock above."""
    ratio, spread = scoring_latency(lambda *args: time.sleep(0.002), lambda *args: time.sleep(0.006), None, None,
                                    timing=Timing(min_pairs=3, max_pairs=5, min_seconds=0, sample_seconds=0))
    assert 1 < ratio < 6 and np.isfinite(spread)


# ----------------------------------------------------------------------------------------------
# Generators


@pytest.fixture(scope="module")
def ctx(memdec_context_factory):
    return memdec_context_factory()


@pytest.fixture(scope="module")
def prompt(ctx):
    return torch.from_numpy(ctx.corpus.streams["test"][:8].astype(np.int64))[None]


def greedy_reference(model, input_ids: torch.Tensor, n: int, eos: int) -> torch.Tensor:
    """Greedy without any cache: the argmax of a full forward pass per token, EOS never chosen."""
    sequence = input_ids
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=sequence).logits[:, -1].float()
            logits[:, eos] = float("-inf")
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    return sequence[:, input_ids.shape[1]:]


def test_the_base_generator_is_greedy_generation(ctx, prompt):
    result = ctx.create("methods", "base").evaluate(ctx)
    got = result.generator(prompt, NEW)
    assert got.shape == (1, NEW) and got.dtype == torch.long
    assert torch.equal(got, greedy_reference(ctx.base.model, prompt, NEW, ctx.base.tokenizer.eos_token_id))
    plain = ctx.base.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                    max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)
    assert torch.equal(got, plain[:, prompt.shape[1]:])


def test_generators_print_no_warnings(ctx, prompt, passages, knn_memory, capfd):
    import logging

    generators = [model_generator(ctx.base.model, ctx.base.tokenizer.eos_token_id),
                  mixture_generator(ctx.base, knn_memory, {"temperature": 3.0}, Linear(lam=0.5)),
                  Rag(passage_tokens=10).generator(ctx, passages)]
    if hasattr(logging.Logger, "warning_once"):  # transformers' warnings printed once per process: again
        logging.Logger.warning_once.cache_clear()
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for generate in generators:
            generate(prompt, 6)
    assert [str(warning.message) for warning in caught] == [] and capfd.readouterr().err == ""


def test_a_generator_returns_exactly_n_tokens_even_where_eos_is_likely(ctx, prompt):
    """A model that prefers EOS above all must still give n tokens (EOS is masked, not a stop)."""
    model = copy.deepcopy(ctx.base.model)
    with torch.no_grad():
        model.get_output_embeddings().bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.get_output_embeddings().bias[ctx.base.tokenizer.eos_token_id] = 1e4
    got = model_generator(model, ctx.base.tokenizer)(prompt, NEW)
    assert got.shape == (1, NEW) and ctx.base.tokenizer.eos_token_id not in got


@pytest.fixture(scope="module")
def knn_memory(ctx):
    from memdec_knn.memory import KnnDatastore

    memory = KnnDatastore(k=8, temperatures=(3.0,))
    memory.prepare(ctx)
    return memory


def test_the_mixture_generator_with_lambda_zero_is_the_base(ctx, prompt, knn_memory):
    base = model_generator(ctx.base.model, ctx.base.tokenizer)(prompt, NEW)
    got = mixture_generator(ctx.base, knn_memory, {"temperature": 3.0}, Linear(lam=0.0))(prompt, NEW)
    assert got.shape == (1, NEW) and torch.equal(got, base)


def test_the_mixture_generator_with_lambda_one_follows_the_memory(ctx, prompt, knn_memory):
    """λ = 1: greedy under the kNN memory alone, queried with the base's hidden state at each new token."""
    from memdec_core.engine.scoring import iter_scored_batches
    from memdec_core.inputs.data import make_windows

    generate = mixture_generator(ctx.base, knn_memory, {"temperature": 3.0}, Linear(lam=1.0))
    got = generate(prompt, NEW)
    assert torch.equal(generate(prompt, NEW), got)  # a fresh stepper per call: nothing carries over
    sequence = torch.cat([prompt, got], dim=1)[0].numpy()
    batch = next(iter_scored_batches(ctx.base.model, sequence, make_windows(len(sequence), 64, 32), batch_size=1,
                                     capture_hidden=True))
    rows = knn_memory.logprobs(knn_memory.score(batch), batch, {"temperature": 3.0})[prompt.shape[1] - 1:]
    rows[:, ctx.base.tokenizer.eos_token_id] = float("-inf")
    assert got[0].tolist() == rows.argmax(-1).tolist()


class FakePassages:
    """``best_ids`` replaces ``PassageIndex.best_ids``: passage ``choose(query number)``; records the queries."""

    def __init__(self, choose):
        self.choose, self.queries = choose, []

    def best_ids(self, tokenizer, queries):
        self.queries.extend(np.asarray(query).tolist() for query in queries)
        return [self.choose(len(self.queries) - 1) for _ in queries]


@pytest.fixture(scope="module")
def passages(ctx):
    return PassageIndex.for_corpus(ctx, 10, Bm25Retriever())


class CountedTokens:
    """Counts the tokens the model runs (its forward passes' input lengths) inside ``with``."""

    def __init__(self, model):
        self.model, self.total = model, 0

    def __enter__(self):
        def count(module, args, kwargs):
            self.total += (kwargs.get("input_ids") if "input_ids" in kwargs else args[0]).shape[1]

        self.handle = self.model.register_forward_pre_hook(count, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_rag_with_one_passage_is_greedy_generation_after_it(ctx, prompt, passages, monkeypatch):
    fake = FakePassages(lambda call: 3)
    monkeypatch.setattr(PassageIndex, "best_ids", fake.best_ids)
    with CountedTokens(ctx.base.model) as counted:
        got = Rag(passage_tokens=10).generator(ctx, passages)(prompt, NEW)
    assert counted.total == 10 + prompt.shape[1] + NEW - 1  # the cache continued: every token is run once
    with_passage = torch.cat([torch.from_numpy(passages.passage(3).astype(np.int64))[None], prompt], dim=1)
    expected = model_generator(ctx.base.model, ctx.base.tokenizer)(with_passage, NEW)
    assert got.shape == (1, NEW) and torch.equal(got, expected)
    text = torch.cat([prompt, got], dim=1)[0].tolist()
    assert fake.queries == [text[:8][-32:], text[:12][-32:], text[:16][-32:]]  # one query every 4 tokens


def rebuilt_reference(ctx, passages, prompt, new_tokens, choose, stride=4):
    """Every block generated from scratch: passage + as much of the text as fits, then ``stride`` tokens."""
    generate = model_generator(ctx.base.model, ctx.base.tokenizer)
    text, block = prompt[0], 0
    while len(text) - prompt.shape[1] < new_tokens:
        steps = min(stride, new_tokens - (len(text) - prompt.shape[1]))
        passage = torch.from_numpy(passages.passage(choose(block)).astype(np.int64))
        room = ctx.context - len(passage) - steps + 1
        text = torch.cat([text, generate(torch.cat([passage, text[-room:]])[None], steps)[0]])
        block += 1
    return text[prompt.shape[1]:][None]


def test_rag_rebuilds_its_prefix_when_the_passage_changes(ctx, prompt, passages, monkeypatch):
    choose = lambda call: call % 2  # noqa: E731 (a new passage at every retrieval)
    monkeypatch.setattr(PassageIndex, "best_ids", FakePassages(choose).best_ids)
    with CountedTokens(ctx.base.model) as counted:
        got = Rag(passage_tokens=10).generator(ctx, passages)(prompt, NEW)
    assert torch.equal(got, rebuilt_reference(ctx, passages, prompt, NEW, choose))
    prefixes = sum(10 + prompt.shape[1] + done for done in (0, 4, 8))  # passage and the text so far, 3 times
    assert counted.total == prefixes + (3 + 3 + 1)  # and the new tokens of each block but its last


def test_rag_truncates_the_text_to_fit_the_window(ctx, passages, monkeypatch):
    """A prompt that fills the window: the same passage each time, but every block needs a new prefix."""
    long_prompt = torch.from_numpy(ctx.corpus.streams["test"][:ctx.context].astype(np.int64))[None]
    monkeypatch.setattr(PassageIndex, "best_ids", FakePassages(lambda call: 5).best_ids)
    got = Rag(passage_tokens=10).generator(ctx, passages)(long_prompt, NEW)
    assert torch.equal(got, rebuilt_reference(ctx, passages, long_prompt, NEW, lambda block: 5))


def test_rag_s_result_generates_with_its_index(ctx, prompt):
    result = Rag(passage_tokens=10).evaluate(ctx)
    assert result.generator(prompt, NEW).shape == (1, NEW)


def test_lora_generates_through_the_peft_model_it_scores_with(ctx, prompt):
    from peft import PeftModel

    result = ctx.create("methods", "lora", rank=2, epochs=1, lrs=(3e-3,)).evaluate(ctx)
    got = result.generator(prompt, NEW)
    adapted = PeftModel.from_pretrained(copy.deepcopy(ctx.base.model), result.details["artifact"]).eval()
    assert got.shape == (1, NEW)
    assert torch.equal(got, greedy_reference(adapted, prompt, NEW, ctx.base.tokenizer.eos_token_id))


def test_a_scorer_that_has_just_run_is_timed_without_a_warm_up_call():
    """Scoring follows the method's own test scoring: a warm-up call would only add (for RAG, most of) the cost."""
    clock = FakeClock()
    calls = {"base": 0, "method": 0}

    def counting(side, seconds):
        def call(*args):
            calls[side] += 1
            clock.now += seconds
        return call

    scoring_latency(counting("base", 0.1), counting("method", 0.3), None, None,
                    timing=Timing(min_pairs=3, min_seconds=0.2), clock=clock)
    assert calls == {"base": 3, "method": 3}


def test_under_several_ranks_rank_0_decides_how_long_every_rank_times(monkeypatch):
    """A scorer's passes are collective: a rank that stopped timing on its own clock would leave
    the others waiting in a pass. Every decision comes from rank 0 (``from_main``)."""
    from memdec_core.runtime import distributed

    decisions = []

    def rank_0_says(value):  # rank 0: 1 call a sample, 3 pairs
        decisions.append(value)
        return sum(isinstance(seen, bool) for seen in decisions) >= 3 if isinstance(value, bool) else 1

    monkeypatch.setattr(distributed, "from_main", rank_0_says)
    clock = FakeClock()
    base, method = time_pairs(clock.taking(10.0), clock.taking(10.0), Timing(min_pairs=2, min_seconds=0.5,
                                                                            max_seconds=1.0), clock)
    assert decisions == [1, 1, False, True, True]  # this rank alone would have stopped after 2 pairs
    assert len(base) == len(method) == 3  # rank 0 said 3
