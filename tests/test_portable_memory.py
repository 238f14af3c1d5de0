"""Portable memories (issue 34): ``memdec export --memory M --output DIR`` writes a plain causal LM
over the family's full vocabulary that transformers loads alone and that mixes as memdec mixes.

Before the export existed, a restricted memory's folder read by other code (the official
``evaluate_joint.py``, lmdeploy) gave its restricted rows as if they were token ids: wrong numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUICK_MEMORY, SMALL_WINDOWS, invoke, one_line_error

from memdec_core.interfaces import EvalSettings

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "benchmarks" / "portable_memory_check.py"
WINDOW = ["--context", SMALL_WINDOWS["context"], "--stride", SMALL_WINDOWS["stride"]]


@pytest.fixture(scope="module")
def restricted_memory(tmp_path_factory, corpus_dir, tiny_llama):
    """A memory whose output layer covers the datastore's tokens only (a real family's default)."""
    from memdec_decoder import api

    folder = tmp_path_factory.mktemp("restricted") / "memory"
    return Path(api.train(str(corpus_dir), teacher=str(tiny_llama), init=str(tiny_llama), output=folder,
                          settings=EvalSettings(**SMALL_WINDOWS), vocabulary="restricted",
                          **dict(QUICK_MEMORY, epochs=1)))


def export(memory, output, *extra):
    result = invoke("export", "--memory", memory, "--output", output, *extra)
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip())


def windows_of(corpus_dir, tiny_llama, count=3, length=48):
    from memdec_core.inputs.models import load_model

    tokenizer = load_model(str(tiny_llama)).tokenizer
    ids = tokenizer((corpus_dir / "test.txt").read_text())["input_ids"]
    return [ids[start:start + length] for start in range(0, count * length, length)]


def test_a_restricted_export_is_memdec_s_distribution_over_the_full_vocabulary(restricted_memory, tmp_path):
    """Full-vocabulary log-softmax of the export, loaded by AutoModelForCausalLM = memdec's restricted
    log-probs scattered to the full vocabulary (to fp32 precision); other tokens get probability 0."""
    from transformers import AutoModelForCausalLM

    from memdec_decoder.memory import open_memory

    folder = export(restricted_memory, tmp_path / "portable", "--lam", "0.4")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Ernie4_5_MoeForCausalLM"] and config["vocab_size"] == 300
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] != "TokenizersBackend"
    card = (folder / "README.md").read_text()
    assert "evaluate_joint" in card and "memory_model_path" in card and "--lmbda 0.4" in card
    memory = open_memory(restricted_memory)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = torch.tensor([[5, 17, 40, 99, 0, 250, 3, 1]])  # some outside the kept set: the shared input row
    with torch.no_grad():
        exported = torch.log_softmax(model(tokens).logits.float(), -1)
    expected = memory.logprobs(tokens)
    outside = torch.isneginf(expected)
    assert outside.any() and not torch.isinf(exported).any()
    assert (exported[outside] < -200).all() and torch.equal(exported[outside].exp(), torch.zeros(int(outside.sum())))
    torch.testing.assert_close(exported[~outside], expected[~outside], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["restricted", "full"])
def test_the_export_mixes_outside_memdec_as_in_memdec(which, restricted_memory, trained_memory, corpus_dir,
                                                      tiny_llama, tmp_path):
    """A Python that imports only torch and transformers (the benchmark's `mix`) reproduces memdec's
    mixture perplexity of the original memory to 1e-5 relative."""
    sys.path.insert(0, str(CHECK.parent))
    try:
        from portable_memory_check import memdec_mixture
    finally:
        sys.path.remove(str(CHECK.parent))
    memory = restricted_memory if which == "restricted" else Path(trained_memory)
    folder = export(memory, tmp_path / "portable")
    windows = windows_of(corpus_dir, tiny_llama)
    (tmp_path / "windows.json").write_text(json.dumps(windows))
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    program = (f"import runpy, sys; sys.argv = {['check', 'mix', '--base', str(tiny_llama), '--memory', str(folder), '--windows', str(tmp_path / 'windows.json'), '--lam', '0.4']!r}; "  # noqa: E501
               f"runpy.run_path({str(CHECK)!r}, run_name='__main__'); "
               f"assert not [name for name in sys.modules if name.startswith('memdec')]")
    outside = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=environment,
                             cwd=tmp_path, timeout=300)
    assert outside.returncode == 0, outside.stderr
    theirs = json.loads(outside.stdout.strip().splitlines()[-1])["ppl"]
    ours = memdec_mixture(str(tiny_llama), str(memory), windows, 0.4)
    assert theirs == pytest.approx(ours, rel=1e-5)


def test_memdec_evaluates_the_export_as_the_original(restricted_memory, corpus_dir, tiny_llama, tmp_path):
    folder = export(restricted_memory, tmp_path / "portable")
    rows = []
    for memory in (restricted_memory, folder):
        result = invoke("eval", "--domain", corpus_dir, "--base", tiny_llama, "--memory", memory, "--method",
                        "memdec", "--lam", "0.4", "--format", "json", *WINDOW)
        assert result.exit_code == 0, result.output
        rows.append(json.loads(result.stdout)["results"][0])
    assert rows[1]["test_ppl"] == pytest.approx(rows[0]["test_ppl"], rel=1e-5)
    assert rows[1]["details"]["restricted"] is False and rows[0]["details"]["restricted"] is True


def test_what_has_no_portable_form_is_one_line(tmp_path, corpus_dir):
    named = invoke("export", "--memory", "memory-decoder", "--output", tmp_path / "out")
    assert "is a memory model's name" in one_line_error(named)
    usage = invoke("export", "--memory", corpus_dir, "--output", tmp_path / "out", "--domain", "finance")
    assert usage.exit_code == 2 and "not to a portable memory" in usage.output
