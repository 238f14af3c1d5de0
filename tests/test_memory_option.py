"""One way to name a memory (issue 34): ``--memory NAME|FOLDER`` on eval, compare and tasks as on
generate; memories made by other code (a plain ``save_pretrained`` folder); removed flags that name
their replacement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMALL_WINDOWS, invoke, one_line_error

from memdec_core.errors import ConfigError
from memdec_core.runs.prepare import with_memory
from memdec_core.testing import save_tiny_model, save_tokenizer

WINDOW = ["--context", SMALL_WINDOWS["context"], "--stride", SMALL_WINDOWS["stride"]]


@pytest.fixture(scope="module")
def plain_memory(tmp_path_factory, trained_memory):
    """The trained memory as the official code leaves one: ``save_pretrained`` of model and
    tokenizer, no memdec.json."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("plain") / "memory"
    AutoModelForCausalLM.from_pretrained(trained_memory, dtype=torch.float32).save_pretrained(folder)
    AutoTokenizer.from_pretrained(trained_memory).save_pretrained(folder)
    assert not (folder / "memdec.json").exists()
    return folder


def test_eval_memory_is_set_memdec_path(corpus_dir, tiny_llama, trained_memory):
    """`memdec eval --memory DIR` used to be refused ("Did you mean '--method'?"); it now runs base and
    memdec with the memory of DIR, the numbers of --set memdec.path=DIR."""
    given = invoke("eval", "--domain", corpus_dir, "--base", tiny_llama, "--memory", trained_memory,
                   "--format", "json", *WINDOW)
    assert given.exit_code == 0, given.output
    rows = json.loads(given.stdout)["results"]
    assert [row["method"] for row in rows] == ["base", "memdec"]
    assert rows[1]["details"]["memory_folder"] == str(Path(trained_memory).resolve())
    by_setting = invoke("eval", "--domain", corpus_dir, "--base", tiny_llama, "--method", "memdec",
                        "--set", f"memdec.path={trained_memory}", "--format", "json", *WINDOW)
    assert by_setting.exit_code == 0, by_setting.output
    assert json.loads(by_setting.stdout)["results"][0]["test_ppl"] == rows[1]["test_ppl"]


def test_the_memory_named_twice_or_to_no_method_is_one_line(corpus_dir, tiny_llama, trained_memory):
    twice = invoke("eval", "--domain", corpus_dir, "--base", tiny_llama, "--memory", trained_memory,
                   "--method", "memdec", "--set", f"memdec.path={trained_memory}", *WINDOW)
    assert "the memory is named twice" in one_line_error(twice)
    compared = invoke("compare", "--domain", corpus_dir, "--base", tiny_llama, "--memory", "knn-datastore",
                      "--method", "base,mixture", "--set", "mixture.memory=unigram", *WINDOW)
    assert "--set mixture.memory=unigram" in one_line_error(compared)
    tasks = invoke("tasks", "--domain", corpus_dir, "--base", tiny_llama, "--memory", trained_memory,
                   "--method", "base,lora", "--tasks", "sst2")
    assert "none of the methods base, lora mixes it; add memdec" in one_line_error(tasks)
    unknown = invoke("eval", "--domain", corpus_dir, "--memory", "knn-datastor", *WINDOW)
    assert "did you mean 'knn-datastore'" in one_line_error(unknown)


def test_with_memory_hands_the_memory_to_every_method_that_mixes_it(trained_memory):
    folder = str(Path(trained_memory).resolve())
    methods, settings = with_memory(str(trained_memory), ["base", "memdec", "mixture", "knn-lm"], {})
    assert methods == ["base", "memdec", "mixture", "knn-lm"]
    assert settings == {"memdec": {"path": folder}, "mixture": {"memory": "memory-decoder"},
                        "memory-decoder": {"path": folder}}
    methods, settings = with_memory(str(trained_memory), [], {"faiss": {"nprobe": "8"}})  # compare's default list
    assert "memdec" in methods and settings["memdec"] == {"path": folder} and settings["faiss"] == {"nprobe": "8"}
    assert with_memory("knn-datastore", ["base"], None) == (["base", "knn-lm"], {})
    assert with_memory(None, ["base"], {"knn-lm": {"k": 8}}) == (["base"], {"knn-lm": {"k": 8}})
    with pytest.raises(ConfigError, match="none of the methods lora mixes it; add knn-lm"):
        with_memory("knn-datastore", ["lora"], {})


def test_a_plain_save_pretrained_memory_is_evaluated(corpus_dir, tiny_llama, trained_memory, plain_memory):
    """A memory folder without memdec.json (made by the official code) was refused ("not a memdec
    artifact"); it opens with a one-line warning and mixes exactly as the same weights do in memdec."""
    plain = invoke("eval", "--domain", corpus_dir, "--base", tiny_llama, "--memory", plain_memory,
                   "--method", "memdec", "--format", "json", *WINDOW)
    assert plain.exit_code == 0, plain.output
    warnings = [line for line in plain.stderr.splitlines() if "no memdec.json" in line]
    assert len(warnings) == 1 and "teacher, data and training are unknown" in warnings[0]
    row = json.loads(plain.stdout)["results"][0]
    ours = invoke("eval", "--domain", corpus_dir, "--base", tiny_llama, "--memory", trained_memory,
                  "--method", "memdec", "--format", "json", *WINDOW)
    assert row["test_ppl"] == pytest.approx(json.loads(ours.stdout)["results"][0]["test_ppl"], rel=1e-6)
    assert row["details"]["teacher"] is None and row["memory"].get("target_kl") is None
    by_setting = invoke("eval", "--domain", corpus_dir, "--base", tiny_llama, "--method", "memdec",
                        "--set", f"memdec.path={plain_memory}", "--format", "json", *WINDOW)
    assert json.loads(by_setting.stdout)["results"][0]["test_ppl"] == row["test_ppl"]


def test_a_plain_memory_of_another_tokenizer_is_refused_in_one_line(corpus_dir, tiny_llama, tmp_path):
    other = save_tiny_model(tmp_path / "other", save_tokenizer(tmp_path / "tokenizer", vocab_size=280),
                            family="llama")
    refused = invoke("eval", "--domain", corpus_dir, "--base", tiny_llama, "--memory", other, *WINDOW)
    assert "was trained with another tokenizer" in one_line_error(refused)


def test_a_removed_flag_names_its_replacement(corpus_dir, tiny_llama):
    """`datastore build --factory` was removed without a word (click guessed a neighbour); it now
    says what replaced it, with the value given."""
    result = invoke("datastore", "build", "--domain", corpus_dir, "--base", tiny_llama, "--factory", "IVF64,Flat")
    assert result.exit_code == 2
    assert "--factory was removed; use --set faiss.factory=IVF64,Flat" in result.output
    nprobe = invoke("datastore", "build", "--domain", corpus_dir, "--base", tiny_llama, "--nprobe", "4")
    assert "use --set faiss.nprobe=4" in nprobe.output
    assert "--factory" not in invoke("datastore", "build", "--help").output
