"""lm-evaluation-harness: a local multiple-choice task runs offline on the base and on the
composite model with the accuracy that model_loglikelihood gives by brute force;
``memdec-lm-eval --model memdec`` runs lm-eval's own command line; bad input is one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from memdec_core import api  # noqa: E402
from memdec_core.engine.loglikelihood import model_loglikelihood  # noqa: E402
from memdec_core.errors import ConfigError  # noqa: E402
from memdec_core.inputs.models import load_model  # noqa: E402
from memdec_core.lm_eval_model import MemdecLM, check_local_tasks, main  # noqa: E402

TASKS = Path(__file__).parent / "data" / "lm_eval"
TASK = "memdec_tiny_mc"


@pytest.fixture(autouse=True)
def local_tasks(monkeypatch, tmp_path_factory):
    """The task's data_files are read from the working directory; datasets caches under tmp; and
    nothing reaches the hub, for this module's tests only: datasets and huggingface_hub read the
    offline switches once, at import, so their copies are set as well as the environment (which
    the subprocesses inherit)."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.chdir(TASKS)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(datasets.config, name, True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def brute_force(model, tokenizer):
    """Per document, the summed log-prob of every choice after the question (lm-eval's request:
    the choice with a leading space, its tokens those the pair adds to the question), and the
    accuracy of the argmax."""
    score = model_loglikelihood(model, batch_size=1, pad_id=tokenizer.eos_token_id,
                                start_id=tokenizer.bos_token_id, max_length=256)
    documents = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines()]
    per_document = []
    for document in documents:
        context = tokenizer(document["question"])["input_ids"]
        requests = [(context, tokenizer(f"{document['question']} {choice}")["input_ids"][len(context):])
                    for choice in document["choices"]]
        per_document.append(score(requests))
    accuracy = np.mean([np.argmax(values) == document["answer"] for values, document in zip(per_document, documents)])
    return float(accuracy), per_document


@pytest.fixture(scope="module")
def composite(tiny_llama, trained_memory):
    return api.composite_model(str(tiny_llama), str(trained_memory), lam=0.5)


def run_task(model, tokenizer):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, backend="causal")
    tasks = TaskManager(include_path=str(TASKS), include_defaults=False)  # lm-eval's own thousands: not needed
    return lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tasks, log_samples=True)


@pytest.mark.parametrize("which", ["base", "composite"])
def test_a_local_task_scores_as_model_loglikelihood_does(which, tiny_llama, request):
    if which == "base":
        loaded = load_model(str(tiny_llama))
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        model = request.getfixturevalue("composite")
        tokenizer = model.tokenizer
    results = run_task(model, tokenizer)
    accuracy, per_document = brute_force(model, tokenizer)
    assert results["results"][TASK]["acc,none"] == pytest.approx(accuracy)
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    got = [[value for value, _ in sample["filtered_resps"]] for sample in samples]
    np.testing.assert_allclose(got, per_document, rtol=1e-4, atol=1e-4)


def test_the_memdec_model_type_runs_from_lm_evals_command_line(tiny_llama, trained_memory, composite, tmp_path):
    command = [sys.executable, "-m", "memdec_core.lm_eval_model", "--model", "memdec",
               "--model_args", f"base={tiny_llama},memory={trained_memory},lam=0.5", "--tasks", TASK,
               "--include_path", ".", "--batch_size", "4", "--output_path", str(tmp_path)]
    done = subprocess.run(command, cwd=TASKS, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")})
    assert done.returncode == 0, done.stderr[-2000:]
    assert TASK in done.stdout and "acc" in done.stdout  # lm-eval's own results table
    saved = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    assert saved["results"][TASK]["acc,none"] == pytest.approx(brute_force(composite, composite.tokenizer)[0])


def test_bad_model_args_are_one_line(tiny_llama, trained_memory):
    with pytest.raises(ConfigError, match="unknown model_args key 'lamda'; did you mean 'lam'"):
        MemdecLM(base=str(tiny_llama), memory=str(trained_memory), lamda=0.5)
    with pytest.raises(ConfigError, match=r"lam must be in \[0, 1\], got 1.5"):
        MemdecLM(base=str(tiny_llama), memory=str(trained_memory), lam=1.5)
    with pytest.raises(ConfigError, match="needs --model_args base=MODEL,memory="):
        MemdecLM(base=str(tiny_llama))


def test_a_bad_model_args_key_through_the_command_line_is_one_line_and_exit_status_1(tiny_llama, trained_memory,
                                                                                     tmp_path):
    """``memdec-lm-eval``'s documented promise, through its own command line (lm-eval parses the
    model_args and builds the model): a memdec error is one ``Error:`` line and exit status 1."""
    command = [sys.executable, "-m", "memdec_core.lm_eval_model", "--model", "memdec",
               "--model_args", f"base={tiny_llama},memory={trained_memory},lamda=0.5", "--tasks", TASK,
               "--include_path", ".", "--batch_size", "4", "--output_path", str(tmp_path)]
    done = subprocess.run(command, cwd=TASKS, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")})
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [done.stderr.strip().splitlines()[-1]] and "Traceback" not in done.stderr, done.stderr
    assert "unknown model_args key 'lamda'; did you mean 'lam'" in errors[0]
    assert not list(tmp_path.rglob("results_*.json"))


def test_a_local_task_with_a_missing_field_or_file_is_one_line(tmp_path, monkeypatch, capsys):
    task = (TASKS / "tiny_mc.yaml").read_text()
    (tmp_path / "no_choice.yaml").write_text(task.replace(f"task: {TASK}", "task: no_choice")
                                             .replace('doc_to_choice: "{{choices}}"\n', ""))
    (tmp_path / "no_file.yaml").write_text(task.replace(f"task: {TASK}", "task: no_file"))
    monkeypatch.chdir(tmp_path)  # where tiny_mc.jsonl is not
    monkeypatch.setattr(sys, "argv", ["memdec-lm-eval"])
    with pytest.raises(SystemExit) as exit_status:
        main(["--model", "memdec", "--tasks", "no_choice", "--include_path", str(tmp_path)])
    assert exit_status.value.code == 1
    expected = f"Error: task 'no_choice' ({tmp_path / 'no_choice.yaml'}) lacks doc_to_choice"
    assert capsys.readouterr().err.strip() == expected
    with pytest.raises(ConfigError, match="task 'no_file' .*: data file tiny_mc.jsonl not found"):
        check_local_tasks(["--tasks", "no_file,other", "--include_path", str(tmp_path)])
    monkeypatch.chdir(TASKS)
    check_local_tasks(["--tasks", TASK, "--include_path", str(TASKS)])  # the good one passes from its folder


def test_a_learning_combiner_is_fitted_on_the_domain_and_scores_as_its_composite(tiny_llama, corpus_dir):
    """``--model_args combiner=adaptive,domain=D``: the composite's combiner is fitted on D's
    validation split (cached), and lm-eval's accuracy is what the fitted composite gives."""
    settings = {"knn-datastore": {"k": 8, "temperatures": (3.0,)}}
    lm = MemdecLM(base=str(tiny_llama), memory="knn-datastore", domain=str(corpus_dir), combiner="adaptive",
                  component_settings=settings, batch_size=4)
    composite = lm.model
    assert composite.combiner.learns and composite.combiner.state_dict()
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(TASKS), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tasks)
    again = api.composite_model(str(tiny_llama), "knn-datastore", domain=str(corpus_dir), combiner="adaptive",
                                component_settings=settings)  # the same fit, read back from the cache
    assert results["results"][TASK]["acc,none"] == pytest.approx(brute_force(again, again.tokenizer)[0])
    with pytest.raises(ConfigError, match="give the domain to fit it on"):
        MemdecLM(base=str(tiny_llama), memory="knn-datastore", combiner="adaptive", component_settings=settings)
