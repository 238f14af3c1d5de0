"""Generation with a memory: λ = 0 is the base, the KV cache changes nothing, the mixture is the
combiner's, any memory (a kNN datastore too) works, the CLI streams."""

import pytest
import torch
from click.testing import CliRunner

from memdec_cli.main import build_cli
from memdec_combiners.linear import Linear
from memdec_core.api import prepare_context
from memdec_core.engine.composite import MemdecForCausalLM, positions_from_mask
from memdec_core.engine.generation import generate_with_memory, generation_settings, left_padded
from memdec_core.errors import ConfigError
from memdec_core.inputs.models import load_model
from memdec_core.interfaces import EvalSettings
from memdec_decoder.memory import open_memory
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
    config = generation_settings(eos_token_id=base.tokenizer.eos_token_id,
                                 pad_token_id=base.tokenizer.eos_token_id, **settings)
    return base.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sampling"])
def test_lambda_zero_reproduces_the_base_token_for_token(base, prompt, trained_memory, strategy):
    memory = prepared_memory(base, trained_memory)
    torch.manual_seed(0)
    expected = base_alone(base, prompt, STRATEGIES[strategy])
    torch.manual_seed(0)
    got = generate_with_memory(base, memory, prompt, combiner=Linear(lam=0.0), **STRATEGIES[strategy])
    assert got.tolist() == expected.tolist()


class UncachedStepper:
    """The memory over the whole text at every step: no cache, only the rows' history, which
    ``select`` reorders as beam search reorders the composite's rows."""

    def __init__(self, memory):
        self.memory, self.ids = memory, None

    def logprobs(self, input_ids, attention_mask, hidden, width, keep):
        self.ids = input_ids if self.ids is None else torch.cat([self.ids, input_ids], 1)
        output = self.memory.forward(self.ids, attention_mask, position_ids=positions_from_mask(attention_mask),
                                     logits_to_keep=keep)
        return self.memory.to_full(self.memory.restricted_logprobs(output.logits[:, -keep:]), width)

    def select(self, rows):
        self.ids = self.ids[rows]


class UncachedMemory(DecoderMemory):
    name = "memory-decoder"

    def stepper(self, knobs):
        return UncachedStepper(self._loaded())


@pytest.mark.parametrize("strategy", ["greedy", "beam", "sampling"])
def test_the_cached_memory_agrees_with_recomputation(base, trained_memory, strategy):
    """On a padded batch, with beams reordered and samples drawn, the memory's KV cache changes nothing."""
    input_ids, attention_mask = left_padded(base.tokenizer, ["the bank raised rates", "shares"])
    outputs = []
    for memory_class in (DecoderMemory, UncachedMemory):
        memory = memory_class(path=str(trained_memory))
        memory.prepare(prepare_context(None, base))
        torch.manual_seed(0)
        outputs.append(generate_with_memory(base, memory, input_ids, attention_mask=attention_mask,
                                            combiner=Linear(lam=0.7), **STRATEGIES[strategy]).tolist())
    assert outputs[0] == outputs[1]


class Geometric(Linear):
    """A test combiner: the processor must mix through ``combine``, whatever it is."""

    name = "geometric-test"
    elementwise = False

    def combine(self, base_logprobs, memory_logprobs, context):
        mixed = 0.5 * base_logprobs + 0.5 * memory_logprobs.clamp(min=-30)
        return mixed - mixed.logsumexp(-1, keepdim=True)


def test_generation_mixes_through_the_chosen_combiner(base, prompt, trained_memory):
    combiner = Geometric(lam=0.5)
    model = MemdecForCausalLM.from_parts(base, prepared_memory(base, trained_memory), {}, combiner)
    with torch.inference_mode():
        mixed = model(input_ids=prompt).logits[:, -1]
        scores = base.model(prompt).logits[:, -1]
    expected = combiner.combine(torch.log_softmax(scores, -1), open_memory(trained_memory).logprobs(prompt)[:, -1], {})
    torch.testing.assert_close(mixed, expected)


def test_a_knn_memory_generates_from_the_base_hidden_states(base, prompt, corpus_dir):
    """kNN-LM in generation: the stepper's query is the base's last_ffn_input at the newest token,
    so each step's distribution equals scoring the whole sequence so far."""
    from memdec_core.engine.scoring import iter_scored_batches
    from memdec_core.inputs.data import make_windows
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
    with pytest.raises(ConfigError, match=r"lam must be in \[0, 1\]"):
        Linear(lam=1.5)
    with pytest.raises(ConfigError, match="add --sample"):
        generation_settings(temperature=0.5)
    with pytest.raises(ConfigError, match="top_p"):
        generation_settings(do_sample=True, top_p=0)
    with pytest.raises(ConfigError, match="repetition penalty"):
        generation_settings(repetition_penalty=0)
    with pytest.raises(ConfigError, match="need sampling"):
        generation_settings(num_return_sequences=2)
    with pytest.raises(ConfigError, match="stop string"):
        generation_settings(stop=[""])


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


def test_generate_reads_stdin_stops_and_returns_several(tiny_llama, trained_memory):
    runner = CliRunner()
    common = ["generate", "--base", str(tiny_llama), "--memory", str(trained_memory), "--max-new-tokens", "12"]
    piped = runner.invoke(build_cli(), [*common, "-"], input="the bank\n")
    assert piped.exit_code == 0, piped.output
    assert piped.output == runner.invoke(build_cli(), [*common, "the bank"]).output
    several = runner.invoke(build_cli(), [*common, "--sample", "--num-return-sequences", "3", "the bank"])
    assert several.exit_code == 0, several.output
    texts = several.output.rstrip("\n").split("\n----\n")
    assert len(texts) == 3 and all(text.startswith("the bank") for text in texts)
    continuation = piped.output[len("the bank"):].strip()
    marker = continuation.split()[1] if len(continuation.split()) > 1 else continuation[:2]
    stopped = runner.invoke(build_cli(), [*common, "--stop", marker, "the bank"])
    assert stopped.exit_code == 0, stopped.output
    assert marker not in stopped.output[len("the bank"):] and piped.output.startswith(stopped.output.rstrip("\n"))
    empty = runner.invoke(build_cli(), [*common, "-"], input="\n")
    assert empty.exit_code == 2 and "empty" in empty.output


def test_the_repetition_penalty_acts_on_the_mixture(base, prompt, trained_memory):
    memory = prepared_memory(base, trained_memory)
    plain = generate_with_memory(base, memory, prompt, combiner=Linear(lam=0.5), max_new_tokens=16)
    penalised = generate_with_memory(base, memory, prompt, combiner=Linear(lam=0.5), max_new_tokens=16,
                                     repetition_penalty=5.0)
    new = penalised[0, prompt.shape[1]:].tolist()
    assert plain.tolist() != penalised.tolist()
    assert len(set(new)) > len(set(plain[0, prompt.shape[1]:].tolist()))


def test_the_python_api_takes_a_loaded_base_and_a_batch(base, trained_memory):
    from memdec_core import api

    texts = api.generate(base, ["the bank", "shares of"], memory=str(trained_memory), max_new_tokens=5)
    assert texts == [api.generate(base, prompt, memory=str(trained_memory), max_new_tokens=5)
                     for prompt in ("the bank", "shares of")]
