"""The example third-party plugin: installed with pip, listed, and each of its components used
through memdec's built-in methods — its retriever by knn-lm, its memory by mixture, in eval,
compare and generate — and its own test suite, which runs memdec's contract kit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "memdec-plugin-example"


@pytest.fixture(scope="module")
def installed_example():
    from memdec_core.components.plugins import reset_plugin_manager

    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-build-isolation", "--no-deps", "--no-index", str(EXAMPLE)],
                   check=True, capture_output=True, timeout=300)
    reset_plugin_manager()
    yield
    subprocess.run([*pip, "uninstall", "-y", "memdec-plugin-example"], check=True, capture_output=True)
    reset_plugin_manager()


def memdec(*args, env=None):
    return subprocess.run([sys.executable, "-m", "memdec_cli.main", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def as_json(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_example_plugin_is_listed_with_every_kind(installed_example):
    plugins = {p["name"]: p for p in as_json(memdec("plugins", "--json"))}
    assert plugins["example"]["status"] == "loaded"
    assert plugins["example"]["distribution"] == "memdec-plugin-example"
    assert plugins["example"]["hooks"] == ["memdec_register_combiners", "memdec_register_memory_models",
                                           "memdec_register_retrievers"]
    for kind, name in (("combiners", "product"), ("retrievers", "numpy-exact"), ("memory-models", "unigram")):
        rows = {row["name"]: row for row in as_json(memdec("list", kind, "--json"))}
        assert rows[name]["plugin"] == "example" and all(rows[name]["help"].values())
    disabled = as_json(memdec("list", "combiners", "--json", env={"MEMDEC_DISABLE_PLUGINS": "example"}))
    assert "product" not in {row["name"] for row in disabled}


def test_knn_lm_with_the_example_retriever_equals_faiss(installed_example, corpus_dir, tiny_gpt2):
    common = ["eval", "--domain", corpus_dir, "--base", tiny_gpt2, "--method", "knn-lm", "--context", 64,
              "--set", "knn-lm.k=16", "--format", "json"]
    faiss = as_json(memdec(*common, "--set", "faiss.factory=Flat"))["results"][0]
    exact = as_json(memdec(*common, "--set", "knn-lm.retriever=numpy-exact"))["results"][0]
    assert exact["knobs"] == faiss["knobs"]
    assert exact["test_ppl"] == pytest.approx(faiss["test_ppl"], rel=1e-4)
    assert exact["details"]["retriever"] == "numpy-exact"


def test_the_example_memory_in_eval_compare_and_generate(installed_example, corpus_dir, tiny_gpt2):
    window = ["--context", 64, "--stride", 32]
    evaluated = as_json(memdec("eval", "--domain", corpus_dir, "--base", tiny_gpt2, "--method", "base,mixture",
                               "--set", "mixture.memory=unigram", "--format", "json", *window))["results"]
    base, mixture = evaluated
    assert mixture["test_ppl"] < base["test_ppl"] and set(mixture["knobs"]) == {"lam"}
    compared = as_json(memdec("compare", "--domain", corpus_dir, "--base", tiny_gpt2, "--method", "base,mixture",
                              "--set", "mixture.memory=unigram", "--general-tokens", 200, "--latency-tokens", 100,
                              "--format", "json", *window))["results"]
    row = compared[1]
    assert row["method"] == "mixture" and row["test_ppl"] == pytest.approx(mixture["test_ppl"])
    for key in ("general_ppl", "latency_ratio", "params_added", "memory_bytes"):
        assert row[key] and row[key] > 0, key  # a complete row, from typed costs
    generated = memdec("generate", "--base", tiny_gpt2, "--memory", "unigram", "--domain", corpus_dir,
                       "--max-new-tokens", 5, *window, "the bank")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("the bank") and len(generated.stdout.rstrip("\n")) > len("the bank")


def test_the_example_runs_the_contract_kit_in_its_own_suite(installed_example):
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                            capture_output=True, text=True, timeout=600, cwd=EXAMPLE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
