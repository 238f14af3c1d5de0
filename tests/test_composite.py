"""Base + memory as one transformers model: a padded batch generates what each prompt generates
alone, the cached steps equal one forward pass over the whole text, λ = 0 is the base,
``pipeline`` works, and a folder of references rebuilds the model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

from memdec_combiners.linear import Linear
from memdec_core import api
from memdec_core.api import prepare_context
from memdec_core.engine.composite import MemdecForCausalLM
from memdec_core.engine.generation import generation_settings, left_padded
from memdec_core.errors import ArtifactError, ConfigError
from memdec_core.inputs.models import load_model
from memdec_core.interfaces import EvalSettings
from memdec_decoder.memory_model import DecoderMemory
from memdec_knn.memory import KnnDatastore

PROMPTS = ["the bank", "the central bank raised its rates and the markets", "shares"]


@pytest.fixture(scope="module")
def base(tiny_llama):
    return load_model(str(tiny_llama))


@pytest.fixture(scope="module")
def decoder_memory(base, trained_memory):
    memory = DecoderMemory(path=str(trained_memory))
    memory.prepare(prepare_context(None, base))
    return memory


@pytest.fixture(scope="module")
def knn_memory(base, corpus_dir):
    memory = KnnDatastore(k=8, temperatures=(3.0,))
    memory.prepare(prepare_context(str(corpus_dir), base, EvalSettings(context=64)))
    return memory


@pytest.fixture(scope="module", params=["decoder", "knn"])
def composite(request, base, decoder_memory, knn_memory):
    memory, knobs = (decoder_memory, {}) if request.param == "decoder" else (knn_memory, {"temperature": 3.0})
    return MemdecForCausalLM.from_parts(base, memory, knobs, Linear(lam=0.6))


def generate(model, tokenizer, prompts, **settings):
    """The continuations of ``prompts`` as lists of ids, generated as one left-padded batch."""
    config = generation_settings(eos_token_id=None, pad_token_id=0, **settings)
    config.min_new_tokens = config.max_new_tokens  # every row runs to the end: nothing to trim
    input_ids, attention_mask = left_padded(tokenizer, prompts)
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    return output[:, input_ids.shape[1]:].tolist()


@pytest.mark.parametrize("strategy", [dict(max_new_tokens=10), dict(max_new_tokens=8, num_beams=3)])
def test_a_padded_batch_generates_what_each_prompt_generates_alone(composite, base, strategy):
    batched = generate(composite, base.tokenizer, PROMPTS, **strategy)
    alone = [generate(composite, base.tokenizer, [prompt], **strategy)[0] for prompt in PROMPTS]
    assert batched == alone


def test_the_base_alone_also_batches_exactly(base):
    """The reference the composite must match: the base under the same padding."""
    batched = generate(base.model, base.tokenizer, PROMPTS, max_new_tokens=10)
    assert batched == [generate(base.model, base.tokenizer, [prompt], max_new_tokens=10)[0] for prompt in PROMPTS]


def test_cached_steps_equal_one_pass_over_the_whole_text(composite, base):
    """Greedy generation with both caches picks the argmax of the uncached forward pass."""
    input_ids, attention_mask = left_padded(base.tokenizer, PROMPTS)
    new = torch.tensor(generate(composite, base.tokenizer, PROMPTS, max_new_tokens=8))
    sequences = torch.cat([input_ids, new], 1)
    mask = torch.cat([attention_mask, torch.ones_like(new)], 1)
    with torch.inference_mode():
        logits = composite(input_ids=sequences, attention_mask=mask).logits
    assert torch.equal(logits[:, input_ids.shape[1] - 1:-1].argmax(-1), new)
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(logits.shape[:2]), atol=1e-4, rtol=0)


def test_a_right_padded_batch_scores_each_row_as_alone(composite, base):
    rows = [base.tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    length = max(map(len, rows))
    input_ids = torch.tensor([row + [0] * (length - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (length - len(row)) for row in rows])
    with torch.inference_mode():
        together = composite(input_ids=input_ids, attention_mask=mask).logits
        for index, row in enumerate(rows):
            alone = composite(input_ids=torch.tensor([row])).logits[0]
            torch.testing.assert_close(together[index, :len(row)], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("strategy", [dict(max_new_tokens=10), dict(max_new_tokens=8, num_beams=3),
                                      dict(max_new_tokens=10, do_sample=True, top_k=20, temperature=0.8)])
def test_lambda_zero_is_the_base(base, decoder_memory, strategy):
    composite = MemdecForCausalLM.from_parts(base, decoder_memory, {}, Linear(lam=0.0))
    torch.manual_seed(0)
    expected = generate(base.model, base.tokenizer, PROMPTS, **strategy)
    torch.manual_seed(0)
    assert generate(composite, base.tokenizer, PROMPTS, **strategy) == expected


def test_lambda_one_is_the_memory(base, decoder_memory, trained_memory):
    from memdec_decoder.memory import open_memory

    composite = MemdecForCausalLM.from_parts(base, decoder_memory, {}, Linear(lam=1.0))
    ids = base.tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        torch.testing.assert_close(composite(input_ids=ids).logits, open_memory(trained_memory).logprobs(ids))


def test_labels_give_the_mean_nll(composite, base):
    ids = base.tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        output = composite(input_ids=ids, labels=ids)
    expected = -output.logits[0, :-1].gather(1, ids[0, 1:, None]).mean()
    torch.testing.assert_close(output.loss, expected)


def test_pipeline_generates_like_generate(composite, base):
    generator = pipeline("text-generation", model=composite, tokenizer=base.tokenizer)
    text = generator(PROMPTS[0], max_new_tokens=6, do_sample=False, min_new_tokens=6)[0]["generated_text"]
    expected = base.tokenizer.decode(generate(composite, base.tokenizer, [PROMPTS[0]], max_new_tokens=6)[0])
    assert text == PROMPTS[0] + expected


def test_a_saved_composite_is_rebuilt_from_its_references(tmp_path, tiny_llama, trained_memory):
    model = api.composite_model(str(tiny_llama), str(trained_memory), lam=0.3)
    model.save_pretrained(tmp_path / "composite")
    assert not list((tmp_path / "composite").glob("*.safetensors"))  # references, not weights
    assert (tmp_path / "composite" / "README.md").read_text().startswith("---\nlibrary_name: memdec")
    model.save_pretrained(tmp_path / "composite")  # again: replaced, as transformers replaces
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "composite")
    assert isinstance(again, MemdecForCausalLM) and again.combiner.config.lam == 0.3
    ids = model.tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bad_parts_are_one_line_errors(tmp_path, tiny_llama, trained_memory, base, decoder_memory):
    with pytest.raises(ConfigError, match=r"lam must be in \[0, 1\]"):
        api.composite_model(str(tiny_llama), str(trained_memory), lam=1.5)
    stranger = DecoderMemory(path=str(trained_memory))
    stranger.prepare(prepare_context(None, base))
    stranger.tokenizer_fingerprint = "0123456789abcdef"  # as if trained with another family's tokenizer
    with pytest.raises(ConfigError, match="uses another tokenizer"):
        MemdecForCausalLM.from_parts(base, stranger, {}, Linear(lam=0.5))
    with pytest.raises(ConfigError, match="cannot name them"):
        MemdecForCausalLM.from_parts(base, decoder_memory, {}, Linear(lam=0.5)).save_pretrained(tmp_path / "x")
    with pytest.raises(ArtifactError, match="not a memdec composite folder"):
        MemdecForCausalLM.from_pretrained(tmp_path / "missing")


def test_the_cache_repeats_and_selects_rows_with_the_memory(base, decoder_memory):
    """What generate does to a cache it expands (several samples per prompt) or prunes."""
    composite = MemdecForCausalLM.from_parts(base, decoder_memory, {}, Linear(lam=0.6))
    input_ids, attention_mask = left_padded(base.tokenizer, PROMPTS[:2])
    with torch.inference_mode():
        cache = composite(input_ids=input_ids, attention_mask=attention_mask, use_cache=True).cache
        cache.batch_repeat_interleave(2)
        cache.batch_select_indices(torch.tensor([3, 0]))
        step = torch.tensor([[5], [7]])
        mask = torch.cat([attention_mask[[1, 0]], torch.ones(2, 1, dtype=torch.long)], 1)
        got = composite(input_ids=step, attention_mask=mask, cache=cache).logits[:, -1]
        full = composite(input_ids=torch.cat([input_ids[[1, 0]], step], 1), attention_mask=mask).logits[:, -1]
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)


def test_the_public_import_registers_the_model_type():
    """Saved cards say ``import memdec_core.composite``: that import alone lets transformers' Auto
    classes open a composite folder (a fresh process: nothing else imported the engine)."""
    import subprocess
    import sys

    code = ("import memdec_core.composite\nfrom transformers import AutoConfig, AutoModelForCausalLM\n"
            "config = AutoConfig.for_model('memdec')\n"
            "print(AutoModelForCausalLM._model_mapping[type(config)].__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "MemdecForCausalLM"
