"""What a mixture row says about its memory, and knob grids that look past their edge."""

import math

import pytest
import torch
from conftest import SMALL_WINDOWS

from memdec_core.engine.grids import extend
from memdec_core.interfaces import EvalSettings

WINDOW = EvalSettings(**SMALL_WINDOWS)


@pytest.mark.parametrize("values, best, bounds, edge, expected", [
    ((0.3, 1.0, 3.0, 10.0, 30000.0 / 3, 30000.0), 30000.0, (0.0, math.inf), "top", (90000.0, 270000.0, 810000.0)),
    ((0.02, 0.05, 0.5, 0.9, 0.95), 0.95, (0.0, 1.0), "top", (0.975, 0.99, 0.995)),
    ((0.02, 0.05, 0.5, 0.9, 0.95), 0.02, (0.0, 1.0), "bottom", (0.002, 0.004, 0.01)),
    ((0.3, 1.0, 3.0), 0.3, None, "bottom", (0.03, 0.06, 0.15)),  # undeclared, positive: toward 0
    ((8, 16, 32), 32, None, "top", (64, 128, 256)),  # an integer knob stays an integer
    ((-1.0, 0.0, 1.0), -1.0, None, "bottom", (-4.0, -3.0, -2.0)),
])
def test_a_best_value_at_the_edge_extends_the_grid_that_way(values, best, bounds, edge, expected):
    extension = extend("knob", values, best, bounds)
    assert extension.edge == edge
    assert extension.values == pytest.approx(expected)
    assert all(type(value) is type(expected[0]) for value in extension.values)


@pytest.mark.parametrize("values, best, bounds", [
    ((0.1, 0.5, 0.9), 0.5, (0.0, 1.0)),  # inside the grid
    ((0.1, 1.0), 1.0, (0.0, 1.0)),  # fewer than three values: nothing to read an edge from
    ((0.5, 0.9, 1.0), 1.0, (0.0, 1.0)),  # at its bound: λ = 1 is as far as λ goes
])
def test_no_extension_inside_the_grid_or_at_the_bound(values, best, bounds):
    assert extend("lam", values, best, bounds) is None


def test_knn_lm_at_the_top_of_its_temperature_grid_tries_beyond_it(memdec_context_factory):
    from memdec_knn.method import KnnLM

    ctx = memdec_context_factory()
    low = (1e-4, 2e-4, 4e-4)  # far too sharp: the best is the largest
    result = KnnLM(k=16, temperatures=low).evaluate(ctx)
    tried = sorted({point["temperature"] for point in result.tuning})
    assert tried[:3] == list(low) and tried[3:] == pytest.approx([8e-4, 1.6e-3, 3.2e-3])
    assert result.knobs["temperature"] > max(low)
    note = next(note for note in result.details["grid_edges"] if "temperature=0.0004 was the top" in note)
    at_far_end = result.knobs["temperature"] == pytest.approx(3.2e-3)
    assert ("still the edge of the extended grid" in note) == at_far_end
    best = min(result.tuning, key=lambda point: point["valid_ppl"])
    assert result.valid_ppl == best["valid_ppl"]


def test_a_grid_inside_its_edges_is_scored_once(memdec_context_factory):
    from memdec_knn.method import KnnLM

    result = KnnLM(k=16, temperatures=(1.0,)).evaluate(memdec_context_factory())
    assert "grid_edges" not in result.details or not any("temperature" in n for n in result.details["grid_edges"])


def test_the_memory_alone_is_scored_over_the_tokens_it_names(memdec_context_factory):
    """kNN-LM alone gives probability 0 to tokens none of its neighbours holds: its own perplexity
    is over the rest, with their share; checked against a brute-force pass."""
    from memdec_core.engine.scoring import iter_scored_batches
    from memdec_knn.method import KnnLM

    ctx = memdec_context_factory()
    result = KnnLM(k=8, temperatures=(1.0,)).evaluate(ctx)
    memory = KnnLM(k=8, temperatures=(1.0,)).create_memory(ctx)
    memory.prepare(ctx)
    named, total, count = 0.0, 0, 0
    for batch in iter_scored_batches(ctx.base.model, ctx.corpus.streams["test"], ctx.windows("test"),
                                     batch_size=4, capture_hidden=True):
        gold = memory.gold_logprobs(memory.score(batch), batch, {"temperature": 1.0})
        finite = torch.isfinite(gold)
        named -= float(gold[finite].double().sum())
        count += int(finite.sum())
        total += gold.numel()
    assert 0 < count < total
    assert result.memory["memory_coverage"] == pytest.approx(count / total)
    assert result.memory["memory_alone_ppl"] == pytest.approx(math.exp(named / count), rel=1e-9)


def test_agreement_and_kl_equal_the_dense_computation():
    from memdec_decoder.fidelity import agreement_and_kl

    generator = torch.Generator().manual_seed(0)
    rows, vocab = 6, 20
    tokens = torch.full((rows, 4), -1)
    probs = torch.zeros((rows, 4))
    for row in range(rows):
        support = torch.randperm(vocab, generator=generator)[:1 + row % 4]
        weights = torch.rand(len(support), generator=generator) + 0.1
        tokens[row, :len(support)] = support
        probs[row, :len(support)] = weights / weights.sum()
    memory = torch.log_softmax(torch.randn(rows, vocab, generator=generator), dim=-1)
    memory[0] = memory[0].clone()
    memory[0, tokens[0, 0]] = 5.0  # one row where the memory's top token is the kNN's
    memory = torch.log_softmax(memory, dim=-1)
    agree, kl = agreement_and_kl(tokens, probs, memory)
    dense = torch.zeros(rows, vocab, dtype=torch.float64)
    for row in range(rows):
        for slot in range(4):
            if tokens[row, slot] >= 0:
                dense[row, tokens[row, slot]] += float(probs[row, slot])
    expected_kl = sum(float(p) * (math.log(float(p)) - float(memory[row, v]))
                      for row in range(rows) for v, p in enumerate(dense[row]) if p > 0)
    expected_agree = int((dense.argmax(dim=1) == memory.argmax(dim=1)).sum())
    assert agree == expected_agree >= 1
    assert kl == pytest.approx(expected_kl, rel=1e-9)


def test_a_memdec_row_reports_its_memory_alone_and_its_fidelity(corpus_dir, tiny_llama, trained_memory):
    from memdec_core import api as core_api

    row = core_api.evaluate(str(corpus_dir), [str(tiny_llama)], ["memdec"], settings=WINDOW,
                            method_settings={"memdec": {"path": str(trained_memory)}})["results"][0]
    memory = row["memory"]
    assert 1 < memory["memory_alone_ppl"] < 1e6 and memory["memory_coverage"] == 1.0  # full vocabulary
    assert 0 <= memory["target_agreement"] <= 1 and memory["target_kl"] >= 0
    assert memory["fidelity_positions"] > 0


def test_the_bases_of_a_run_that_share_a_tokenizer_form_the_memorys_family(tiny_llama, tiny_gpt2):
    """Without memdec.teacher/init, the run's largest base of the tokenizer teaches and its smallest
    initialises, whichever base is being scored: one memory for the run, as the paper trains one
    per family."""
    from memdec_core.inputs.models import load_model
    from memdec_decoder.pipeline import teacher_and_init
    from memdec_decoder.settings import DecoderSettings

    bases = (str(tiny_gpt2), str(tiny_llama))
    models = {name: load_model(name) for name in bases}
    sizes = {name: sum(p.numel() for p in model.model.parameters()) for name, model in models.items()}
    assert len(set(sizes.values())) == 2
    expected = (max(sizes, key=sizes.get), min(sizes, key=sizes.get))
    for name in bases:
        assert teacher_and_init(models[name], DecoderSettings(), bases) == expected
        assert teacher_and_init(models[name], DecoderSettings(teacher=name), bases)[0] == name  # a setting wins
    alone = models[str(tiny_llama)]
    assert teacher_and_init(alone, DecoderSettings(), ()) == (str(tiny_llama), str(tiny_llama))


def test_a_memorys_fidelity_is_measured_once_then_read_back(corpus_dir, tiny_gpt2, tiny_llama, trained_memory,
                                                             monkeypatch):
    """The first evaluation loads the memory's teacher (the tiny Llama, not the base) and searches
    its datastore; a later one reads the same figures back from the cache: no teacher, no index."""
    import shutil

    from memdec_core import api as core_api
    from memdec_core.store.cache_dir import cache_folder
    from memdec_decoder import pipeline
    from memdec_knn import api as knn
    from memdec_knn.datastore import Datastore

    shutil.rmtree(cache_folder("fidelity"), ignore_errors=True)  # measured here, not by an earlier test
    loaded, load_model = [], pipeline.load_model
    monkeypatch.setattr(pipeline, "load_model", lambda name, *args: loaded.append(name) or load_model(name, *args))

    def fidelity() -> dict:
        row = core_api.evaluate(str(corpus_dir), [str(tiny_gpt2)], ["memdec"], settings=WINDOW,
                                component_settings={"memdec": {"path": str(trained_memory)}})["results"][0]
        return {key: row["memory"].get(key) for key in ("target_agreement", "target_kl", "fidelity_positions")}

    first = fidelity()
    assert loaded == [str(tiny_llama)] and first["fidelity_positions"] > 0
    assert len(list(cache_folder("fidelity").glob("*.json"))) == 1  # kept for later runs, not only this process

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher's pipeline was entered again")

    for owner, name in ((pipeline, "load_model"), (knn, "datastore_for"), (Datastore, "with_index")):
        monkeypatch.setattr(owner, name, refuse)
    assert fidelity() == first
