"""Combiners head to head (``--combiner linear,adaptive``): a row per combiner for every method that
mixes a memory, named apart, cached apart; the learned weight in the table, the CSV and the figure."""

import csv
import io
import json

import pytest
from conftest import SMALL_WINDOWS, invoke, one_line_error

from memdec_cli.render import print_comparison, print_evaluation
from memdec_core.errors import ConfigError
from memdec_core.interfaces import EvalSettings
from memdec_core.runs.compare import CompareSettings, compare
from memdec_core.runs.evaluate import evaluate

WINDOW = EvalSettings(**SMALL_WINDOWS)
MEASURE = CompareSettings(general_tokens=300, latency_tokens=200, latency_seconds=0, generation_tokens=0)
KNN = {"knn-lm": {"k": 16}}


@pytest.fixture(scope="module")
def head_to_head(corpus_dir, tiny_llama):
    return compare(str(corpus_dir), [str(tiny_llama)], ["base", "knn-lm"], settings=WINDOW,
                   combiner=["linear", "adaptive"], component_settings=KNN, measure=MEASURE)


def test_a_mixture_gets_a_row_per_combiner_and_the_rest_one(head_to_head):
    rows = head_to_head["results"]
    assert [(row["method"], row["combiner"]) for row in rows] == [
        ("base", None), ("knn-lm", "linear"), ("knn-lm+adaptive", "adaptive")]
    fixed, learned = rows[1], rows[2]
    assert "weights" not in fixed["details"] and fixed["knobs"]["lam"] > 0
    assert set(learned["details"]["weights"]) == {"weight_mean", "weight_std", "weight_sample"}
    assert learned["details"]["knobs_from"] == "fit" and learned["test_ppl"] != fixed["test_ppl"]
    # every row measured as a row is: its own general text and latency
    assert learned["general_ppl"] > 1 and learned["latency_ratio"] > 0
    assert head_to_head["meta"]["combiner"] == ["linear", "adaptive"]
    assert head_to_head["meta"]["config"]["values"]["combiner"] == ["linear", "adaptive"]


def test_a_rerun_reads_each_combiners_row_back_under_its_own_key(corpus_dir, tiny_llama, head_to_head, monkeypatch):
    """The cached row's key holds the row's combiner: read back, the adaptive row is not the linear one."""
    from memdec_core.engine.mixture import MixtureMethod

    def must_not_run(self, ctx):
        raise AssertionError("the row should have been read back")

    monkeypatch.setattr(MixtureMethod, "evaluate", must_not_run)
    again = compare(str(corpus_dir), [str(tiny_llama)], ["knn-lm"], settings=WINDOW,
                    combiner=["linear", "adaptive"], component_settings=KNN, measure=MEASURE)
    first = {row["method"]: row for row in head_to_head["results"]}
    assert [row["method"] for row in again["results"]] == ["knn-lm", "knn-lm+adaptive"]
    for row in again["results"]:
        assert row["test_ppl"] == first[row["method"]]["test_ppl"]
        assert row["combiner"] == first[row["method"]]["combiner"]
    fixed, learned = again["results"]
    assert "weights" in learned["details"] and "weights" not in fixed["details"]


def test_evaluate_gives_the_same_rows_as_compare(corpus_dir, tiny_llama, head_to_head):
    report = evaluate(str(corpus_dir), [str(tiny_llama)], ["base", "knn-lm"], settings=WINDOW,
                      combiner=["linear", "adaptive"], component_settings=KNN)
    compared = {row["method"]: row["test_ppl"] for row in head_to_head["results"]}
    assert {row["method"]: row["test_ppl"] for row in report["results"]} == compared
    assert report["combiner"] == ["linear", "adaptive"]
    assert [row["combiner"] for row in report["results"]] == [None, "linear", "adaptive"]


def test_one_combiner_names_its_rows_as_before(corpus_dir, tiny_llama):
    report = evaluate(str(corpus_dir), [str(tiny_llama)], ["knn-lm"], settings=WINDOW, combiner="linear",
                      component_settings={"knn-lm": {"k": 16, "temperatures": "10"}})
    assert [(row["method"], row["combiner"]) for row in report["results"]] == [("knn-lm", "linear")]
    assert report["combiner"] == report["meta"]["combiner"] == "linear"


def test_the_cli_and_a_config_file_take_a_list_of_combiners(corpus_dir, tiny_llama, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"domain: {corpus_dir}\nbases: [{tiny_llama}]\nmethods: [knn-lm]\n"
                      f"combiner: [linear, adaptive]\ncontext: 64\nstride: 32\n"
                      f"settings:\n  knn-lm: {{k: 16}}\n")
    result = invoke("eval", "--config", config, "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [row["method"] for row in report["results"]] == ["knn-lm", "knn-lm+adaptive"]
    assert report["meta"]["config"]["values"]["combiner"] == ["linear", "adaptive"]
    flags = invoke("eval", "--domain", corpus_dir, "--base", tiny_llama, "--method", "knn-lm", "--set", "knn-lm.k=16",
                   "--context", "64", "--stride", "32", "--combiner", "linear,adaptive", "--format", "json")
    assert flags.exit_code == 0, flags.output
    assert [(row["method"], row["test_ppl"]) for row in json.loads(flags.stdout)["results"]] == [
        (row["method"], row["test_ppl"]) for row in report["results"]]


def test_lam_fixes_the_combiners_that_have_one(corpus_dir, tiny_llama):
    from memdec_cli.eval_command import _combiner

    fixed, learned = _combiner("linear,adaptive", 0.25, {})
    assert fixed.config.lam == 0.25 and learned == "adaptive"
    with pytest.raises(ConfigError, match="--lam does not apply to combiner 'adaptive'"):
        _combiner("adaptive", 0.25, {})


def test_a_command_of_one_combiner_refuses_several(corpus_dir, tiny_llama):
    from memdec_core.runs.prepare import prepare_run

    with pytest.raises(ConfigError, match="mixes with one combiner, given 2"):
        prepare_run(str(corpus_dir), [str(tiny_llama)], ["knn-lm"], combiner=["linear", "adaptive"])
    assert len(prepare_run(str(corpus_dir), [str(tiny_llama)], ["knn-lm"], combiner=["linear", "linear"],
                           head_to_head=True).combiners) == 1  # a repeat is meant once
    line = one_line_error(invoke("eval", "--domain", corpus_dir, "--base", tiny_llama, "--method", "knn-lm",
                                 "--combiner", "linear,nonesuch"))
    assert "nonesuch" in line


# ---- the learned weight shown: table, csv, figure (reports built by hand) ------------------------------

def row(base, method, test_ppl, **extra) -> dict:
    return {"base": base, "method": method, "test_ppl": test_ppl, "valid_ppl": None, "general_ppl": 50.0,
            "knobs": {}, "params_added": 0, "bytes_added": 0, "train_seconds": 0.0, "latency_ratio": None,
            "seconds": 1.0, "tuning": [], "details": {}, **extra}


def learned(mean: float, std: float, points: int) -> dict:
    sample = [[round(mean + std * ((index % 3) - 1), 4), 1.0 + index / points] for index in range(points)]
    return {"weights": {"weight_mean": mean, "weight_std": std, "weight_sample": sample}, "knobs_from": "fit"}


#: A learned combiner's tuning: fitted under the best few memory settings only, the others unscored.
FITTED = [{"temperature": t, "valid_ppl": ppl} for t, ppl in ((0.3, None), (1.0, None), (3.0, 44.3), (10.0, 42.2),
                                                              (30.0, 46.2))]


@pytest.fixture
def report() -> dict:
    return {"domain": "finance", "meta": {}, "results": [
        row("org/model-s", "base", 94.1),
        row("org/model-s", "knn-lm", 80.0, combiner="linear", knobs={"lam": 0.3, "temperature": 10.0},
            tuning=[{"lam": lam, "valid_ppl": 90 - lam} for lam in (0.1, 0.3, 0.5)]),
        row("org/model-s", "knn-lm+adaptive", 70.0, combiner="adaptive", knobs={"temperature": 10.0},
            details=learned(0.3125, 0.2241, 50), tuning=FITTED),
        row("org/model-m", "base", 90.0),
        row("org/model-m", "knn-lm", 78.0, combiner="linear", knobs={"lam": 0.25},
            tuning=[{"lam": lam, "valid_ppl": 80 - lam} for lam in (0.1, 0.25, 0.5)]),
        row("org/model-m", "knn-lm+adaptive", 69.0, combiner="adaptive", details=learned(0.2, 0.1, 40)),
    ]}


def test_the_table_shows_the_learned_weights_mean_and_spread_not_its_sample(report, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    print_comparison(report, "table")
    text = capsys.readouterr().out
    assert "learned λ" in text and "0.31 ±0.22" in text and "0.20 ±0.10" in text
    assert "weight_sample" not in text and "1.02" not in text  # no entropy of the sample leaks in
    print_comparison(report, "markdown")
    lines = capsys.readouterr().out.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    cells = [cell.strip() for cell in lines[4].strip("|").split("|")]  # knn-lm+adaptive on model-s
    assert cells[header.index("learned λ (mean ±sd)")] == "0.31 ±0.22"
    fixed = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert fixed[header.index("learned λ (mean ±sd)")] == "-"


def test_no_weight_column_without_a_learned_weight(report, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    for result in report["results"]:
        result["details"] = {}
    print_comparison(report, "table")
    print_evaluation({**report, "results": [{**r, "valid_ppl": None} for r in report["results"]]}, "table")
    assert "learned λ" not in capsys.readouterr().out


def test_eval_table_shows_the_learned_weight(report, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    print_evaluation(report, "markdown")
    assert "learned λ (mean ±sd)" in capsys.readouterr().out.splitlines()[0]


def test_csv_has_the_combiner_and_the_weight(report, capsys):
    print_comparison(report, "csv")
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["method"], r["combiner"]) for r in rows[:3]] == [("base", ""), ("knn-lm", "linear"),
                                                                 ("knn-lm+adaptive", "adaptive")]
    assert (rows[2]["weight_mean"], rows[2]["weight_std"]) == ("0.3125", "0.2241") and rows[1]["weight_mean"] == ""


def test_the_figure_draws_each_learned_weight_against_the_base_entropy(report, tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.collections import PathCollection

    from memdec_cli.plot import comparison_figure, plot_comparison

    figure = comparison_figure(report)
    weights = next(axis for axis in figure.axes if axis.get_title() == "Learned weight per test position")
    series = [c for c in weights.collections if isinstance(c, PathCollection)]
    assert [c.get_label() for c in series] == ["model-s · knn-lm+adaptive", "model-m · knn-lm+adaptive"]
    assert len(series[0].get_offsets()) == 50 and len(series[1].get_offsets()) == 40
    assert series[0].get_offsets()[0].tolist() == pytest.approx([1.0, 0.3125 - 0.2241])  # (entropy, weight)
    lines = {line.get_label(): line.get_ydata()[0] for line in weights.lines}
    assert lines == {"model-s · knn-lm (fixed λ)": 0.3, "model-m · knn-lm (fixed λ)": 0.25}
    curves = next(axis for axis in figure.axes if axis.get_title().startswith("Tuned on validation"))
    # a fit's held-out NLLs are no validation curve of a knob: only the fixed λ's curves are drawn
    assert [line.get_label() for line in curves.lines if not line.get_label().startswith("_")] == [
        "model-s · knn-lm", "model-m · knn-lm"]
    path = tmp_path / "figure.png"
    plot_comparison(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_weight_panel_without_a_learned_weight(report):
    pytest.importorskip("matplotlib")
    from memdec_cli.plot import comparison_figure

    for result in report["results"]:
        result["details"] = {}
    titles = [axis.get_title() for axis in comparison_figure(report).axes]
    assert "Learned weight per test position" not in titles
