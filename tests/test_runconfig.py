"""One run, one config: --config files, shared window defaults, and the report's meta."""

import dataclasses
import json
import resource
import subprocess
import sys
from datetime import datetime, timezone

import pytest
from conftest import invoke, one_line_error

from memdec_core.errors import ConfigError
from memdec_core.interfaces import EvalSettings
from memdec_core.runs.meta import SCHEMA_VERSION, run_meta
from memdec_core.runs.runconfig import (
    QUICK_EVAL_TOKENS,
    QUICK_TRAIN_TOKENS,
    budget_from_fields,
    load_run_config,
    parse_budget,
    window_settings,
)

META_KEYS = {"schema_version", "versions", "seeds", "git", "device", "world_size", "dtype", "precision", "contexts",
             "command", "timestamp", "config", "settings", "combiner", "bases", "methods"}


@pytest.fixture
def captured(monkeypatch):
    """memdec eval and memdec compare with the work replaced by a record of what they were asked."""
    import memdec_core.api as api_module
    import memdec_core.runs.compare as compare_module

    calls = {}

    def fake_evaluate(domain, bases, methods, **options):
        calls["eval"] = dict(domain=domain, bases=bases, methods=methods, **options)
        return {"domain": domain, "results": [], "settings": {}, "combiner": "linear",
                "meta": {"config": options["config"]}}

    def fake_compare(domain, bases, methods, **options):
        calls["compare"] = dict(domain=domain, bases=bases, methods=methods, **options)
        return {"domain": domain, "results": [], "meta": {}}

    monkeypatch.setattr(api_module, "evaluate", fake_evaluate)
    monkeypatch.setattr(compare_module, "compare", fake_compare)
    return calls


YAML_EVAL = """\
domain: finance
bases: [memdec-demo-s, memdec-demo-m]
methods: [base, knn-lm]
combiner: linear
context: 64
stride: 16
batch_size: 2
max_train_tokens: 0        # the whole split
max_eval_tokens: 1000
format: json
output: {output}
settings:
  knn-lm: {{k: 256, temperatures: [3, 10]}}
  faiss:
    nprobe: 8
"""

TOML_COMPARE = """\
domain = "law"
bases = ["memdec-demo-s"]
methods = ["base", "lora", "memdec"]
lam = 0.25
budget = "64k"
general_tokens = 300
latency_tokens = 200
fresh = true
max_train_tokens = 5000
format = "json"

[settings.lora]
epochs = 1
"""


def test_a_yaml_config_drives_eval(captured, tmp_path):
    output = tmp_path / "run.json"
    config = tmp_path / "run.yaml"
    config.write_text(YAML_EVAL.format(output=output))
    result = invoke("eval", "--config", config)
    assert result.exit_code == 0, result.output
    call = captured["eval"]
    assert call["domain"] == "finance" and call["bases"] == ("memdec-demo-s", "memdec-demo-m")
    assert call["methods"] == ["base", "knn-lm"]
    assert call["settings"] == EvalSettings(context=64, stride=16, batch_size=2, max_train_tokens=None,
                                            max_eval_tokens=1000)
    assert call["component_settings"] == {"knn-lm": {"k": "256", "temperatures": "3,10"}, "faiss": {"nprobe": "8"}}
    meta_config = call["config"]
    assert meta_config["file"] == str(config) and meta_config["overridden"] == []
    assert meta_config["values"]["max_train_tokens"] == 0 and meta_config["values"]["output"] == str(output)
    assert json.loads(output.read_text())["meta"]["config"]["values"]["bases"] == ["memdec-demo-s", "memdec-demo-m"]


def test_a_toml_config_drives_compare(captured, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(TOML_COMPARE)
    result = invoke("compare", "--config", config)
    assert result.exit_code == 0, result.output
    call = captured["compare"]
    assert call["domain"] == "law" and call["methods"] == ["base", "lora", "memdec"]
    assert call["combiner"].config.lam == 0.25
    assert call["settings"].max_train_tokens == 5000 and call["settings"].max_eval_tokens == QUICK_EVAL_TOKENS
    measure = call["measure"]
    assert measure.budget() == {"budget_tokens": 64000} and not measure.reuse_results
    assert (measure.general_tokens, measure.latency_tokens) == (300, 200)
    assert call["component_settings"] == {"lora": {"epochs": "1"}}
    config_meta = call["config"]  # the CLI hands its resolved options to compare, for the meta
    assert config_meta["file"] == str(config) and config_meta["values"]["budget"] == "64000"
    assert config_meta["values"]["fresh"] is True and isinstance(call["command"], list)


@pytest.mark.parametrize("command, text, named", [
    ("eval", "domain: finance\nmax_tokens: 100\n", "unknown key 'max_tokens'"),
    ("eval", "domain: finance\nmax-train-tokens: 100\n", "did you mean 'max_train_tokens'"),
    ("eval", "domain: finance\nbudget: 0\n", "budget is an option of memdec compare"),
    ("eval", "domain: finance\ncontext: long\n", "context must be an integer of at least 2, got 'long'"),
    ("eval", "domain: finance\nbatch_size: true\n", "batch_size must be"),
    ("eval", "domain: finance\nmethods: base,knn-lm\n", "methods must be a list of method names"),
    ("eval", "domain: finance\nmax_eval_tokens: 1\n", "max_eval_tokens must be 0 (the whole split)"),
    ("eval", "domain: finance\nformat: csv\n", "format must be one of table, json, markdown"),
    ("eval", "domain: finance\nsettings: {knn-lm: 5}\n", "settings.knn-lm must be a mapping"),
    ("eval", "domain: finance\nsettings: {knn-lm: {k: null}}\n", "settings.knn-lm.k must be"),
    ("eval", "domain: [finance\n", "not valid YAML"),
    ("compare", "domain: finance\nbudget: lots\n", "budget must be 'equal', 0"),
    ("compare", "domain: finance\nlam: 2\n", "lam must be a number from 0 to 1, got 2"),
])
def test_a_bad_key_is_one_line_naming_the_key_and_the_file(captured, tmp_path, command, text, named):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    line = one_line_error(invoke(command, "--config", config))
    assert named in line and str(config) in line
    assert not captured  # nothing ran


def test_a_bad_toml_file_and_a_missing_file_are_one_line(captured, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('domain = "finance"\ncontext = 64.5\n')
    line = one_line_error(invoke("eval", "--config", config))
    assert "context must be an integer" in line and str(config) in line
    config.write_text("domain = \n")
    assert "not valid TOML" in one_line_error(invoke("eval", "--config", config))
    missing = tmp_path / "missing.yaml"
    assert str(missing) in one_line_error(invoke("eval", "--config", missing))
    other = tmp_path / "run.json"
    other.write_text("{}")
    assert "must be YAML (.yaml, .yml) or TOML (.toml)" in one_line_error(invoke("eval", "--config", other))


def test_a_flag_given_with_the_file_wins_and_is_listed_as_overridden(captured, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("domain: finance\ncontext: 64\nmax_eval_tokens: 1000\nmethods: [base]\n"
                      "settings: {knn-lm: {k: 256, temperatures: [3]}}\n")
    result = invoke("eval", "--config", config, "--context", 128, "--method", "base,knn-lm",
                    "--set", "knn-lm.k=16", "--set", "faiss.nprobe=4")
    assert result.exit_code == 0, result.output
    call = captured["eval"]
    assert call["settings"].context == 128 and call["settings"].max_eval_tokens == 1000  # the file fills the rest
    assert call["methods"] == ["base", "knn-lm"]
    assert call["component_settings"] == {"knn-lm": {"k": "16", "temperatures": "3"}, "faiss": {"nprobe": "4"}}
    assert call["config"]["overridden"] == ["context", "methods", "settings.knn-lm.k"]
    assert call["config"]["values"]["context"] == 128
    # a flag given at its default value still counts as given: the source decides, not the value
    invoke("eval", "--config", config, "--max-eval-tokens", QUICK_EVAL_TOKENS)
    assert captured["eval"]["config"]["overridden"] == ["max_eval_tokens"]


def test_the_domain_may_come_from_either_but_is_required(captured, tmp_path):
    missing = invoke("eval")
    assert missing.exit_code == 2 and "Missing option '--domain'" in missing.output
    config = tmp_path / "run.yaml"
    config.write_text("methods: [base]\n")
    assert invoke("compare", "--config", config).exit_code == 2
    assert invoke("eval", "--config", config, "--domain", "law").exit_code == 0
    assert captured["eval"]["domain"] == "law"


def test_eval_and_compare_share_the_window_defaults_and_the_meaning_of_zero(captured):
    assert invoke("eval", "--domain", "finance").exit_code == 0
    assert invoke("compare", "--domain", "finance").exit_code == 0
    assert captured["eval"]["settings"] == captured["compare"]["settings"]
    assert (captured["eval"]["settings"].max_train_tokens, captured["eval"]["settings"].max_eval_tokens) == \
        (QUICK_TRAIN_TOKENS, QUICK_EVAL_TOKENS)
    whole = ["--domain", "finance", "--max-train-tokens", "0", "--max-eval-tokens", "0"]
    assert invoke("eval", *whole).exit_code == 0 and invoke("compare", *whole).exit_code == 0
    for command in ("eval", "compare"):
        settings = captured[command]["settings"]
        assert settings.max_train_tokens is None and settings.max_eval_tokens is None
        assert invoke(command, "--domain", "finance", "--max-train-tokens", "1").exit_code == 2
    assert window_settings({}) == EvalSettings(max_train_tokens=QUICK_TRAIN_TOKENS, max_eval_tokens=QUICK_EVAL_TOKENS)


def test_the_python_api_reads_the_same_files(tmp_path):
    config = tmp_path / "run.yml"
    config.write_text("domain: finance\nmax_eval_tokens: 0\nsettings: {linear: {lam: 0.5}}\n")
    values = load_run_config(config, "eval")
    assert values == {"domain": "finance", "max_eval_tokens": 0, "settings": {"linear": {"lam": "0.5"}}}
    assert window_settings(values).max_eval_tokens is None
    assert window_settings(values).max_train_tokens == QUICK_TRAIN_TOKENS
    config.write_text("plot: x.png\n")
    assert load_run_config(config, "compare") == {"plot": "x.png"}
    with pytest.raises(ConfigError, match="plot is an option of memdec compare, not of memdec eval"):
        load_run_config(config, "eval")


@pytest.mark.parametrize("text", ["equal", "0", "64000", "2000000000000flops", "2500.5flops"])
def test_a_budget_goes_back_to_the_text_that_gives_it(text):
    fields = parse_budget(text)
    assert parse_budget(budget_from_fields(fields)) == fields


def test_run_meta_has_every_key_and_is_json(tmp_path):
    settings = EvalSettings(context=64, max_train_tokens=500)
    config = {"file": tmp_path / "run.yaml", "overridden": ["context"], "values": {"bases": ("a",)}}
    meta = run_meta(settings=settings, bases=["a", "b"], methods=["base"], combiner="linear",
                    contexts={"a": {"context": 64, "stride": 32, "dtype": "float32"},
                              "b": {"context": 64, "stride": 32, "dtype": "float32"}},
                    config=config, extra={"protocol": "equal-flops"})
    assert set(meta) == META_KEYS | {"protocol"} and meta["schema_version"] == SCHEMA_VERSION == 1
    assert json.loads(json.dumps(meta, allow_nan=False)) == meta
    assert set(meta["versions"]) >= {"memdec", "python", "torch", "transformers", "peft", "faiss", "bm25s"}
    assert meta["seeds"] == {"eval": 0} and meta["dtype"] == "float32" and meta["command"] is None
    assert meta["contexts"]["a"] == {"context": 64, "stride": 32, "dtype": "float32"}
    assert meta["config"]["file"] == str(tmp_path / "run.yaml") and meta["config"]["values"] == {"bases": ["a"]}
    assert meta["settings"] == dataclasses.asdict(settings)
    assert datetime.fromisoformat(meta["timestamp"]).utcoffset() == timezone.utc.utcoffset(None)
    bare = run_meta(settings=settings, bases=[], methods=[], combiner="linear", contexts={}, command=["memdec"])
    assert bare["dtype"] == "float32" and bare["command"] == ["memdec"]
    assert bare["config"]["values"]["max_train_tokens"] == 500 and bare["config"]["values"]["max_eval_tokens"] == 0


def test_a_real_evaluate_reports_the_resolved_window(corpus_dir, tiny_llama):
    from memdec_core import api

    report = api.evaluate(str(corpus_dir), [str(tiny_llama)], ["base"], settings=EvalSettings(context=64),
                          method_settings={"linear": {"lam": 0.5}})
    assert {"domain", "results", "settings", "combiner", "meta"} <= set(report)
    meta = report["meta"]
    assert set(meta) == META_KEYS | {"token_caps", "timings"} and meta["schema_version"] == SCHEMA_VERSION
    assert meta["token_caps"] == {"applied_as": "none"}  # no cap given: the whole splits
    from memdec_core.inputs.models import load_model

    tokenizer = load_model(str(tiny_llama)).tokenizer_fingerprint
    assert meta["contexts"] == {str(tiny_llama): {"context": 64, "stride": 32, "dtype": "float32",
                                                  "tokenizer": tokenizer}}
    assert meta["dtype"] == "float32" and meta["command"] is None and meta["bases"] == [str(tiny_llama)]
    assert meta["config"]["values"]["domain"] == str(corpus_dir)
    assert meta["config"]["values"]["settings"] == {"linear": {"lam": 0.5}}
    assert report["settings"]["context"] == 64  # the keys that were there stay as they were
    json.dumps(report, allow_nan=False)


def test_the_cli_report_has_the_resolved_window_and_the_config(corpus_dir, tiny_llama, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"domain: {corpus_dir}\nbases: [{tiny_llama}]\nmethods: [base]\nformat: json\n")
    result = invoke("eval", "--config", config, "--context", 64)
    assert result.exit_code == 0, result.output
    meta = json.loads(result.stdout)["meta"]
    assert meta["contexts"][str(tiny_llama)]["context"] == 64 and meta["contexts"][str(tiny_llama)]["stride"] == 32
    assert meta["config"]["file"] == str(config) and meta["config"]["overridden"] == []
    assert meta["config"]["values"]["context"] == 64 and isinstance(meta["command"], list)


# ----------------------------------------------------------------------------------------------
# Hostile files: a config must be refused quickly, in one short line, whatever it holds.

def _alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A "billion laughs" under methods: each level a list of ``width`` aliases of the level before."""
    lines = ["domain: finance", "methods:", f"  - &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"  - &l{n} [{', '.join([f'*l{n - 1}'] * width)}]" for n in range(1, levels)]
    return "\n".join(lines) + "\n"


def _merge_bomb(levels: int = 9, width: int = 9) -> str:
    """The same through YAML merge keys (<<), which older PyYAML releases copy out one by one."""
    lines = ["domain: finance", "settings:", f"  m0: &m0 {{{', '.join(f'k{i}: 1' for i in range(width))}}}"]
    lines += [f"  m{n}: &m{n} {{<<: [{', '.join([f'*m{n - 1}'] * width)}]}}" for n in range(1, levels)]
    return "\n".join(lines) + "\n"


def _guarded(*args: str) -> subprocess.CompletedProcess:
    """Python in a child with 2 GiB of address space and a 20 s deadline: a file that is not refused
    fails the test (MemoryError or timeout) instead of taking this machine's memory."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=20, preexec_fn=limit)


LOAD = """
import sys, time
from memdec_core.errors import ConfigError
from memdec_core.runs.runconfig import load_run_config
start = time.perf_counter()
try:
    load_run_config(sys.argv[1], sys.argv[2])
except ConfigError as error:
    print(f"{time.perf_counter() - start:.3f} {error}")
"""


@pytest.mark.parametrize("bomb", [_alias_bomb, _merge_bomb])
def test_an_alias_bomb_is_refused_within_seconds_in_a_short_line(tmp_path, bomb):
    config = tmp_path / "bomb.yaml"
    config.write_text(bomb())
    seconds, message = _refusal(config, "eval")
    assert seconds < 5
    assert str(config) in message and "more than 10,000 values" in message and len(message) < 300


def _refusal(config, command: str) -> tuple[float, str]:
    """The seconds load_run_config took to refuse ``config`` and its message (in a guarded child)."""
    child = _guarded("-c", LOAD, str(config), command)
    assert child.returncode == 0 and child.stdout, child.stderr[-2000:]
    seconds, message = child.stdout.strip().split(" ", 1)
    return float(seconds), message


def test_a_long_budget_is_refused_at_once(tmp_path):
    config = tmp_path / "budget.yaml"  # parse_budget's pattern takes quadratic time: 20k digits, ~30 s
    config.write_text(f"budget: '{'1' * 20_000}x'\n")
    seconds, message = _refusal(config, "compare")
    assert seconds < 1 and "budget must be 'equal'" in message and len(message) < 300


def test_the_cli_refuses_an_alias_bomb_in_one_line(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(_alias_bomb())
    child = _guarded("-c", "from memdec_cli.main import main; main()", "eval", "--config", str(config))
    assert child.returncode == 1, child.stderr[-2000:]
    lines = child.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: config file") and len(lines[0]) < 300


def test_a_config_may_use_a_few_aliases(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("domain: finance\nbases: &bases [memdec-demo-s, memdec-demo-m]\nmethods: [base, knn-lm]\n"
                      "settings:\n  knn-lm: &knn {k: 256, temperatures: [3, 10]}\n"
                      "  knn-lm-big: {<<: *knn, k: 1024}\n")
    values = load_run_config(config, "eval")
    assert values["settings"] == {"knn-lm": {"k": "256", "temperatures": "3,10"},
                                  "knn-lm-big": {"k": "1024", "temperatures": "3,10"}}


HUGE = "x" * 100_000


@pytest.mark.parametrize("name, text, named", [
    ("value.yaml", f"domain: finance\ncontext: {HUGE}\n", "context must be an integer of at least 2, got 'xxx"),
    ("list.yaml", f"methods: [base, [{HUGE}]]\n", "methods must be a list of method names, got ['base'"),
    ("key.yaml", f"? {HUGE}\n: 1\n", "unknown key 'xxx"),
    ("name.yaml", f"settings:\n  ? {HUGE}\n  : 5\n", "settings.xxx"),
    ("setting.yaml", f"settings: {{knn-lm: {{k: {{a: {HUGE}}}}}}}\n", "settings.knn-lm.k must be a string"),
    ("syntax.yaml", f"domain: [{HUGE}, \n", "not valid YAML"),
    ("value.toml", f'context = "{HUGE}"\n', "context must be an integer of at least 2, got 'xxx"),
    ("syntax.toml", f'domain = "{HUGE}\n', "not valid TOML"),
])
def test_a_huge_value_is_shortened_in_the_error(tmp_path, name, text, named):
    config = tmp_path / name
    config.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_run_config(config, "eval")
    message = str(raised.value)
    assert named in message and str(config) in message and len(message) < 300, message[:1000]


def test_a_huge_component_name_is_shortened_in_the_error(tmp_path):
    config = tmp_path / "run.yaml"  # the file is fine; the registry does not know the name
    config.write_text(f"domain: finance\nmethods: [{HUGE}]\n")
    line = one_line_error(invoke("eval", "--config", config))
    assert "unknown method 'xxx" in line and "…" in line and len(line) < 300


@pytest.mark.parametrize("name, text", [
    ("deep.yaml", "methods: " + "[" * 50_000 + "]" * 50_000 + "\n"),
    ("deep.toml", "methods = " + "[" * 50_000 + "]" * 50_000 + "\n"),
])
def test_a_file_nested_too_deeply_is_one_line(captured, tmp_path, name, text):
    config = tmp_path / name
    config.write_text(text)
    line = one_line_error(invoke("eval", "--config", config))
    assert str(config) in line and "nested too deeply" in line and len(line) < 300
