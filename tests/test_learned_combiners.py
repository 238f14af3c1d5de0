"""Combiners that learn, everywhere a mixture goes: a third party's runs through the contract kit
and ``memdec eval``; a fit is the same bits for the same seed and never reads the test split;
generation and the composite model mix with the fitted weights exactly as evaluation scores;
a saved composite keeps the fitted state; lm-eval and ``memdec tasks`` use the fitted combiner."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import invoke, one_line_error

from memdec_core import api
from memdec_core.components.combiner_files import load_combiner_file
from memdec_core.errors import ArtifactError, ConfigError, ResultError
from memdec_core.interfaces import EvalSettings
from memdec_core.store.cache_dir import cache_folder
from memdec_core.testing import CombinerContract

ROUTER = Path(__file__).resolve().parents[1] / "examples" / "learned_router.py"
WINDOWS = dict(context=64, stride=32, batch_size=4)
#: A kNN memory small enough for the tiny corpus, with one temperature: generation and a
#: composite mix at fixed knobs.
KNN = {"knn-datastore": {"k": 8, "temperatures": (3.0,)}}


class TestLogisticRouter(CombinerContract):
    """A third party's learned combiner, from a file, through memdec's contract kit."""

    component = load_combiner_file(f"{ROUTER}:LogisticRouter")


def fit_states() -> dict[str, dict[str, torch.Tensor]]:
    """Every fit in the cache (``combiners/``): its tensors, by file name."""
    from safetensors.torch import load_file

    folder = cache_folder("combiners")
    return {path.name: load_file(str(path)) for path in sorted(folder.glob("*.safetensors"))} if folder.is_dir() else {}


def forget_fits() -> None:
    """Remove every cached fit, so that the next run fits again."""
    shutil.rmtree(cache_folder("combiners"), ignore_errors=True)


def knn_adaptive(corpus, base, seed: int = 0) -> dict:
    """``memdec eval --method knn-lm --combiner adaptive`` on the tiny fixtures, fitted afresh."""
    forget_fits()
    report = api.evaluate(str(corpus), [str(base)], ["knn-lm"], settings=EvalSettings(**WINDOWS, seed=seed),
                          combiner="adaptive", component_settings={"knn-lm": {"k": 8}})
    row = report["results"][0]
    assert row["details"]["knobs_from"] == "fit" and not row["details"]["fit"]["cached"]
    return row


def the_fit() -> dict[str, torch.Tensor]:
    states = fit_states()
    assert len(states) == 1, list(states)
    return next(iter(states.values()))


def same_bits(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def test_a_third_party_learned_combiner_runs_through_memdec_eval(corpus_dir, tiny_gpt2):
    result = invoke("eval", "--domain", corpus_dir, "--base", tiny_gpt2, "--method", "knn-lm", "--combiner",
                    f"{ROUTER}:LogisticRouter", "--context", 64, "--set", "knn-lm.k=16", "--format", "json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)["results"][0]
    assert row["details"]["knobs_from"] == "fit" and math.isfinite(row["test_ppl"])
    fit = row["details"]["fit"]
    assert math.isfinite(fit["heldout_nll"]) and len(fit["coef"]) == 3
    assert 0 < row["details"]["weights"]["weight_mean"] < 1 and row["details"]["weights"]["weight_std"] > 0


def test_the_same_seed_gives_the_same_bits(corpus_dir, tiny_llama):
    first = knn_adaptive(corpus_dir, tiny_llama)
    state = the_fit()
    second = knn_adaptive(corpus_dir, tiny_llama)
    assert second["test_ppl"] == first["test_ppl"]
    assert {**second["details"]["fit"], "seconds": 0} == {**first["details"]["fit"], "seconds": 0}
    assert same_bits(the_fit(), state)
    knn_adaptive(corpus_dir, tiny_llama, seed=1)
    assert not same_bits(the_fit(), state)  # the MLP starts from another draw


def test_fitting_never_reads_the_test_split(corpus_dir, tiny_llama, tmp_path):
    other = tmp_path / "other-test"
    shutil.copytree(corpus_dir, other)
    test_file = other / "test.txt"
    test_file.write_text(test_file.read_text()[::-1])  # another test split; train and valid the same
    first = knn_adaptive(corpus_dir, tiny_llama)
    state = the_fit()
    second = knn_adaptive(other, tiny_llama)
    assert second["test_ppl"] != first["test_ppl"]
    assert same_bits(the_fit(), state)
    from memdec_core.engine.learning import collect_fit_data

    with pytest.raises(ResultError, match="never fitted on the test split"):
        collect_fit_data(None, None, [{}], split="test")


# ----------------------------------------------------------------------------------------------
# Generation and the composite model


@pytest.fixture(scope="module")
def adaptive_composite(tiny_llama, corpus_dir):
    return api.composite_model(str(tiny_llama), "knn-datastore", domain=str(corpus_dir), combiner="adaptive",
                               component_settings=KNN, settings=EvalSettings(**WINDOWS))


def test_the_composite_mixes_as_evaluation_scores(adaptive_composite, corpus_dir):
    """At teacher-forced positions of the test split, the composite's mixed log-probs (features
    from whole rows) equal the scoring path's (features from the kNN's sparse support), and so
    does the NLL that evaluation sums: greedy generation chooses what scoring would."""
    from memdec_core.engine.features import token_features
    from memdec_core.engine.scoring import (
        batch_features,
        iter_scored_batches,
        mixing_context,
        score_stream,
    )
    from memdec_core.inputs.context import prepare_context
    from memdec_core.inputs.data import make_windows

    model = adaptive_composite
    memory, knobs, combiner = model.memory, model.knobs, model.combiner
    ctx = prepare_context(str(corpus_dir), model.loaded_base, EvalSettings(**WINDOWS), "adaptive")
    stream = ctx.corpus.streams["test"][:64]
    windows = make_windows(len(stream), 64, 32)
    batch = next(iter_scored_batches(ctx.base.model, stream, windows, batch_size=1, capture_hidden=True))
    state = memory.score(batch)
    sparse = batch_features(memory, state, batch, knobs)
    rows = memory.logprobs(state, batch, knobs)
    whole = token_features(batch.logprobs(), rows, own=memory.features(state, batch))
    torch.testing.assert_close(sparse, whole, atol=1e-5, rtol=1e-5)
    scored = combiner.combine(batch.logprobs(), rows, mixing_context(batch, "test", memory, state, knobs, True))
    with torch.inference_mode():
        mixed = model(input_ids=torch.tensor(stream)[None]).logits[0, :-1]
    torch.testing.assert_close(mixed, scored, atol=1e-5, rtol=1e-5)
    assert torch.equal(mixed.argmax(-1), scored.argmax(-1))
    total = score_stream(ctx, memory, stream, windows, [(knobs, combiner.config)], "test", "test",
                         combiners=[combiner])[0]
    nll = -mixed.gather(1, torch.tensor(stream[1:])[:, None].long()).double().sum()
    assert total.count == len(stream) - 1 and float(nll) == pytest.approx(total.total, rel=1e-5)


def test_generate_fits_once_then_reads_the_fit_back(tiny_llama, corpus_dir, adaptive_composite, monkeypatch):
    """``memdec generate --combiner adaptive`` fits on the domain's validation split, the same fit
    (and cache entry) as the composite's; a second run reads it back; greedy tokens are the
    composite's. Without --domain: one line."""
    from memdec_core.engine import learning
    from memdec_core.engine.generation import generate_with_memory

    passes = []
    real = learning.collect_fit_data
    monkeypatch.setattr(learning, "collect_fit_data", lambda *args, **kwargs: passes.append(1) or real(*args, **kwargs))
    common = ["generate", "--base", tiny_llama, "--memory", "knn-datastore", "--domain", corpus_dir,
              "--combiner", "adaptive", "--context", 64, "--stride", 32, "--batch-size", 4, "--max-new-tokens", 6,
              "--set", "knn-datastore.k=8", "--set", "knn-datastore.temperatures=3", "the bank"]
    forget_fits()
    first = invoke(*common)
    assert first.exit_code == 0, first.stderr
    cached = {name.removeprefix("0."): tensor for name, tensor in the_fit().items()}  # setting 0: the only one
    assert len(passes) == 1 and same_bits(cached, adaptive_composite.combiner.state_dict())
    second = invoke(*common)
    assert second.exit_code == 0 and second.stdout == first.stdout and len(passes) == 1  # read back
    ids = adaptive_composite.tokenizer("the bank", return_tensors="pt")["input_ids"]
    greedy = generate_with_memory(adaptive_composite.loaded_base, adaptive_composite.memory, ids,
                                  combiner=adaptive_composite.combiner, max_new_tokens=6)
    expected = adaptive_composite.tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)
    assert first.stdout.rstrip("\n") == "the bank" + expected
    without = invoke(*[arg for arg in common if arg not in ("--domain", corpus_dir)])
    line = one_line_error(without)
    assert "learns its weights on a domain's validation split" in line and "--domain" in line


def test_a_saved_composite_keeps_its_fitted_state(adaptive_composite, tmp_path):
    folder = tmp_path / "composite"
    adaptive_composite.save_pretrained(folder)
    assert (folder / "combiner.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(folder)
    assert same_bits(again.combiner.state_dict(), adaptive_composite.combiner.state_dict())
    ids = adaptive_composite.tokenizer("the central bank raised its rates", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        torch.testing.assert_close(again(input_ids=ids).logits, adaptive_composite(input_ids=ids).logits)
    (folder / "combiner.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="not a fitted state of combiner 'adaptive'"):
        AutoModelForCausalLM.from_pretrained(folder)
    (folder / "combiner.safetensors").unlink()
    with pytest.raises(ArtifactError, match="has no combiner.safetensors"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_memdec_export_writes_a_composite_with_the_fitted_state(tiny_llama, corpus_dir, tmp_path):
    output = tmp_path / "exported"
    result = invoke("export", "--base", tiny_llama, "--memory", "knn-datastore", "--domain", corpus_dir,
                    "--combiner", "adaptive", "--set", "knn-datastore.k=8", "--set", "knn-datastore.temperatures=3",
                    "--output", output)
    assert result.exit_code == 0, result.stderr
    assert (output / "combiner.safetensors").is_file() and "learned" in (output / "README.md").read_text()
    no_domain = invoke("export", "--base", tiny_llama, "--memory", "knn-datastore", "--combiner", "adaptive",
                       "--set", "knn-datastore.temperatures=3", "--output", tmp_path / "x")
    assert "give the domain to fit it on" in one_line_error(no_domain)


def test_the_api_refuses_a_learning_combiner_without_a_domain(tiny_llama, trained_memory):
    with pytest.raises(ConfigError, match="learns its weights on a domain's validation split"):
        api.composite_model(str(tiny_llama), str(trained_memory), combiner="adaptive")


# ----------------------------------------------------------------------------------------------
# memdec tasks


def test_memdec_tasks_mixes_with_the_fitted_combiner(corpus_dir, tiny_gpt2, tmp_path):
    from test_tasks import write_tiny_task

    spec = write_tiny_task(tmp_path / "task")
    result = invoke("tasks", "--domain", corpus_dir, "--base", tiny_gpt2, "--method", "base,knn-lm", "--tasks", spec,
                    "--combiner", "adaptive", "--context", 64, "--set", "knn-lm.k=16", "--format", "json")
    assert result.exit_code == 0, result.stderr
    rows = {row["method"]: row for row in json.loads(result.stdout)["results"]}
    mixed = rows["knn-lm"]["tasks"]["tiny"]
    assert mixed["knob_source"] == "fit" and mixed["knobs"] == {} and mixed["validation"] == []
    assert rows["base"]["tasks"]["tiny"]["knob_source"] is None
    assert 0.0 <= mixed["accuracy"] <= 1.0 and math.isfinite(rows["knn-lm"]["test_ppl"])


def test_a_learning_combiner_with_a_grid_is_not_tuned_per_task(corpus_dir, tiny_gpt2, tmp_path):
    """A learning combiner's configs are fitted on the domain's validation split; a task must not
    try them again as knobs (the fitted loglikelihood refuses an override)."""
    from test_tasks import write_tiny_task

    from memdec_core.runs.tasks import evaluate_tasks

    router = load_combiner_file(f"{ROUTER}:LogisticRouter")

    class GridRouter(router):
        """The router, fitted with two iteration budgets (the best on held-out positions scores)."""

        name = "grid-router"

        @classmethod
        def grid(cls):
            return [cls.Config(iterations=5), cls.Config(iterations=50)]

    report = evaluate_tasks(str(corpus_dir), [str(write_tiny_task(tmp_path / "task"))], bases=[str(tiny_gpt2)],
                            methods=["knn-lm"], settings=EvalSettings(context=64), combiner=GridRouter,
                            component_settings={"knn-lm": {"k": 16, "temperatures": (3.0,)}})
    entry = report["results"][0]["tasks"]["tiny"]
    assert entry["knob_source"] == "fit" and entry["validation"] == [] and 0.0 <= entry["accuracy"] <= 1.0
