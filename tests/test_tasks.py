"""Zero-shot tasks scored by DCPMI: the score equals a brute-force reference from a tiny model's
logits, requests are deduplicated, λ is tuned per task on validation, bad specs and files are
one-line errors, and ``memdec tasks`` runs end to end on a tiny model."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke, one_line_error

from memdec_core.errors import ArtifactError, ConfigError, UnknownComponentError
from memdec_core.inputs.models import load_model
from memdec_core.runs.tasks import (
    Example,
    load_spec,
    load_task,
    parse_spec,
    plan_scoring,
    score_requests,
    score_task,
    task_names,
)

FIXTURES = Path(__file__).parent / "data" / "tasks"  # a few real lines of kNN-prompt's task_data
SHARED_TASKS = Path(os.environ.get("MEMDEC_SHARED_TASKS", "/work/shared/tasks"))

#: A small task of our own: words of one and of several tokens in the tiny tokenizer.
TINY_SPEC = {
    "data": "test.jsonl", "validation": "valid.jsonl", "label": "label",
    "template": "{text} The outlook is", "premise": " The outlook is",
    "verbalizers": {"down": ["fell", "slowed down"], "up": ["rose", "beat", "growth"]},
}
TINY_LINES = [("the bank raised rates and shares rose", "up"), ("revenue growth slowed", "down"),
              ("investors sold bonds", "down"), ("quarterly earnings beat", "up"),
              ("inflation rose and the market fell", "down"), ("credit loans rose", "up"),
              ("the bank raised rates and shares rose", "up"),  # the same prompt twice: scored once
              ("tax policy slowed growth", "down"), ("market shares fell", "down"), ("earnings rose", "up")]


def write_tiny_task(folder: Path, spec: dict | None = None, lines=TINY_LINES, valid=TINY_LINES[:6]) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("test.jsonl", lines), ("valid.jsonl", valid)):
        (folder / name).write_text("".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in rows))
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec or TINY_SPEC))
    return path


def brute_force_loglikelihood(model):
    """log P(continuation | context) from one forward pass over context + continuation per request."""
    def loglikelihood(requests, knobs=None):
        values = []
        for context, continuation in requests:
            ids = torch.tensor([list(context) + list(continuation)])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0].double(), -1)
            first = len(context)
            values.append(sum(float(logprobs[first - 1 + i, token]) for i, token in enumerate(continuation)))
        return values

    return loglikelihood


def reference_scores(model, tokenizer, spec, examples):
    """DCPMI as the paper defines it, example by example and word by word, token by token."""
    def logprob(text, word):
        context = tokenizer(text)["input_ids"]
        total = 0.0
        for token in tokenizer(" " + word, add_special_tokens=False)["input_ids"]:
            with torch.no_grad():
                logits = model(torch.tensor([context])).logits[0, -1]
            total += float(torch.log_softmax(logits.double(), -1)[token])
            context = context + [token]
        return total

    return [[sum(logprob(example.prompt, word) - logprob(spec.premise, word) for word in words)
             for words in spec.verbalizers] for example in examples]


# ----------------------------------------------------------------------------------------------
# Scoring


def test_dcpmi_equals_a_brute_force_reference_from_the_logits(tiny_llama, tmp_path):
    from memdec_core.engine.loglikelihood import base_loglikelihood

    base = load_model(str(tiny_llama))
    task = load_task(str(write_tiny_task(tmp_path)), None)
    plan = plan_scoring(task.spec, task.test, base.tokenizer)
    assert any(len(base.tokenizer(" " + word, add_special_tokens=False)["input_ids"]) > 1
               for words in task.spec.verbalizers for word in words), "the test needs multi-token words"
    expected = reference_scores(base.model, base.tokenizer, task.spec, task.test)
    for loglikelihood in (brute_force_loglikelihood(base.model), base_loglikelihood(base, batch_size=3)):
        scores = plan.class_scores(score_requests(plan.requests, loglikelihood))
        np.testing.assert_allclose(scores, expected, atol=1e-4)
    predictions = [max(range(2), key=row.__getitem__) for row in expected]
    accuracy = sum(p == example.label for p, example in zip(predictions, task.test)) / len(task.test)
    assert plan.accuracy(brute_force_loglikelihood(base.model)) == pytest.approx(accuracy)


def test_requests_are_deduplicated_and_asked_through_the_one_callable(tiny_gpt2, tmp_path):
    base = load_model(str(tiny_gpt2))
    task = load_task(str(write_tiny_task(tmp_path)), None)
    plan = plan_scoring(task.spec, task.test, base.tokenizer)
    asked = []

    def counting(requests, knobs=None):
        asked.extend((tuple(context), tuple(word)) for context, word in requests)
        return [-1.0] * len(requests)

    score_requests(plan.requests, counting)
    distinct_prompts = len({example.prompt for example in task.test})
    assert distinct_prompts == len(task.test) - 1
    assert len(asked) == len(set(asked)) == (distinct_prompts + 1) * 5  # + the premise, × 5 words


def test_aggregates_sum_pmis_or_compare_class_probabilities():
    plan = plan_scoring(parse_spec({**TINY_SPEC, "verbalizers": {"a": ["x", "y"], "b": ["z"]}}, "t", Path(".")),
                        [Example("p", 0)], _CharTokenizer())
    values = {("p", "x"): -1.0, ("p", "y"): -1.0, ("p", "z"): -0.5,
              (" The outlook is", "x"): -2.0, (" The outlook is", "y"): -3.0, (" The outlook is", "z"): -1.0}
    scored = [values[(_CharTokenizer.text(context), _CharTokenizer.text(word))] for context, word in plan.requests]
    assert plan.class_scores(scored) == [[pytest.approx(3.0), pytest.approx(0.5)]]  # (1 + 2), (0.5)
    plan.aggregate = "logsumexp"
    lse = math.log(2 * math.exp(-1.0)) - math.log(math.exp(-2.0) + math.exp(-3.0))
    assert plan.class_scores(scored) == [[pytest.approx(lse), pytest.approx(0.5)]]


class _CharTokenizer:
    """Token ids = characters (a word's without its leading space): requests without a model."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(char) for char in (text if add_special_tokens else text.removeprefix(" "))]}

    @staticmethod
    def text(ids):
        return "".join(chr(token) for token in ids)


def test_lambda_is_tuned_per_task_on_validation_else_taken_from_perplexity(tmp_path):
    task = load_task(str(write_tiny_task(tmp_path)), None)
    tokenizer = _CharTokenizer()
    test = plan_scoring(task.spec, task.test, tokenizer)
    validation = plan_scoring(task.spec, task.validation, tokenizer)
    up_words = {tuple(ord(c) for c in word) for word in ("rose", "beat", "growth")}

    def lam_dependent(requests, knobs=None):
        """Right answers at λ = 0.4 only: the gold class's words gain there (labels leak via the text)."""
        lam = (knobs or {}).get("lam", 0.25)
        values = []
        for context, word in requests:
            text, is_up = tokenizer.text(context), tuple(word) in up_words
            gold_up = any(text.startswith(t) and label == "up" for t, label in TINY_LINES)
            aligned = text.endswith(" The outlook is") and not text.startswith(" ") and is_up == gold_up
            values.append(-1.0 + (2.0 if aligned and lam == 0.4 else 0.0))
        return values

    grid = [{"lam": lam} for lam in (0.1, 0.25, 0.4, 0.8)]
    tuned = score_task(task, test, validation, lam_dependent, {"lam": 0.25}, grid, "tiny")
    assert tuned["knobs"] == {"lam": 0.4} and tuned["knob_source"] == "validation"
    assert tuned["accuracy"] == 1.0 and [point["lam"] for point in tuned["validation"]] == [0.1, 0.25, 0.4, 0.8]
    # without a validation slice, the λ chosen on perplexity, and the report says why
    task.validation, task.validation_note = [], "no valid.jsonl in the folder"
    untuned = score_task(task, test, None, lam_dependent, {"lam": 0.25}, grid, "tiny")
    assert untuned["knobs"] == {"lam": 0.25} and untuned["knob_source"] == "perplexity"
    assert untuned["validation_note"] == "no valid.jsonl in the folder"
    # a method that does not mix has no knobs
    assert score_task(task, test, None, lam_dependent, {}, [], "tiny")["knob_source"] is None


def test_ties_on_validation_keep_the_knob_nearest_the_perplexity_choice():
    from memdec_core.runs.tasks import choose_knobs

    tried = [({"lam": 0.1}, 0.5), ({"lam": 0.3}, 0.7), ({"lam": 0.6}, 0.7), ({"lam": 0.9}, 0.7)]
    assert choose_knobs(tried, {"lam": 0.8}) == {"lam": 0.9}
    assert choose_knobs(tried, {"lam": 0.2}) == {"lam": 0.3}


# ----------------------------------------------------------------------------------------------
# The shipped specs on real lines


def test_shipped_specs_read_real_lines_of_knn_prompt_data():
    sst2 = load_task("sst2", FIXTURES)
    assert len(sst2.test) == 12  # 15 lines, the 3 neutral ones (__label__3) left out
    assert [example.label for example in sst2.test].count(0) == 6 and sst2.spec.classes == ("negative", "positive")
    assert sst2.test[0].prompt.endswith(" It was") and sst2.spec.premise == " It was"
    assert [len(words) for words in sst2.spec.verbalizers] == [20, 20]  # 25 and 20 words: kNN-prompt trims
    assert sst2.validation == [] and "dev.tsv" in sst2.validation_note
    mr = load_task("mr", FIXTURES, max_examples=6)
    assert len(mr.test) == 6 and mr.test_total == 16 and {example.label for example in mr.test} == {0, 1}
    rte = load_task("rte", FIXTURES)
    assert rte.spec.classes == ("entailment", "not_entailment") and len(rte.spec.verbalizers[1]) == 6
    assert "\n question: " in rte.test[0].prompt and rte.test[0].prompt.endswith(" true or false?\n answer:")


def test_a_shipped_task_scores_as_the_reference_on_real_lines(tiny_gpt2):
    base = load_model(str(tiny_gpt2))
    task = load_task("rte", FIXTURES, max_examples=4)
    plan = plan_scoring(task.spec, task.test, base.tokenizer)
    assert max(len(context) + len(word) for context, word in plan.requests) < 256  # no truncation in the reference
    scores = plan.class_scores(score_requests(plan.requests, brute_force_loglikelihood(base.model)))
    np.testing.assert_allclose(scores, reference_scores(base.model, base.tokenizer, task.spec, task.test), atol=1e-4)


def test_every_shipped_spec_parses():
    import yaml

    from memdec_core.runs.tasks import SPEC_FOLDER, _check_keys

    assert {"sst2", "mr", "cr", "rotten_tomatoes", "hyp", "cb", "rte", "agn", "yahoo"} <= set(task_names())
    for name in task_names():
        _check_keys(yaml.safe_load((SPEC_FOLDER / f"{name}.yaml").read_text()), name)


@pytest.mark.skipif(not SHARED_TASKS.is_dir(), reason="kNN-prompt's task data is not on this machine")
@pytest.mark.parametrize("name", ["sst2", "mr", "cr", "rotten_tomatoes", "hyp", "rte", "agn"])
def test_shipped_specs_read_the_whole_shared_test_sets(name):
    task = load_task(name, SHARED_TASKS)
    assert len({example.label for example in task.test}) == len(task.spec.classes)
    assert {"sst2": 1821, "mr": 2000, "cr": 2000, "rotten_tomatoes": 1066, "hyp": 65, "rte": 277,
            "agn": 7600}[name] == len(task.test)


# ----------------------------------------------------------------------------------------------
# Bad input: one line, naming the task, the file and the line


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("change, message", [
    ({"template": None}, "the spec has no template"),
    ({"verbalizers": {"down": [True], "up": ["rose"]}}, "quote yes/no/true/false in YAML"),
    ({"verbalizers": {"only": ["rose"]}}, "at least two classes"),
    ({"aggregate": "max"}, "aggregate must be one of sum, logsumexp"),
    ({"templat": "x"}, "did you mean 'template'"),
    ({"labels": {"0": "sideways"}}, "labels map to sideways, which no verbaliser names"),
    ({"template": "no fields here"}, "the template names no field"),
    ({"data": "test.parquet"}, "format must be one of jsonl, csv, tsv"),
])
def test_a_bad_spec_is_a_one_line_config_error(tmp_path, change, message):
    spec = {key: value for key, value in {**TINY_SPEC, **change}.items() if value is not None}
    with pytest.raises(ConfigError) as error:
        load_task(str(write_tiny_task(tmp_path, spec)), None)
    assert message in one_line(error)


def test_bad_data_files_are_one_line_artifact_errors(tmp_path):
    path = write_tiny_task(tmp_path, lines=[("fine", "up"), ("wrong label", "sideways")])
    with pytest.raises(ArtifactError, match=r"test.jsonl line 2: label 'sideways' is not one of down, up"):
        load_task(str(path), None)
    (tmp_path / "test.jsonl").write_text('{"text": "a", "label": "up"}\n{"label": "down"}\n')
    with pytest.raises(ArtifactError) as error:
        load_task(str(path), None)
    assert "test.jsonl line 2 has no field 'text'" in one_line(error)
    (tmp_path / "test.jsonl").unlink()
    with pytest.raises(ArtifactError, match="data file .*test.jsonl not found"):
        load_task(str(path), None)


def test_unknown_task_names_and_a_missing_tasks_folder_are_one_line_errors(tmp_path):
    with pytest.raises(UnknownComponentError) as error:
        load_spec("sst", FIXTURES)
    assert "did you mean 'sst2'" in one_line(error)
    with pytest.raises(ConfigError, match="--tasks-dir or \\$MEMDEC_TASKS_DIR"):
        load_spec("sst2", None)
    with pytest.raises(ArtifactError, match="the files are task_data/cb/dev.jsonl"):  # the spec's note says where
        load_task("cb", FIXTURES)


# ----------------------------------------------------------------------------------------------
# memdec tasks


def test_memdec_tasks_scores_base_and_a_mixture_end_to_end(corpus_dir, tiny_gpt2, tmp_path):
    spec = write_tiny_task(tmp_path / "task")
    out = tmp_path / "tasks.json"
    result = invoke("tasks", "--domain", str(corpus_dir), "--base", str(tiny_gpt2), "--method", "base,knn-lm",
                    "--tasks", str(spec), "--context", "64", "--set", "knn-lm.k=32", "--batch-size", "16",
                    "--format", "json", "--output", str(out))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == json.loads(out.read_text()) and report["meta"]["scoring"] == "dcpmi"
    assert report["tasks"][0]["examples"] == 10 and report["tasks"][0]["validation_examples"] == 6
    rows = {row["method"]: row for row in report["results"]}
    assert rows["base"]["tasks"]["tiny"]["knob_source"] is None
    mixed = rows["knn-lm"]["tasks"]["tiny"]
    assert mixed["knob_source"] == "validation" and len(mixed["validation"]) > 1
    assert mixed["knobs"]["lam"] in [point["lam"] for point in mixed["validation"]]
    assert all(0.0 <= row["mean_accuracy"] <= 1.0 for row in rows.values())
    table = invoke("tasks", "--domain", str(corpus_dir), "--base", str(tiny_gpt2), "--method", "base",
                   "--tasks", str(spec), "--context", "64", "--format", "markdown")
    assert table.exit_code == 0 and f"| {tiny_gpt2} | base | " in table.stdout and "tiny ↑" in table.stdout


def test_an_interrupted_memdec_tasks_run_keeps_its_rows_and_resumes(corpus_dir, tiny_gpt2, tmp_path, monkeypatch):
    import memdec_core.runs.tasks as tasks_module

    spec = write_tiny_task(tmp_path / "task")
    out = tmp_path / "tasks.json"
    command = ["tasks", "--domain", corpus_dir, "--base", tiny_gpt2, "--tasks", spec, "--context", "64",
               "--set", "knn-lm.k=32", "--output", out, "--format", "json"]
    scored, real_row = [], tasks_module._method_row

    def killed_after_base(ctx, method, plans):
        if method.name != "base":
            raise KeyboardInterrupt  # the run is stopped while knn-lm is being scored
        scored.append(method.name)
        return real_row(ctx, method, plans)

    monkeypatch.setattr(tasks_module, "_method_row", killed_after_base)
    invoke(*command, "--method", "base,knn-lm")
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and [row["method"] for row in partial["results"]] == ["base"]

    monkeypatch.setattr(tasks_module, "_method_row", lambda *args: scored.append(args[1].name) or real_row(*args))
    # knn-lm was not scored: its settings may change on resuming; base's row is kept all the same
    resumed = invoke(*command, "--method", "base,knn-lm", "--set", "knn-lm.k=16", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    report = json.loads(out.read_text())
    assert scored == ["base", "knn-lm"]  # base was not scored again
    assert report["complete"] is True and report["results"][0] == partial["results"][0]
    assert [row["method"] for row in report["results"]] == ["base", "knn-lm"]

    other = invoke("tasks", "--domain", corpus_dir, "--base", tiny_gpt2, "--tasks", spec, "--context", "32",
                   "--output", out, "--resume")
    assert "made with other settings" in one_line_error(other)
    out.write_text("{not json")
    assert "not a report of memdec tasks" in one_line_error(invoke(*command, "--resume"))


def test_memdec_tasks_checks_tasks_before_loading_any_model(corpus_dir, tmp_path):
    result = invoke("tasks", "--domain", str(corpus_dir), "--base", str(tmp_path / "no-such-model"),
                    "--tasks", "sst", "--tasks-dir", str(FIXTURES))
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown task 'sst'; did you mean 'sst2'?" in lines[0]
    missing = invoke("tasks", "--domain", str(corpus_dir), "--tasks", "cb", "--tasks-dir", str(FIXTURES))
    assert missing.exit_code == 1 and "cb/dev.jsonl not found" in missing.stderr


def test_memdec_tasks_help_teaches_without_importing_torch():
    import subprocess
    import sys

    probe = ("import sys; from memdec_cli.main import main\n"
             "try:\n    main(['tasks', '--help'])\nexcept SystemExit:\n    pass\n"
             "print('HEAVY', [m for m in ('torch', 'faiss', 'transformers') if m in sys.modules], file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in result.stderr, result.stderr
    assert "Examples:" in result.stdout and "sst2" in result.stdout and "MEMDEC_TASKS_DIR" in result.stdout
