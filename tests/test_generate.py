"""Generation with a memory: λ = 0 is the base, the KV cache changes nothing, the mixture is the
combiner's, any memory (a kNN datastore too) works, the CLI streams."""

import pytest
import torch
from click.testing import CliRunner
from transformers import LogitsProcessorList

from memdec_cli.main import build_cli
from memdec_combiners.linear import Linear
from memdec_core.api import prepare_context
from memdec_core.errors import ConfigError
from memdec_core.generation import MixtureLogitsProcessor, generate_with_memory, generation_settings
from memdec_core.interfaces import EvalSettings
from memdec_core.models import load_model
from memdec_decoder.memory import DecoderStepper, open_memory
from memdec_decoder.memory_model import DecoderMemory

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


def prepared_memory(base, folder, **settings):
    memory = DecoderMemory(path=str(folder), **settings)
    memory.prepare(prepare_context(None, base.model_id))
    return memory


def base_alone(base, prompt, settings):
    config, warpers = generation_settings(eos_token_id=base.tokenizer.eos_token_id,
                                          pad_token_id=base.tokenizer.eos_token_id, **settings)
    return base.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                               logits_processor=LogitsProcessorList(warpers))


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sampling"])
def test_lambda_zero_reproduces_the_base_token_for_token(base, prompt, trained_memory, strategy):
    memory = prepared_memory(base, trained_memory)
    torch.manual_seed(0)
    expected = base_alone(base, prompt, STRATEGIES[strategy])
    torch.manual_seed(0)
    got = generate_with_memory(base, memory, prompt, combiner=Linear(lam=0.0), **STRATEGIES[strategy])
    assert got.tolist() == expected.tolist()


class CheckedStepper(DecoderStepper):
    """Checks the cached memory against a from-scratch pass over the whole sequence at every step."""

    calls = 0

    def restricted_next(self, input_ids):
        cached = super().restricted_next(input_ids)
        fresh = self.memory.restricted_logprobs(self.memory.forward(input_ids).logits[:, -1])
        torch.testing.assert_close(cached, fresh, rtol=1e-4, atol=1e-4)
        self.calls += 1
        return cached


class UncachedMemory(DecoderMemory):
    name = "memory-decoder"

    def stepper(self, knobs):
        return DecoderStepper(self._loaded(), use_cache=False)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sampling"])
def test_the_cached_memory_agrees_with_recomputation(base, prompt, trained_memory, strategy):
    checked = CheckedStepper(open_memory(trained_memory))
    processor = MixtureLogitsProcessor(checked, Linear(lam=0.7))
    config, warpers = generation_settings(eos_token_id=None, pad_token_id=0, **STRATEGIES[strategy])
    torch.manual_seed(0)
    cached = base.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config,
                                 logits_processor=LogitsProcessorList([processor, *warpers]))
    assert checked.calls == 12
    uncached_memory = UncachedMemory(path=str(trained_memory))
    uncached_memory.prepare(prepare_context(None, base.model_id))
    torch.manual_seed(0)
    uncached = generate_with_memory(base, uncached_memory, prompt, combiner=Linear(lam=0.7), **STRATEGIES[strategy])
    assert cached.tolist() == uncached.tolist()


def test_the_mixture_is_a_distribution_and_lambda_one_is_the_memory(base, prompt, trained_memory):
    memory = open_memory(trained_memory)
    scores = base.model(prompt).logits[:, -1].detach()
    mixed = MixtureLogitsProcessor(DecoderStepper(memory), Linear(lam=0.3))(prompt, scores)
    torch.testing.assert_close(mixed.exp().sum(-1), torch.ones(1))
    only_memory = MixtureLogitsProcessor(DecoderStepper(memory), Linear(lam=1.0))(prompt, scores)
    torch.testing.assert_close(only_memory, memory.logprobs(prompt)[:, -1])


class Geometric(Linear):
    """A test combiner: the processor must mix through ``combine``, whatever it is."""

    name = "geometric-test"
    elementwise = False

    def combine(self, base_logprobs, memory_logprobs, context):
        mixed = 0.5 * base_logprobs + 0.5 * memory_logprobs.clamp(min=-30)
        return mixed - mixed.logsumexp(-1, keepdim=True)


def test_generation_mixes_through_the_chosen_combiner(base, prompt, trained_memory):
    memory = open_memory(trained_memory)
    scores = base.model(prompt).logits[:, -1].detach()
    combiner = Geometric(lam=0.5)
    mixed = MixtureLogitsProcessor(DecoderStepper(memory), combiner)(prompt, scores)
    expected = combiner.combine(torch.log_softmax(scores, -1), memory.logprobs(prompt)[:, -1], {})
    torch.testing.assert_close(mixed, expected)


def test_a_knn_memory_generates_from_the_base_hidden_states(base, prompt, corpus_dir):
    """kNN-LM in generation: the stepper's query is the base's last_ffn_input at the newest token,
    so each step's distribution equals scoring the whole sequence so far."""
    from memdec_core.data import make_windows
    from memdec_core.evaluate import iter_scored_batches
    from memdec_knn.memory import KnnDatastore

    ctx = prepare_context(str(corpus_dir), base.model_id, EvalSettings(context=64))
    memory = KnnDatastore(k=8, temperatures=(3.0,))
    memory.prepare(ctx)
    output = generate_with_memory(base, memory, prompt, combiner=Linear(lam=1.0), max_new_tokens=5)
    sequence = output[0].numpy()
    batch = next(iter_scored_batches(base.model, sequence, make_windows(len(sequence), 64, 32), batch_size=1,
                                     capture_hidden=True))
    rows = memory.logprobs(memory.score(batch), batch, {"temperature": 3.0})
    generated = sequence[prompt.shape[1]:]
    expected = rows[prompt.shape[1] - 1:].argmax(-1).numpy()  # greedy under the memory alone (λ = 1)
    assert generated.tolist() == expected.tolist()


def test_generation_settings_are_checked(trained_memory):
    with pytest.raises(ConfigError, match="λ"):
        Linear(lam=1.5)
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
    assert wrong.exit_code == 1 and "add --sample" in wrong.output and not wrong.output.startswith("the bank")


def test_generate_with_a_memory_by_name_needs_fixed_knobs(tiny_llama, corpus_dir):
    runner = CliRunner()
    common = ["generate", "--base", str(tiny_llama), "--memory", "knn-datastore", "--domain", str(corpus_dir),
              "--context", "64", "--max-new-tokens", "4", "--set", "knn-datastore.k=8"]
    grid = runner.invoke(build_cli(), [*common, "the bank"])
    assert grid.exit_code == 1 and "--set knn-datastore.KEY=VALUE" in grid.output
    fixed = runner.invoke(build_cli(), [*common, "--set", "knn-datastore.temperatures=3", "the bank"])
    assert fixed.exit_code == 0, fixed.output
    assert fixed.output.startswith("the bank")
    unknown = runner.invoke(build_cli(), ["generate", "--base", str(tiny_llama), "--memory", "knn-datastor", "x"])
    assert unknown.exit_code == 1 and "did you mean 'knn-datastore'" in unknown.output
