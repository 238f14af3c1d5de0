"""The command line: output discipline, exit codes, one-line errors, lazy imports."""

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from memdec_cli.main import build_cli


def run_memdec(*args, env=None):
    environment = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "memdec_cli.main", *args], capture_output=True,
                          text=True, env=environment, timeout=300)


def invoke(*args):
    return CliRunner().invoke(build_cli(), list(args))


def run_counting_heavy_imports(*args) -> subprocess.CompletedProcess:
    """``memdec ARGS`` in a fresh interpreter that reports, on stderr, which heavy engines it imported."""
    probe = ("import sys; from memdec_cli.main import main\n"
             "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "heavy = [m for m in ('torch', 'faiss', 'transformers') if m in sys.modules]\n"
             "print('HEAVY', heavy, file=sys.stderr)")
    return subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["plugins", "--json"], ["list", "methods", "--help"]])
def test_light_commands_do_not_import_torch_or_faiss(args):
    result = run_counting_heavy_imports(*args)
    assert "HEAVY []" in result.stderr, result.stderr


def test_version_and_plugins_json():
    result = run_memdec("--version")
    assert result.returncode == 0 and "memdec, version" in result.stdout
    plugins = json.loads(invoke("plugins", "--json").stdout)
    assert {"base", "knn", "combiners"} <= {p["name"] for p in plugins}


def test_list_json_comes_from_the_registry():
    rows = json.loads(invoke("list", "methods", "--json").stdout)
    assert {"base", "knn-lm"} <= {row["name"] for row in rows}
    assert all(row["plugin"] and row["description"] for row in rows)
    knn = next(row for row in rows if row["name"] == "knn-lm")
    assert knn["settings"]["k"] == 1024 and knn["settings"]["retriever"] == "faiss"
    assert knn["help"]["k"] and knn["compare_rank"] is not None
    retrievers = {row["name"]: row for row in json.loads(invoke("list", "retrievers", "--json").stdout)}
    assert retrievers["faiss"]["kind"] == "vectors" and retrievers["bm25"]["kind"] == "text"
    assert retrievers["faiss"]["settings"]["factory"] == "auto" and "nprobe" in retrievers["faiss"]["help"]
    one = invoke("list", "retrievers", "faiss")
    assert one.exit_code == 0 and "nprobe" in one.stdout and "inverted lists" in one.stdout
    assert "did you mean 'faiss'" in invoke("list", "retrievers", "fais").output
    assert invoke("list", "nonsense").exit_code == 2


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def test_eval_reports_json_and_caches(corpus_dir, tiny_gpt2, tmp_path):
    out = tmp_path / "run.json"
    args = ["eval", "--domain", str(corpus_dir), "--base", str(tiny_gpt2), "--method", "base,knn-lm",
            "--context", "64", "--format", "json", "--output", str(out), "--set", "knn-lm.k=32"]
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == json.loads(out.read_text())
    assert report["domain"] == "tiny-finance"
    rows = {row["method"]: row for row in report["results"]}
    assert rows["knn-lm"]["test_ppl"] < rows["base"]["test_ppl"]
    assert set(rows["knn-lm"]["knobs"]) == {"temperature", "lam"}
    assert all(row["base"] == str(tiny_gpt2) for row in report["results"])
    again = json.loads(invoke(*args).stdout)  # second run reuses the cached datastore
    assert again["results"][1]["test_ppl"] == pytest.approx(rows["knn-lm"]["test_ppl"])
    assert again["results"][1]["details"]["datastore"] == rows["knn-lm"]["details"]["datastore"]


def test_eval_with_a_fixed_lambda_and_a_user_combiner_file(corpus_dir, tiny_gpt2, tmp_path):
    combiner_file = tmp_path / "mine.py"
    combiner_file.write_text(
        "from memdec_core.interfaces import combiner\n\n"
        "@combiner('half', elementwise=True)\n"
        "def half(base, memory, context):\n"
        "    import torch, math\n"
        "    return torch.logaddexp(base + math.log(0.5), memory + math.log(0.5))\n")
    common = ["eval", "--domain", str(corpus_dir), "--base", str(tiny_gpt2), "--method", "knn-lm",
              "--context", "64", "--format", "json", "--set", "knn-lm.k=16", "--set", "knn-lm.temperatures=10"]
    fixed = json.loads(invoke(*common, "--lam", "0.5").stdout)["results"][0]
    user = json.loads(invoke(*common, "--combiner", f"{combiner_file}:half").stdout)["results"][0]
    assert fixed["knobs"] == {"temperature": 10.0, "lam": 0.5}
    assert user["test_ppl"] == pytest.approx(fixed["test_ppl"], rel=1e-6)


@pytest.mark.parametrize("extra,message", [
    (["--method", "knn-ml"], "unknown method 'knn-ml'; did you mean 'knn-lm'?"),
    (["--method", "knn-lm", "--set", "knn-lm.k=0"], "k must be at least 1"),
    (["--method", "knn-lm", "--set", "knn-lm.kk=3"], "unknown setting 'kk'"),
    (["--method", "base", "--set", "knn-lm.k=3"], "settings given for knn-lm, which this run does not use"),
    (["--method", "knn-lm", "--set", "knn-lm.retriever=bm25"], "'bm25' is a text retriever; this needs one of kind "
                                                               "vectors"),
    (["--method", "knn-lm", "--set", "knn-lm.retriever=fais"], "unknown retriever 'fais'; did you mean 'faiss'?"),
    (["--method", "knn-lm", "--set", "faiss.nprobe=x"], "faiss.nprobe must be int"),
    (["--method", "mixture"], "mixture needs a memory: --set mixture.memory=NAME"),
    (["--method", "mixture", "--set", "mixture.memory=knn-datastor"], "did you mean 'knn-datastore'"),
    (["--method", "knn-lm", "--set", "linear.lam=2"], "linear.lam must be in [0, 1]"),
    (["--combiner", "lineer"], "did you mean 'linear'"),
])
def test_bad_input_is_one_line_and_exit_1(corpus_dir, tiny_gpt2, extra, message):
    args = ["eval", "--domain", str(corpus_dir), "--base", str(tiny_gpt2), "--context", "64"]
    result = invoke(*args, *extra)
    assert result.exit_code == 1
    assert message in one_line_error(result)
    assert result.stdout == ""


def test_bad_corpus_and_model_are_one_line_errors(corpus_dir, tiny_gpt2, tmp_path):
    from conftest import write_corpus

    missing_split = write_corpus(tmp_path / "c")
    (missing_split / "test.txt").unlink()
    cases = [
        (["--domain", str(missing_split), "--base", str(tiny_gpt2)], "has no test split"),
        (["--domain", str(corpus_dir), "--base", str(tmp_path / "nope")], "model path not found"),
        (["--domain", str(corpus_dir), "--base", str(tiny_gpt2), "--base", str(tmp_path / "later")],
         "model path not found"),
        (["--domain", "fnance", "--base", str(tiny_gpt2)], "unknown domain 'fnance'"),
        (["--domain", str(corpus_dir), "--base", str(tiny_gpt2), "--context", "200", "--max-eval-tokens", "100"],
         "shorter than one window of 200"),
    ]
    for args, message in cases:
        result = invoke("eval", *args)
        assert result.exit_code == 1 and message in one_line_error(result)


def test_usage_errors_exit_2(corpus_dir, tiny_gpt2):
    base = ["eval", "--domain", str(corpus_dir), "--base", str(tiny_gpt2)]
    for extra in (["--lam", "1.5"], ["--lam", "-0.1"], ["--set", "nodot"], ["--batch-size", "0"]):
        assert invoke(*base, *extra).exit_code == 2, extra


def test_debug_shows_a_traceback(corpus_dir, tiny_gpt2):
    args = ["eval", "--domain", str(corpus_dir), "--base", str(tiny_gpt2), "--method", "nope"]
    plain = run_memdec(*args)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    debug = run_memdec(*args, env={"MEMDEC_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "UnknownComponentError" in debug.stderr


def test_unsupported_architecture_is_a_one_line_error(corpus_dir, tmp_path, tokenizer_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.for_model("gpt_neox", vocab_size=300, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "neox")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "neox")
    result = invoke("eval", "--domain", str(corpus_dir), "--base", str(tmp_path / "neox"),
                    "--method", "knn-lm", "--context", "64")
    assert result.exit_code == 1 and "'gpt_neox' is not supported" in one_line_error(result)


def test_datastore_build_to_a_folder_and_info(corpus_dir, tiny_gpt2, tmp_path):
    target = tmp_path / "store"
    result = invoke("datastore", "build", "--domain", str(corpus_dir), "--base", str(tiny_gpt2),
                    "--context", "64", "--output", str(target))
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(target)
    manifest = json.loads(invoke("datastore", "info", str(target)).stdout)
    assert manifest["type"] == "datastore" and manifest["layer"] == "last_ffn_input"
    again = invoke("datastore", "build", "--domain", str(corpus_dir), "--base", str(tiny_gpt2),
                   "--context", "64", "--output", str(target))
    assert again.exit_code == 1 and "already exists" in one_line_error(again)


def test_a_combiner_that_does_not_normalise_is_a_one_line_error(corpus_dir, tiny_gpt2, tmp_path):
    combiner_file = tmp_path / "bad.py"
    combiner_file.write_text(
        "from memdec_core.interfaces import combiner\n\n"
        "@combiner('sum')\n"
        "def add(base, memory, context):\n"
        "    return base + memory.clamp(min=-30)\n")
    result = invoke("eval", "--domain", str(corpus_dir), "--base", str(tiny_gpt2), "--method", "knn-lm",
                    "--context", "64", "--set", "knn-lm.k=8", "--set", "knn-lm.temperatures=10",
                    "--combiner", str(combiner_file))
    assert result.exit_code == 1 and "do not sum to 1" in one_line_error(result)


def test_the_components_reference_is_generated_from_the_settings():
    """docs/components.md is the output of `python -m memdec_core.components.docs --built-in`: regenerate it when a
    setting or its help text changes."""
    from pathlib import Path

    from memdec_core.components.docs import built_in_plugins, reference

    shipped = (Path(__file__).resolve().parents[1] / "docs" / "components.md").read_text()
    assert shipped == reference(built_in_plugins())
    assert "| `nprobe` | `32` | inverted lists visited per query" in shipped


def test_dtype_and_device_are_checked_before_any_work_and_recorded(corpus_dir, tiny_gpt2, monkeypatch):
    import json

    monkeypatch.setenv("MEMDEC_DTYPE", "auto")  # the options set these: restored after the test
    monkeypatch.setenv("MEMDEC_DEVICE", "")
    args = ["eval", "--domain", corpus_dir, "--base", tiny_gpt2, "--method", "base", "--context", 64]
    gpu_only = invoke("--dtype", "bf16", "--device", "cpu", *args)
    assert "--dtype bf16 needs a GPU" in one_line_error(gpu_only)
    no_gpu = invoke("--device", "cuda", *args)
    if not __import__("torch").cuda.is_available():
        assert "torch sees no CUDA GPU" in one_line_error(no_gpu)
    assert invoke("--dtype", "fp8", *args).exit_code == 2
    report = invoke("--dtype", "fp32", "--device", "cpu", *args, "--format", "json")
    assert report.exit_code == 0, report.output
    meta = json.loads(report.stdout)["meta"]
    assert meta["precision"] == "fp32" and meta["dtype"] == "float32"
