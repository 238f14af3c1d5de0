"""Generation with a Memory Decoder: λ = 0 is the base, the KV cache changes nothing, the CLI streams."""

import pytest
import torch
from click.testing import CliRunner
from transformers import LogitsProcessorList

from memdec_cli.main import build_cli
from memdec_core.errors import ConfigError
from memdec_core.models import load_model
from memdec_decoder.generate import MemoryLogitsProcessor, generate_with_memory, generation_settings
from memdec_decoder.memory import open_memory

STRATEGIES = {
    "greedy": dict(max_new_tokens=12),
    "sampling": dict(max_new_tokens=12, do_sample=True, top_k=20, temperature=0.8),
    "beam": dict(max_new_tokens=12, num_beams=3),
}


@pytest.fixture(scope="module")
def base(tiny_llama):
    return load_model(str(tiny_llama))


@pytest.fixture(scope="module")
def prompt(base):
    return base.tokenizer("the bank raised rates", return_tensors="pt")["input_ids"]


def base_alone(base, prompt, settings):
    config, warpers = generation_settings(eos_token_id=base.tokenizer.eos_token_id,
                                          pad_token_id=base.tokenizer.eos_token_id, **settings)
    return base.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                               logits_processor=LogitsProcessorList(warpers))


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sampling"])
def test_lambda_zero_reproduces_the_base_token_for_token(base, prompt, trained_memory, strategy):
    memory = open_memory(trained_memory)
    torch.manual_seed(0)
    expected = base_alone(base, prompt, STRATEGIES[strategy])
    torch.manual_seed(0)
    got = generate_with_memory(base, memory, prompt, lam=0.0, **STRATEGIES[strategy])
    assert got.tolist() == expected.tolist()


class CheckedProcessor(MemoryLogitsProcessor):
    """Checks the cached memory against a from-scratch pass over the whole sequence at every step."""

    calls = 0

    def next_logprobs(self, input_ids):
        cached = super().next_logprobs(input_ids)
        fresh = self.memory.restricted_logprobs(self.memory.forward(input_ids).logits[:, -1])
        torch.testing.assert_close(cached, fresh, rtol=1e-4, atol=1e-4)
        self.calls += 1
        return cached


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sampling"])
def test_the_cached_memory_agrees_with_recomputation(base, prompt, trained_memory, strategy):
    memory = open_memory(trained_memory)
    checked = CheckedProcessor(memory, lam=0.7)
    config, warpers = generation_settings(eos_token_id=None, pad_token_id=0, **STRATEGIES[strategy])
    torch.manual_seed(0)
    cached = base.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                                 logits_processor=LogitsProcessorList([checked, *warpers]))
    assert checked.calls == 12
    torch.manual_seed(0)
    uncached = generate_with_memory(base, memory, prompt, lam=0.7, use_cache=False, **STRATEGIES[strategy])
    assert cached.tolist() == uncached.tolist()


def test_the_mixture_is_a_distribution_and_lambda_one_is_the_memory(base, prompt, trained_memory):
    memory = open_memory(trained_memory)
    scores = base.model(prompt).logits[:, -1].detach()
    mixed = MemoryLogitsProcessor(memory, lam=0.3)(prompt, scores)
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(1))
    only_memory = MemoryLogitsProcessor(memory, lam=1.0)(prompt, scores)
    torch.testing.assert_close(only_memory, memory.logprobs(prompt)[:, -1])


def test_generation_settings_are_checked(trained_memory):
    with pytest.raises(ConfigError, match="λ"):
        MemoryLogitsProcessor(open_memory(trained_memory), lam=1.5)
    with pytest.raises(ConfigError, match="add --sample"):
        generation_settings(temperature=0.5)
    with pytest.raises(ConfigError, match="top_p"):
        generation_settings(do_sample=True, top_p=0)


def test_memdec_generate_streams_a_continuation(tiny_llama, trained_memory):
    runner = CliRunner()
    result = runner.invoke(build_cli(), ["generate", "--base", str(tiny_llama), "--memory", str(trained_memory),
                                 "--max-new-tokens", "6", "the bank"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("the bank") and len(result.output.strip()) > len("the bank")
    beams = runner.invoke(build_cli(), ["generate", "--base", str(tiny_llama), "--memory", str(trained_memory),
                                "--num-beams", "2", "--max-new-tokens", "4", "the bank"])
    assert beams.exit_code == 0, beams.output
    wrong = runner.invoke(build_cli(), ["generate", "--base", str(tiny_llama), "--temperature", "0.5", "the bank"])
    assert wrong.exit_code == 1 and "add --sample" in wrong.output
