"""``memdec compare``: every base × method with forgetting, cost and latency; formats; budgets."""

import csv
import io
import json

import pytest
from click.testing import CliRunner
from conftest import SMALL_WINDOWS

from memdec_cli.main import build_cli
from memdec_core.errors import ConfigError, UnknownComponentError
from memdec_core.interfaces import EvalSettings
from memdec_core.runs.compare import CompareSettings, compare

WINDOW = EvalSettings(**SMALL_WINDOWS)
ALL = ["base", "dapt", "lora", "knn-lm", "rag", "memdec"]


def quick_settings(model) -> dict:
    return {"dapt": {"epochs": 1, "lrs": (3e-3,)}, "lora": {"epochs": 1, "rank": 2, "lrs": (3e-3,)},
            "knn-lm": {"k": 16}, "rag": {"passage_tokens": 16, "retrieval_stride": 16},
            "memdec": {"teacher": str(model), "init": str(model), "epochs": 1, "k": 16, "temperature": 1.0}}


@pytest.fixture(scope="module")
def report(corpus_dir, tiny_llama, tmp_path_factory):
    # A cache of its own: every stage runs (a datastore another test built would not be built, nor timed).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMDEC_CACHE", str(tmp_path_factory.mktemp("compare-cache")))
        yield compare(str(corpus_dir), [str(tiny_llama)], ALL, settings=WINDOW,
                      method_settings=quick_settings(tiny_llama),
                      measure=CompareSettings(general_tokens=300, latency_tokens=200, latency_seconds=0))


def test_every_method_gets_a_row_with_every_measure(report):
    rows = {row["method"]: row for row in report["results"]}
    assert list(rows) == ALL
    for row in rows.values():
        assert row["test_ppl"] > 1 and row["general_ppl"] > 1 and row["latency_ratio"] > 0
    assert rows["base"]["params_added"] == 0 and rows["knn-lm"]["params_added"] == 0
    assert rows["lora"]["params_added"] > 0 and rows["memdec"]["params_added"] > 0
    assert rows["knn-lm"]["bytes_added"] > 0 and rows["dapt"]["bytes_added"] > 0
    assert rows["memdec"]["test_ppl"] < rows["base"]["test_ppl"]
    # The base is the reference of every ratio: 1 by construction, not timed against itself.
    assert (rows["base"]["latency_ratio"], rows["base"]["generation_ratio"]) == (1.0, 1.0)
    for name in ALL[1:]:
        assert rows[name]["generation_ratio"] > 0 and rows[name]["latency_spread"] >= 0, name
        assert rows[name]["generation_ms_per_token"] > 0 and rows[name]["base_ms_per_token"] > 0, name
    for name in ("knn-lm", "memdec"):
        assert rows[name]["memory_alone_ppl"] > 1 and 0 < rows[name]["memory_coverage"] <= 1, name
    assert 0 <= rows["memdec"]["target_agreement"] <= 1 and rows["memdec"]["target_kl"] >= 0
    assert rows["knn-lm"]["target_agreement"] is None  # a kNN-LM is the distribution, not its imitation
    assert set(report["meta"]) >= {"versions", "seeds", "git", "device"}
    for row in rows.values():  # bits per byte: the perplexities on the tokenizer-free scale
        assert row["test_bpb"] > 0 and row["general_bpb"] > 0, row["method"]
        assert (row["valid_bpb"] is None) == (row["valid_ppl"] is None), row["method"]
    assert rows["memdec"]["test_bpb"] < rows["base"]["test_bpb"]


def test_a_compare_says_where_its_seconds_went(report):
    """meta.timings for the run, each row's timings: the memdec row trained and measured fidelity,
    every adapted row was timed and scored general text."""
    timings = report["meta"]["timings"]
    assert {"load", "tokenise", "datastore", "index", "targets", "train", "tune", "test", "general", "fidelity",
            "latency", "other"} <= set(timings)
    rows = {row["method"]: row for row in report["results"]}
    assert {"targets", "train", "tune", "test", "fidelity"} <= set(rows["memdec"]["timings"])
    for name in ALL[1:]:
        # The stages ran (a stage's seconds are rounded to 0.01: a tiny model's may be 0.0).
        assert {"latency", "general"} <= set(rows[name]["timings"]), name
    assert sum(row["timings"]["train"] for row in rows.values() if "train" in row["timings"]) \
        == pytest.approx(timings["train"], abs=0.05)


def test_the_general_split_is_scored_like_the_domain(report, tiny_llama):
    from memdec_core.engine.scoring import perplexity
    from memdec_core.inputs.data import load_corpus, make_windows, tokenize_documents
    from memdec_core.inputs.models import load_model

    base = next(row for row in report["results"] if row["method"] == "base")
    model = load_model(str(tiny_llama))
    stream = tokenize_documents(model.tokenizer, load_corpus("general").documents["test"])[:300]
    expected = perplexity(model.model, stream, make_windows(len(stream), 64, 32), batch_size=4)
    assert base["general_ppl"] == pytest.approx(expected, rel=1e-6)


def test_a_second_compare_reuses_every_artifact(corpus_dir, tiny_llama, report):
    again = compare(str(corpus_dir), [str(tiny_llama)], ["dapt", "lora", "knn-lm", "memdec"], settings=WINDOW,
                    method_settings={k: v for k, v in quick_settings(tiny_llama).items() if k != "rag"},
                    measure=CompareSettings(general_tokens=300, latency_tokens=200, latency_seconds=0,
                                            reuse_results=False))
    first = {row["method"]: row for row in report["results"]}
    for row in again["results"]:
        assert row["test_ppl"] == first[row["method"]]["test_ppl"]
        for key in ("artifact", "datastore", "memory"):
            assert row["details"].get(key) == first[row["method"]]["details"].get(key)


def test_a_third_compare_reads_its_rows_back_without_evaluating(corpus_dir, tiny_llama, report, monkeypatch):
    from memdec_decoder.method import MemoryDecoderMethod
    from memdec_peft.methods import Lora

    def must_not_run(self, ctx):
        raise AssertionError("the row should have been read back")

    monkeypatch.setattr(Lora, "evaluate", must_not_run)
    monkeypatch.setattr(MemoryDecoderMethod, "evaluate", must_not_run)
    settings = quick_settings(tiny_llama)
    again = compare(str(corpus_dir), [str(tiny_llama)], ["lora", "memdec"], settings=WINDOW,
                    method_settings={"lora": settings["lora"], "memdec": settings["memdec"]},
                    measure=CompareSettings(general_tokens=300, latency_tokens=200, latency_seconds=0))
    first = next(row for row in report["results"] if row["method"] == "lora")
    assert [row["method"] for row in again["results"]] == ["lora", "memdec"]
    assert again["results"][0]["test_ppl"] == first["test_ppl"] and again["results"][0]["latency_ratio"] > 0


def test_by_default_every_method_that_trains_gets_the_memory_decoders_flops(report):
    """The paper's protocol: dapt and lora train with the compute the memory's training took
    (to within one optimizer step, the unit a budget is spent in)."""
    rows = {row["method"]: row for row in report["results"]}
    budget = rows["memdec"]["train_flops"]
    assert budget > 0 and report["meta"]["protocol"] == "equal-flops"
    assert report["meta"]["compute_reference"] == "memdec"
    for name in ("dapt", "lora"):
        row = rows[name]
        per_token = row["train_flops"] / row["train_tokens"]
        step_flops = per_token * 4 * SMALL_WINDOWS["context"] * 2  # batch 8 × context, with slack
        assert budget - step_flops <= row["train_flops"] <= budget, name


def test_without_the_memory_decoder_each_method_keeps_its_own_schedule(corpus_dir, tiny_llama):
    report = compare(str(corpus_dir), [str(tiny_llama)], ["base", "dapt"], settings=WINDOW,
                     method_settings={"dapt": quick_settings(tiny_llama)["dapt"]},
                     measure=CompareSettings(general_tokens=300, latency_tokens=200, latency_seconds=0))
    assert report["meta"]["protocol"] == "own-schedule"


def test_budget_too_small_and_unknown_method(corpus_dir, tiny_llama):
    with pytest.raises(ConfigError, match="less than one optimizer step"):
        compare(str(corpus_dir), [str(tiny_llama)], ["dapt"], settings=WINDOW,
                measure=CompareSettings(budget_tokens=10, general=""))
    with pytest.raises(UnknownComponentError, match="did you mean 'lora'"):
        compare(str(corpus_dir), [str(tiny_llama)], ["lorra"], settings=WINDOW)


def test_cli_formats(corpus_dir, tiny_llama, tmp_path):
    common = ["compare", "--domain", str(corpus_dir), "--base", str(tiny_llama), "--method", "base,knn-lm",
              "--set", "knn-lm.k=16", "--context", "64", "--stride", "32", "--general-tokens", "200",
              "--latency-tokens", "100"]
    runner = CliRunner()
    as_json = runner.invoke(build_cli(), [*common, "--format", "json", "--output", str(tmp_path / "run.json")])
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.stdout)
    assert set(payload) == {"domain", "results", "meta"}
    assert set(payload["results"][0]) >= {"base", "method", "test_ppl", "general_ppl", "knobs", "params_added",
                                          "bytes_added", "train_seconds", "latency_ratio"}
    assert json.loads((tmp_path / "run.json").read_text())["domain"] == payload["domain"]
    as_csv = runner.invoke(build_cli(), [*common, "--format", "csv"])
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [row["method"] for row in rows] == ["base", "knn-lm"]
    as_markdown = runner.invoke(build_cli(), [*common, "--format", "markdown"])
    assert as_markdown.stdout.count("**") == 2  # the best cell of the one base


def test_the_plot_shows_methods_and_the_lambda_curve(report, tmp_path):
    from memdec_cli.plot import plot_comparison

    plot_comparison(report, tmp_path / "figure.png")
    assert (tmp_path / "figure.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_fails_before_the_run(corpus_dir, tiny_llama, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    result = CliRunner().invoke(build_cli(), ["compare", "--domain", str(corpus_dir), "--base", "no-such-model",
                                              "--plot", str(tmp_path / "figure.png")])
    assert result.exit_code == 1 and "--plot needs matplotlib" in result.output
    assert not (tmp_path / "figure.png").exists()


@pytest.mark.parametrize("text, expected", [
    ("32768", {"budget_tokens": 32768}), ("64k", {"budget_tokens": 64000}), ("2M tokens", {"budget_tokens": 2_000_000}),
    ("3e12flops", {"budget_flops": 3e12}), ("2.5TFLOPs", {"budget_flops": 2.5e12}), ("0", {})])
def test_a_budget_is_tokens_or_flops(text, expected):
    from memdec_core.runs.runconfig import parse_budget

    assert parse_budget(text) == {**expected, "equal_compute": False}
    protocol = "own-schedule" if text == "0" else "tokens" if "budget_tokens" in expected else "equal-flops"
    assert CompareSettings(**parse_budget(text)).protocol == protocol


def test_equal_compute_is_the_default_budget():
    from memdec_core.runs.runconfig import parse_budget

    assert parse_budget("equal") == {"equal_compute": True} and CompareSettings().protocol == "equal-flops"


@pytest.mark.parametrize("text", ["12x", "1.5", "flops", "-3"])
def test_a_malformed_budget_is_one_clear_error(text):
    from memdec_core.runs.runconfig import parse_budget

    with pytest.raises(ConfigError, match="budget|whole number"):
        parse_budget(text)


def test_a_flops_budget_reaches_every_method_that_trains(corpus_dir, tiny_llama):
    from memdec_core.runs.compare import _with_budget

    budget = CompareSettings(budget_flops=1e9).budget()
    overrides = _with_budget(["base", "dapt", "lora", "knn-lm", "rag", "memdec"], {"lora": {"rank": 2}}, budget)
    assert overrides == {"dapt": budget, "lora": {"rank": 2, **budget}, "memdec": budget}
    with pytest.raises(ConfigError, match="not both"):
        CompareSettings(budget_tokens=10, budget_flops=1.0)


def test_an_interrupted_compare_resumes_from_what_it_finished(corpus_dir, tiny_llama, monkeypatch):
    from memdec_core.engine import training
    from memdec_rag.method import Rag

    settings = {"dapt": {"epochs": 1, "lrs": (1e-3,)}, "rag": {"passage_tokens": 16, "retrieval_stride": 8}}
    measure = CompareSettings(general_tokens=300, latency_tokens=200, latency_seconds=0)

    def interrupted(self, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(Rag, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare(str(corpus_dir), [str(tiny_llama)], ["dapt", "rag"], settings=WINDOW, method_settings=settings,
                measure=measure)
    monkeypatch.undo()

    def must_not_train(self):
        raise AssertionError("the finished DAPT run should have been reused")

    monkeypatch.setattr(training.Trainer, "run", must_not_train)
    resumed = compare(str(corpus_dir), [str(tiny_llama)], ["dapt", "rag"], settings=WINDOW, method_settings=settings,
                      measure=measure)
    assert [row["method"] for row in resumed["results"]] == ["dapt", "rag"]

    # A damaged row file is measured again, not trusted (the adapter itself is still reused).
    from memdec_core.store.cache_dir import cache_root

    damaged = [path for path in (cache_root() / "results").glob("*/row.json")
               if json.loads(path.read_text())["knobs"] == {"lr": 1e-3} and '"dapt"' in path.read_text()]
    assert damaged
    for path in damaged:
        path.write_text("{ truncated")
    again = compare(str(corpus_dir), [str(tiny_llama)], ["dapt"], settings=WINDOW,
                    method_settings={"dapt": settings["dapt"]}, measure=measure)
    assert again["results"][0]["test_ppl"] == resumed["results"][0]["test_ppl"]


def test_the_cli_defaults_are_the_quick_cpu_profile_and_zero_lifts_them(monkeypatch):
    import memdec_core.runs.compare as compare_module
    from memdec_core.runs.runconfig import QUICK_EVAL_TOKENS, QUICK_TRAIN_TOKENS

    seen = []

    def fake_compare(domain, bases, methods, *, settings, measure, **options):
        seen.append((settings, measure))
        return {"domain": domain, "results": [], "meta": {}}

    monkeypatch.setattr(compare_module, "compare", fake_compare)
    runner = CliRunner()
    assert runner.invoke(build_cli(), ["compare", "--domain", "finance", "--format", "json"]).exit_code == 0
    settings, measure = seen[-1]
    assert (settings.max_train_tokens, settings.max_eval_tokens) == (QUICK_TRAIN_TOKENS, QUICK_EVAL_TOKENS)
    assert measure.budget() == {} and measure.equal_compute and measure.protocol == "equal-flops"
    full = ["compare", "--domain", "finance", "--format", "json", "--max-train-tokens", "0", "--max-eval-tokens", "0",
            "--budget", "0"]
    assert runner.invoke(build_cli(), full).exit_code == 0
    settings, measure = seen[-1]
    assert settings.max_train_tokens is None and settings.max_eval_tokens is None and measure.budget() == {}
    assert measure.protocol == "own-schedule"
    flops = runner.invoke(build_cli(), ["compare", "--domain", "finance", "--format", "json", "--budget", "2TFLOPs"])
    assert flops.exit_code == 0 and seen[-1][1].budget() == {"budget_flops": 2e12}
    bad = runner.invoke(build_cli(), ["compare", "--domain", "finance", "--budget", "lots"])
    assert bad.exit_code == 2 and "is not 'equal', 0, a number of tokens" in bad.output  # bad usage


def test_compare_takes_a_combiner_file_and_tunes_its_knobs(corpus_dir, tiny_llama, tmp_path):
    path = tmp_path / "geometric.py"
    path.write_text(
        "from memdec_core.interfaces import combiner\n\n"
        "@combiner('geometric', grid=[{'alpha': a} for a in (0.1, 0.3)])\n"
        "def geometric(base, memory, context, alpha=0.2):\n"
        "    mixed = (1 - alpha) * base + alpha * memory.clamp(min=-30)\n"
        "    return mixed - mixed.logsumexp(-1, keepdim=True)\n")
    result = CliRunner().invoke(build_cli(), [
        "compare", "--domain", str(corpus_dir), "--base", str(tiny_llama), "--method", "knn-lm",
        "--combiner", f"{path}:geometric", "--set", "knn-lm.k=16", "--context", "64", "--stride", "32",
        "--general-tokens", "200", "--latency-tokens", "100", "--format", "json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["results"][0]
    assert row["knobs"]["alpha"] in (0.1, 0.3) and "lam" not in row["knobs"]
    assert json.loads(result.stdout)["meta"]["combiner"] == "geometric"


def test_a_token_budget_below_one_optimizer_step_is_refused_before_any_work(corpus_dir, tiny_llama, monkeypatch):
    from memdec_peft.methods import Dapt

    def must_not_run(self, ctx):
        raise AssertionError("nothing should run")

    monkeypatch.setattr(Dapt, "evaluate", must_not_run)
    with pytest.raises(ConfigError, match=r"less than one optimizer step of dapt .*512 tokens"):
        compare(str(corpus_dir), [str(tiny_llama)], ["base", "dapt"], settings=WINDOW,
                method_settings={"dapt": {"batch_size": 8}},
                measure=CompareSettings(general_tokens=300, latency_tokens=200, budget_tokens=100))


@pytest.mark.parametrize("field, value", [("generation_tokens", -1), ("latency_seconds", -0.5), ("latency_tokens", 1),
                                          ("general_tokens", 0)])
def test_out_of_range_measure_settings_are_one_clear_error(field, value):
    with pytest.raises(ConfigError, match="at least 2|not negative"):
        CompareSettings(**{field: value})
