"""Components by name: one mixture path, settings for any component, plugins that depend on each
other or break, memories of another tokenizer, cache keys that follow the code."""

import json
import os
import subprocess
import sys
import types

import pytest
from conftest import QUICK_MEMORY, SMALL_WINDOWS

from memdec_core import api
from memdec_core.components import registry
from memdec_core.components.plan import Plan
from memdec_core.components.plugins import register_plugin, unregister_plugin
from memdec_core.components.registry import plugin_records
from memdec_core.errors import ModelError, PluginError
from memdec_core.hookspecs import hookimpl
from memdec_core.interfaces import EvalSettings, MemoryModel

WINDOW = EvalSettings(**SMALL_WINDOWS)


def evaluate(corpus_dir, model, methods, settings, **options):
    return {row["method"]: row for row in api.evaluate(str(corpus_dir), [str(model)], methods, settings=WINDOW,
                                                       method_settings=settings, **options)["results"]}


def test_mixture_with_the_knn_memory_equals_knn_lm(corpus_dir, tiny_gpt2):
    """The route only: knn-lm is the mixture path with its memory fixed, so this checks that the
    settings reach the same memory both ways. Whether the number is kNN-LM's is
    test_knn.py's brute-force test."""
    knn = {"k": 16, "temperatures": (3.0, 10.0)}
    rows = evaluate(corpus_dir, tiny_gpt2, ["knn-lm", "mixture"],
                    {"knn-lm": knn, "mixture": {"memory": "knn-datastore"}, "knn-datastore": knn})
    assert rows["mixture"]["test_ppl"] == rows["knn-lm"]["test_ppl"]
    assert rows["mixture"]["knobs"] == rows["knn-lm"]["knobs"] and rows["mixture"]["tuning"] == rows["knn-lm"]["tuning"]
    assert rows["mixture"]["costs"] == rows["knn-lm"]["costs"]


def test_mixture_with_the_decoder_equals_memdec(corpus_dir, tiny_llama, trained_memory):
    rows = evaluate(corpus_dir, tiny_llama, ["memdec", "mixture"],
                    {"memdec": {"path": str(trained_memory)}, "mixture": {"memory": "memory-decoder"},
                     "memory-decoder": {"path": str(trained_memory)}})
    assert rows["mixture"]["test_ppl"] == rows["memdec"]["test_ppl"]
    assert rows["mixture"]["knobs"] == rows["memdec"]["knobs"]


def test_a_method_s_name_sets_its_memory_and_wins_over_the_memory_s_own(corpus_dir, tiny_gpt2):
    plan = Plan({"knn-lm": {"k": "12"}, "knn-datastore": {"k": "99", "temperatures": "3"}})
    method = plan.create("methods", "knn-lm")
    assert method.config.k == 12 and method.config.temperatures == (3.0,)
    (_, _), (_, memory), (_, retriever) = plan.resolve([method])
    assert memory.name == "knn-datastore" and memory.config.k == 12 and retriever.name == "faiss"


def test_settings_reach_retrievers_and_fix_combiner_knobs(corpus_dir, tiny_gpt2):
    plan = Plan({"faiss": {"nprobe": "7", "factory": "Flat"}})
    assert plan.create("retrievers", "faiss").config.nprobe == 7
    # Not "Flat": a small store's "auto" is that index already, which a run may have built before.
    rows = evaluate(corpus_dir, tiny_gpt2, ["knn-lm"], {"knn-lm": {"k": 16, "temperatures": (3.0, 10.0)},
                                                        "faiss": {"factory": "IVF16,Flat", "nprobe": 16},
                                                        "linear": {"lam": 0.4}})
    row = rows["knn-lm"]
    assert row["knobs"]["lam"] == 0.4 and len(row["tuning"]) == 2  # λ fixed, T still tuned
    index = json.loads(open(os.path.join(row["details"]["index"], "memdec.json")).read())
    assert index["settings"]["factory"] == "IVF16,Flat"


def test_the_default_comparison_is_declared_by_the_methods():
    assert api.default_methods() == ["base", "dapt", "lora", "knn-lm", "rag", "memdec"]
    assert registry.get("methods", "mixture").compare_rank is None


def test_lora_s_automatic_rank_matches_the_memory_of_the_run(corpus_dir, tiny_llama):
    from memdec_core.api import prepare_context
    from memdec_peft.methods import auto_rank, lora_targets

    memory = {"teacher": str(tiny_llama), "init": str(tiny_llama), **QUICK_MEMORY, "epochs": 1}
    rows = evaluate(corpus_dir, tiny_llama, ["lora", "memdec"], {"lora": {"epochs": 1, "lrs": (3e-3,)},
                                                                "memdec": memory})
    ctx = prepare_context(str(corpus_dir), str(tiny_llama), WINDOW)
    expected = auto_rank(ctx.base.model, lora_targets(ctx.base.model), rows["memdec"]["costs"]["params_added"])
    assert rows["lora"]["knobs"]["rank"] == expected > 1
    alone = evaluate(corpus_dir, tiny_llama, ["lora"], {"lora": {"epochs": 1, "lrs": (3e-3,)}})
    assert alone["lora"]["knobs"]["rank"] == 8  # nothing to match: the fallback rank


class Stranger(MemoryModel):
    """A memory that declares another tokenizer than the base's."""

    name = "stranger"

    def prepare(self, ctx):
        self.tokenizer_fingerprint = "another-tokenizer"

    def score(self, batch):
        return None

    def gold_logprobs(self, state, batch, knobs):
        raise AssertionError("never mixed")

    logprobs = gold_logprobs

    def stepper(self, knobs):
        raise AssertionError("never mixed")


@pytest.fixture
def stranger_plugin(fresh_plugins):
    register_plugin(types.SimpleNamespace(memdec_register_memory_models=hookimpl(lambda: [Stranger])), name="strange")
    yield
    unregister_plugin("strange")


def test_a_memory_of_another_tokenizer_is_refused(stranger_plugin, corpus_dir, tiny_gpt2):
    with pytest.raises(ModelError, match="memory 'stranger' uses another tokenizer"):
        evaluate(corpus_dir, tiny_gpt2, ["mixture"], {"mixture": {"memory": "stranger"}})


def test_a_disabled_dependency_is_a_one_line_error(corpus_dir, tiny_llama, monkeypatch, fresh_plugins):
    monkeypatch.setenv("MEMDEC_DISABLE_PLUGINS", "knn")
    with pytest.raises(PluginError, match="memdec \\(plugin decoder\\) needs plugin 'knn', which is disabled"):
        evaluate(corpus_dir, tiny_llama, ["memdec"], {})
    result = subprocess.run([sys.executable, "-m", "memdec_cli.main", "eval", "--domain", str(corpus_dir),
                             "--base", str(tiny_llama), "--method", "memdec", "--context", "64"],
                            capture_output=True, text=True, env={**os.environ, "MEMDEC_DISABLE_PLUGINS": "knn"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: memdec (plugin decoder) needs plugin 'knn', which is disabled (MEMDEC_DISABLE_PLUGINS)"]


def raising_hook():
    raise RuntimeError("database unreachable")


def test_a_registration_hook_that_raises_marks_its_plugin_failed(fresh_plugins):
    register_plugin(types.SimpleNamespace(memdec_register_methods=hookimpl(raising_hook)), name="flaky")
    assert "knn-lm" in registry.names("methods")  # every other plugin keeps working
    record = next(record for record in plugin_records() if record.name == "flaky")
    assert record.status == "failed"
    assert "memdec_register_methods raised RuntimeError: database unreachable" in record.error


def test_the_cli_survives_a_hook_that_raises(tmp_path):
    from test_plugins import fake_distribution

    fake_distribution(tmp_path, {"flaky": "flaky_memdec_plugin"}, {"flaky_memdec_plugin": """
        from memdec_core.hookspecs import hookimpl

        @hookimpl
        def memdec_register_retrievers():
            raise RuntimeError("database unreachable")
    """})
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def memdec(*args):
        return subprocess.run([sys.executable, "-m", "memdec_cli.main", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    plugins = {record["name"]: record for record in json.loads(memdec("plugins", "--json").stdout)}
    assert plugins["flaky"]["status"] == "failed" and "database unreachable" in plugins["flaky"]["error"]
    listed = memdec("list", "retrievers", "--json")
    assert listed.returncode == 0 and "faiss" in listed.stdout


CONSTANT_PLUGIN = """
from memdec_core.hookspecs import hookimpl
from memdec_core.interfaces import Costs, Method, MethodResult


class Constant(Method):
    \"\"\"A method whose result its code decides (for cache-key tests).\"\"\"

    name = "constant"
    calls = 0

    def evaluate(self, ctx):
        Constant.calls += 1
        return MethodResult(10.0, costs=Costs())


@hookimpl
def memdec_register_methods():
    return [Constant]
"""


def test_editing_a_plugin_s_code_or_a_combiner_file_measures_the_row_again(fresh_plugins, tmp_path, corpus_dir,
                                                                         tiny_gpt2, monkeypatch):
    """A plugin registered from a module on the path (like one installed editable) is keyed by its
    code's hash: an edit, even of a comment, makes its rows stale."""
    import importlib

    from memdec_core.runs.compare import CompareSettings, compare

    module_file = tmp_path / "constant_plugin.py"
    module_file.write_text(CONSTANT_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin = importlib.import_module("constant_plugin")
    register_plugin(plugin, name="constant-plugin")
    measure = CompareSettings(general="", latency_tokens=50, latency_seconds=0)

    def run(combiner="linear"):
        compare(str(corpus_dir), [str(tiny_gpt2)], ["constant"], settings=WINDOW, combiner=combiner, measure=measure)
        return plugin.Constant.calls

    assert run() == 1 and run() == 1  # the second run read the row back
    module_file.write_text(CONSTANT_PLUGIN + "\n# edited\n")
    assert run() == 2
    combiner_file = tmp_path / "mine.py"
    combiner_file.write_text("from memdec_core.interfaces import combiner\n\n"
                             "@combiner('half', elementwise=True)\n"
                             "def half(base, memory, context):\n"
                             "    return base\n")
    assert run(f"{combiner_file}:half") == 3 and run(f"{combiner_file}:half") == 3
    combiner_file.write_text(combiner_file.read_text() + "# edited\n")
    assert run(f"{combiner_file}:half") == 4


def test_a_component_s_identity_is_the_same_before_and_after_the_registry_collects_its_kind(monkeypatch):
    """A cache key made before the registry collects a kind (a datastore's key, early in a run)
    once differed from one made after (the plugin unknown, then known): the same datastore was
    built twice in one run."""
    from memdec_core.components.identity import component_identity
    from memdec_knn.memory import KnnDatastore

    after = component_identity(registry.get("memory-models", "knn-datastore"))
    assert after["plugin"] == "knn" and after["distribution"] == "memdec"
    monkeypatch.setattr(KnnDatastore, "plugin", None)  # as a fresh process has it before collection
    monkeypatch.setattr(registry, "_tables", {})  # nothing collected yet
    assert component_identity(KnnDatastore) == after
