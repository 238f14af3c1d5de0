"""Adaptive retrieval: a combiner's gate lets a kNN-LM skip its search where the base alone will do.

Skipped positions get the base's log-prob exactly (a gate that skips everything is the base, bit
for bit), a gate that skips nothing is the ungated mixture, the skipped positions never reach the
retriever (counted), in scoring and in generation, and the adaptive combiner chooses its threshold
on validation only."""

import dataclasses
import math
import shutil

import pytest
import torch

from memdec_combiners.adaptive import Adaptive, choose_threshold
from memdec_combiners.linear import Linear
from memdec_core.api import prepare_context
from memdec_core.components.combiner_files import resolve_combiner
from memdec_core.engine.composite import MemdecForCausalLM
from memdec_core.engine.learning import fit_combiners
from memdec_core.engine.mixture import evaluate_mixture
from memdec_core.engine.scoring import GateStats, iter_scored_batches, nll_total, score_stream
from memdec_core.interfaces import EvalSettings
from memdec_knn.memory import KnnDatastore

KNOBS = {"temperature": 3.0}
CHECK = 8  # the first batch's rows searched once more to check the combiner's elementwise claim
LAM = 0.3


class Gated(Linear):
    """A linear mixture with a gate: ``skip`` "all", "none", or "sure" (where the base's entropy is below ``cut``)."""

    def __init__(self, skip: str, cut: float = 0.0, **overrides):
        super().__init__(**overrides)
        self.skip, self.cut = skip, cut

    def gate(self, base_features):
        if self.skip == "all":
            return torch.zeros(len(base_features), dtype=torch.bool)
        if self.skip == "none":
            return torch.ones(len(base_features), dtype=torch.bool)
        return base_features[:, 0] > self.cut


@pytest.fixture(scope="module")
def ctx(tiny_gpt2, corpus_dir):
    return prepare_context(str(corpus_dir), str(tiny_gpt2), EvalSettings(context=64, stride=32, batch_size=4))


@pytest.fixture(scope="module")
def memory(ctx):
    memory = KnnDatastore(k=8, temperatures=(KNOBS["temperature"],))
    memory.prepare(ctx)
    return memory


@pytest.fixture(scope="module")
def cut(ctx):
    """The median entropy of the base on the test split: half the positions on each side."""
    batch = next(iter_scored_batches(ctx.base.model, ctx.corpus.streams["test"], ctx.windows("test"), batch_size=4))
    return float((-(batch.logprobs().exp() * batch.logprobs()).sum(-1)).median())


@pytest.fixture
def queries(memory, monkeypatch):
    """The number of queries the retriever receives, counted."""
    retriever = memory.store.retriever
    search, counted = retriever.search, [0]

    def counting(vectors, k):
        counted[0] += len(vectors)
        return search(vectors, k)

    monkeypatch.setattr(retriever, "search", counting)
    return counted


def score(ctx, memory, combiner, gate=None):
    stream, windows = ctx.corpus.streams["test"], ctx.windows("test")
    return score_stream(ctx, memory, stream, windows, [(KNOBS, Linear.Config(lam=LAM))], "test", "test",
                        combiners=[combiner], gate=gate)[0]


def test_a_gate_that_skips_every_search_gives_the_base_bit_for_bit(ctx, memory, queries):
    gate = GateStats()
    gated = score(ctx, memory, Gated("all", lam=LAM), gate)
    base = nll_total(ctx.base.model, ctx.corpus.streams["test"], ctx.windows("test"), batch_size=4)
    assert (gated.total, gated.count) == (base.total, base.count)
    assert queries[0] == 0
    assert gate.facts()["skipped_share"] == 1.0
    ungated = score(ctx, memory, Linear(lam=LAM))
    assert abs(ungated.total - base.total) > 1e-3 * abs(base.total)  # the memory moves the number


def test_a_gate_that_skips_none_gives_the_ungated_numbers(ctx, memory, queries):
    gated = score(ctx, memory, Gated("none", lam=LAM))
    searched = queries[0]
    ungated = score(ctx, memory, Linear(lam=LAM))
    assert (gated.total, gated.count) == (ungated.total, ungated.count)
    assert searched == queries[0] - searched == ungated.count + CHECK


def test_skipped_positions_are_not_searched_and_get_the_base_log_prob(ctx, memory, queries, cut):
    gate = GateStats()
    gated = score(ctx, memory, Gated("sure", cut, lam=LAM), gate)
    searched = queries[0]
    # The reference: every position searched, the mixture where the base is unsure, the base elsewhere.
    total, needed = 0.0, 0
    for batch in iter_scored_batches(ctx.base.model, ctx.corpus.streams["test"], ctx.windows("test"),
                                     batch_size=4, capture_hidden=True):
        state = memory.neighbours(batch.hidden)
        base_gold = batch.gold_logprobs().double()
        memory_gold = memory.gold_logprobs(state, batch, KNOBS).double()
        mixed = torch.logaddexp(base_gold + math.log(1 - LAM), memory_gold + math.log(LAM))
        entropy = -(batch.logprobs().exp() * batch.logprobs()).sum(-1)
        keep = entropy > cut
        total -= float(torch.where(keep, mixed, base_gold).sum())
        needed += int(keep.sum())
    assert 0 < needed < gated.count  # some positions on each side
    assert gated.total == pytest.approx(total, rel=1e-6)  # the combiner mixes in fp32
    assert searched == needed + CHECK
    assert gate.facts()["searched"] == needed


def test_generation_searches_only_where_the_gate_needs_the_memory(ctx, memory, queries, cut):
    ids = torch.from_numpy(ctx.corpus.streams["test"][:40].astype("int64"))[None]
    base_logprobs = torch.log_softmax(ctx.base.model(input_ids=ids).logits.float(), dim=-1)
    skipped = MemdecForCausalLM.from_parts(ctx.base, memory, KNOBS, Gated("all", lam=LAM))
    assert torch.equal(skipped(input_ids=ids, use_cache=False).logits, base_logprobs)
    assert queries[0] == 0
    entropy = -(base_logprobs.exp() * base_logprobs).sum(-1)
    keep = entropy > cut
    gated = MemdecForCausalLM.from_parts(ctx.base, memory, KNOBS, Gated("sure", cut, lam=LAM))
    mixed = gated(input_ids=ids, use_cache=False).logits
    assert queries[0] == int(keep.sum()) and 0 < queries[0] < ids.shape[1]
    ungated = MemdecForCausalLM.from_parts(ctx.base, memory, KNOBS, Linear(lam=LAM))(input_ids=ids, use_cache=False)
    assert torch.equal(mixed[~keep], base_logprobs[~keep])
    assert torch.allclose(mixed[keep], ungated.logits[keep], atol=1e-5)
    assert not torch.allclose(mixed[~keep], ungated.logits[~keep], atol=1e-3)


def brute_force_threshold(scores, mixed, base, allowed):
    """The largest cut t (a score, or +inf) whose skipping of every score below t stays within ``allowed``."""
    best = -math.inf
    for cut in sorted(set(scores.tolist())) + [math.inf]:
        skip = scores < cut
        if float((torch.where(skip, base, mixed)).mean() - mixed.mean()) >= -allowed - 1e-12 and cut > best:
            best = cut
    return best


@pytest.mark.parametrize("seed", range(5))
def test_the_threshold_is_the_largest_within_the_allowance(seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 12, (40,), generator=generator).float()  # ties on purpose
    base = -torch.rand(40, generator=generator, dtype=torch.float64) * 5
    mixed = base + torch.randn(40, generator=generator, dtype=torch.float64) * 0.3 + 0.1 * scores.double()
    allowed = 0.02
    threshold, share = choose_threshold(scores, mixed, base, allowed)
    expected = brute_force_threshold(scores, mixed, base, allowed)
    skip = scores < threshold
    assert torch.equal(skip, scores < expected)
    assert share == pytest.approx(float(skip.double().mean()))
    assert float(torch.where(skip, base, mixed).mean() - mixed.mean()) >= -allowed - 1e-12


def test_adaptive_gate_extremes_and_a_threshold_chosen_on_validation_only(ctx, memory, tmp_path, monkeypatch,
                                                                          queries):
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "cache"))
    gated_ctx = dataclasses.replace(ctx, combiner=resolve_combiner(Adaptive(gate=0.05, steps=100)))
    settings = [(KNOBS, gated_ctx.combiner.grid()[0])]
    combiner = fit_combiners(gated_ctx, memory, settings).combiners[0]
    facts = evaluate_mixture(gated_ctx, memory).details["gate"]
    assert 0 < facts["valid_skipped_share"] < 1 and 0 <= facts["test_skipped_share"] <= 1
    assert facts["inputs"] == 2 + ctx.base.model.config.n_embd  # entropy, top log-prob and the kNN query
    assert facts["valid_ppl"] <= facts["valid_ppl_ungated"] * 1.05 + 1e-9
    # The threshold at +inf skips everything: the base's numbers; at −inf, none: the ungated ones.
    stream, windows = ctx.corpus.streams["test"], ctx.windows("test")

    def scored(threshold):
        combiner.parameters["gate_threshold"] = torch.tensor(threshold)
        return score_stream(gated_ctx, memory, stream, windows, settings, "test", "t", combiners=[combiner])[0]

    before = queries[0]
    everything = scored(math.inf)
    assert queries[0] == before
    base = nll_total(ctx.base.model, stream, windows, batch_size=4)
    assert (everything.total, everything.count) == (base.total, base.count)
    nothing = scored(-math.inf)
    assert combiner.gate(torch.zeros(3, 2)) is None
    assert queries[0] - before == nothing.count + CHECK
    # The test split changed, the fit made again from scratch: the same threshold (never read from test).
    shutil.rmtree(tmp_path / "cache" / "combiners")
    corpus = dataclasses.replace(ctx.corpus, streams={**ctx.corpus.streams, "test": stream[: len(stream) // 2]})
    again = evaluate_mixture(dataclasses.replace(gated_ctx, corpus=corpus), memory).details["gate"]
    assert {key: again[key] for key in ("threshold_weight", "valid_skipped_share", "valid_ppl")} == \
        {key: facts[key] for key in ("threshold_weight", "valid_skipped_share", "valid_ppl")}


def test_no_gate_without_an_allowance(ctx, memory, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "cache"))
    plain = dataclasses.replace(ctx, combiner=resolve_combiner(Adaptive(steps=50)))
    combiner = fit_combiners(plain, memory, [(KNOBS, plain.combiner.grid()[0])]).combiners[0]
    assert combiner.gate(torch.zeros(3, 2)) is None and "gate_w" not in combiner.state_dict()


def test_a_fit_is_keyed_by_the_code_of_its_combiner_with_knobs_fixed(ctx, memory, monkeypatch):
    """``--set adaptive.gate=...`` makes a subclass in the core; an edit of adaptive.py must still refit."""
    from memdec_core.components import identity
    from memdec_core.engine.learning import fit_key

    fixed = dataclasses.replace(ctx, combiner=resolve_combiner(Adaptive(gate=0.01)))
    settings = [(KNOBS, fixed.combiner.grid()[0])]
    before = fit_key(fixed, memory, settings)
    hash_of = identity.source_hash
    monkeypatch.setattr(identity, "source_hash",
                        lambda path: "edited" if "memdec_combiners" in str(path) else hash_of(path))
    assert fit_key(fixed, memory, settings) != before
