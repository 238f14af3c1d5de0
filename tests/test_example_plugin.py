"""The example third-party plugin: installed with pip, listed, and used in an evaluation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "memdec-plugin-example"


@pytest.fixture
def installed_example(fresh_plugins):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-build-isolation", "--no-deps", "--no-index", str(EXAMPLE)],
                   check=True, capture_output=True, timeout=300)
    from memdec_core.plugins import reset_plugin_manager

    reset_plugin_manager()
    yield
    subprocess.run([*pip, "uninstall", "-y", "memdec-plugin-example"], check=True, capture_output=True)


def memdec(*args):
    return subprocess.run([sys.executable, "-m", "memdec_cli.main", *args], capture_output=True,
                          text=True, timeout=300)


def test_example_plugin_is_listed_and_usable(installed_example, corpus_dir, tiny_gpt2):
    plugins = {p["name"]: p for p in json.loads(memdec("plugins", "--json").stdout)}
    assert plugins["example"]["status"] == "loaded"
    assert plugins["example"]["distribution"] == "memdec-plugin-example"
    assert plugins["example"]["hooks"] == ["memdec_register_combiners"]
    combiners = {row["name"]: row for row in json.loads(memdec("list", "combiners", "--json").stdout)}
    assert combiners["product"]["plugin"] == "example"

    result = memdec("eval", "--domain", str(corpus_dir), "--base", str(tiny_gpt2), "--method", "base,knn-lm",
                    "--combiner", "product", "--context", "64", "--set", "knn-lm.k=16",
                    "--set", "knn-lm.temperatures=10", "--format", "json")
    assert result.returncode == 0, result.stderr
    rows = {row["method"]: row for row in json.loads(result.stdout)["results"]}
    assert "alpha" in rows["knn-lm"]["knobs"]
    assert rows["knn-lm"]["test_ppl"] < rows["base"]["test_ppl"]

    disabled = subprocess.run([sys.executable, "-m", "memdec_cli.main", "list", "combiners", "--json"],
                              capture_output=True, text=True, env={**__import__("os").environ,
                                                                    "MEMDEC_DISABLE_PLUGINS": "example"})
    assert "product" not in {row["name"] for row in json.loads(disabled.stdout)}
