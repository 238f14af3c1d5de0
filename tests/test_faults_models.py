"""Faults of the models a user points memdec at, and of what they ask them to generate: a folder
without a tokenizer, a tokenizer larger than the model, prompts and continuations longer than
the model's positions, a prompt that is empty or unreadable. Each is one clear line, or the
generation that fits, never a traceback or a made-up number."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import SMALL_WINDOWS, invoke, one_line_error

from memdec_core import api
from memdec_core.errors import ModelError
from memdec_core.inputs.models import load_model
from memdec_core.interfaces import MemoryModel

LONG_PROMPT = "the bank raised rates and investors sold bonds " * 60  # well over 256 tokens
WINDOWS = ("--context", SMALL_WINDOWS["context"], "--stride", SMALL_WINDOWS["stride"])


def said(stderr: str) -> str:
    """What memdec logged, with rich's line wrapping undone."""
    return " ".join(stderr.split())


@pytest.fixture
def progress_on(monkeypatch):
    """memdec's log lines reach stderr (the suite turns them off)."""
    monkeypatch.setenv("MEMDEC_NO_PROGRESS", "0")


def save_model(folder, tokenizer_dir, vocab_size: int):
    """A tiny GPT-2 of ``vocab_size`` embedding rows beside the tokenizer in ``tokenizer_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memdec_core.testing import tiny_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("gpt2", vocab_size)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------
# 4. A model folder without tokenizer files


@pytest.fixture
def no_tokenizer(tiny_gpt2, tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for file in tiny_gpt2.iterdir():
        if not file.name.startswith("tokenizer"):
            shutil.copy(file, folder)
    return folder


def test_a_folder_without_tokenizer_files_is_refused_when_loaded(no_tokenizer):
    with pytest.raises(ModelError, match=f"{no_tokenizer} has no tokenizer files .*tokenizer.json"):
        load_model(str(no_tokenizer))


def test_an_empty_tokenizer_from_elsewhere_is_refused(no_tokenizer, monkeypatch):
    """A hub repo without tokenizer files has no folder to look into: the loaded tokenizer tells."""
    from memdec_core.inputs import models

    monkeypatch.setattr(models, "_check_tokenizer_files", lambda location, name: None)
    with pytest.raises(ModelError, match="its tokenizer holds special tokens only"):
        load_model(str(no_tokenizer))


def test_eval_of_a_folder_without_tokenizer_is_one_line(no_tokenizer, corpus_dir):
    result = invoke("eval", "--domain", corpus_dir, "--base", no_tokenizer, "--method", "base", *WINDOWS)
    line = one_line_error(result)
    assert str(no_tokenizer) in line and "tokenizer.json" in line and "ppl" not in result.stdout


# ----------------------------------------------------------------------------------------------
# 5. A tokenizer with more ids than the model has embedding rows


@pytest.fixture
def small_model(tokenizer_dir, tmp_path):
    """The 300-id tokenizer beside a model of 200 rows."""
    return save_model(tmp_path / "small-vocab", tokenizer_dir, 200)


@pytest.fixture
def added_tokens_model(tokenizer_dir, tmp_path):
    """A 300-row model whose tokenizer gained five tokens, the embeddings left unresized."""
    from transformers import AutoTokenizer

    folder = save_model(tmp_path / "added-tokens", tokenizer_dir, 300)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(5)])
    tokenizer.save_pretrained(folder)
    return folder


def test_a_tokenizer_larger_than_the_model_is_refused_when_loaded(small_model, added_tokens_model):
    with pytest.raises(ModelError, match="tokenizer has 300 ids but the model only 200 embedding rows"):
        load_model(str(small_model))
    with pytest.raises(ModelError, match="tokenizer has 305 ids but the model only 300 embedding rows"):
        load_model(str(added_tokens_model))


def test_a_much_larger_tokenizer_is_refused(tokenizer_dir, tmp_path):
    """A 20,000-entry tokenizer on a 400-row model (the issue's 2 million: the same check)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(20_000)} | {"<unk>": 20_000}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = save_model(tmp_path / "huge-tokenizer", tokenizer_dir, 400)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<unk>").save_pretrained(folder)
    with pytest.raises(ModelError, match="tokenizer has 20,001 ids but the model only 400 embedding rows"):
        load_model(str(folder))


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_a_tokenizer_larger_than_the_model_is_one_line(command, small_model, corpus_dir):
    args = ("--domain", corpus_dir, "--method", "base", *WINDOWS) if command == "eval" else ("the bank",)
    line = one_line_error(invoke(command, "--base", small_model, *args))
    assert "300 ids" in line and "200 embedding rows" in line


# ----------------------------------------------------------------------------------------------
# 6, 7. Prompts and continuations longer than the model's positions (the tiny GPT-2 has 256)


def test_a_prompt_longer_than_the_positions_keeps_its_end(tiny_gpt2, progress_on):
    result = invoke("generate", "--base", tiny_gpt2, "--max-new-tokens", 5, LONG_PROMPT)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(LONG_PROMPT) and len(result.stdout.strip()) > len(LONG_PROMPT.strip())
    assert "kept its last 251" in said(result.stderr) and "256 positions" in said(result.stderr)


def test_the_cut_prompt_is_the_end_of_the_prompt(tiny_gpt2):
    """256 positions, 5 new tokens: the prompt keeps its last 251 tokens."""
    from memdec_core.engine.generation import generate_with_memory

    base = load_model(str(tiny_gpt2))
    tail = torch.tensor([base.tokenizer(LONG_PROMPT)["input_ids"][-251:]])
    expected = base.tokenizer.decode(generate_with_memory(base, None, tail, max_new_tokens=5)[0, 251:],
                                     skip_special_tokens=True)
    assert api.generate(base, LONG_PROMPT, max_new_tokens=5) == expected


def test_too_many_new_tokens_stop_at_the_last_position(tiny_gpt2, progress_on):
    result = invoke("generate", "--base", tiny_gpt2, "--max-new-tokens", 100_000_000, "the bank")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("the bank") and "256 positions" in said(result.stderr)
    base = load_model(str(tiny_gpt2))
    assert len(base.tokenizer(result.stdout.rstrip("\n"))["input_ids"]) <= 256 + 8  # re-tokenising may differ


@pytest.mark.parametrize("settings", [dict(num_beams=2, num_return_sequences=2),
                                      dict(do_sample=True, num_return_sequences=2)])
def test_beams_and_samples_stop_there_too(tiny_gpt2, settings):
    texts = api.generate(str(tiny_gpt2), ["the bank", LONG_PROMPT], max_new_tokens=10_000, **settings)
    assert len(texts) == 4 and all(isinstance(text, str) for text in texts)


class ShortMemory(MemoryModel):
    """A uniform memory that reads at most 32 positions, and records the positions it is shown."""

    name = "short-memory"

    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    @property
    def max_positions(self) -> int:
        return 32

    def prepare(self, ctx):
        self.tokenizer_fingerprint = ctx.base.tokenizer_fingerprint

    def score(self, batch):
        return None

    def gold_logprobs(self, state, batch, knobs):
        raise NotImplementedError

    def logprobs(self, state, batch, knobs):
        raise NotImplementedError

    def stepper(self, knobs):
        memory = self

        class Stepper:
            def logprobs(self, input_ids, attention_mask, hidden, width, keep):
                memory.seen.append(int(attention_mask.sum(-1).max()) - 1)  # the last position read
                return torch.full((input_ids.shape[0], keep, width), -torch.log(torch.tensor(float(width))))

            def select(self, rows):
                pass

        return Stepper()


def test_a_memory_never_reads_past_its_own_positions(tiny_gpt2, progress_on, capsys):
    memory = ShortMemory()
    api.generate(str(tiny_gpt2), LONG_PROMPT, memory=memory, max_new_tokens=50)
    assert memory.seen and max(memory.seen) < 32
    assert "short-memory's 32 positions" in said(capsys.readouterr().err)
    memory = ShortMemory()
    api.generate(str(tiny_gpt2), "the bank", memory=memory, max_new_tokens=10_000)
    assert memory.seen and max(memory.seen) < 32


def test_the_composite_refuses_positions_past_its_memory_s(tiny_gpt2):
    from memdec_combiners.linear import Linear
    from memdec_core.engine.generation import mixture_model
    from memdec_core.errors import ConfigError

    base = load_model(str(tiny_gpt2))
    memory = ShortMemory()
    memory.prepare(type("Ctx", (), {"base": base})())
    model = mixture_model(base, memory, {}, Linear(lam=0.5))
    with pytest.raises(ConfigError, match="position 39 .*short-memory's 32 positions"):
        model(input_ids=torch.zeros(1, 40, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# 13. A prompt that is empty, or standard input that is closed


def memdec_without_stdin(*args, cache):
    """``memdec ARGS <&-``: the process starts with its standard input closed."""
    return subprocess.run([sys.executable, "-m", "memdec_cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=120, preexec_fn=lambda: os.close(0),
                          env={**os.environ, "MEMDEC_CACHE": str(cache)})


def test_closed_stdin_is_a_usage_error(tiny_gpt2, tmp_path):
    result = memdec_without_stdin("generate", "--base", tiny_gpt2, "-", cache=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Error: standard input is closed" in result.stderr


@pytest.mark.parametrize("prompt", ["", "  "])
def test_an_empty_prompt_is_a_usage_error_as_empty_stdin_is(prompt, tiny_gpt2):
    result = invoke("generate", "--base", tiny_gpt2, prompt)
    assert result.exit_code == 2 and "Error: the prompt is empty" in result.stderr and not result.stdout
    piped = invoke_with_input(prompt + "\n", "generate", "--base", tiny_gpt2, "-")
    assert piped.exit_code == 2 and "Error: the prompt read from standard input is empty" in piped.stderr


def invoke_with_input(text, *args):
    from click.testing import CliRunner

    from memdec_cli.main import build_cli

    return CliRunner().invoke(build_cli(), [str(arg) for arg in args], input=text)


def test_task_scoring_through_the_composite_keeps_within_the_memory_s_positions(tiny_gpt2):
    """A task's long context is cut to the memory's 32 positions, not the base's 256."""
    from memdec_combiners.linear import Linear
    from memdec_core.engine.generation import mixture_model
    from memdec_core.engine.loglikelihood import base_loglikelihood

    base = load_model(str(tiny_gpt2))
    memory = ShortMemory()
    memory.prepare(type("Ctx", (), {"base": base})())
    score = base_loglikelihood(base, 2, mixture_model(base, memory, {}, Linear(lam=0.5)))
    [logprob] = score([(list(range(1, 100)), [5, 6])])
    assert logprob < 0 and max(memory.seen) < 32
