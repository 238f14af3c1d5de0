"""Generation with any memory beside any ``generate()`` strategy: greedy, sampling, beam search.

``MixtureLogitsProcessor`` asks the memory's stepper for its next-token log-probs (the memory
keeps its own cache; a kNN memory gets the base's hidden state at the newest position, captured
by a hook) and replaces the base's scores by the chosen Combiner's mixture — the same
``combine`` that evaluation tuned. Beam search reorders and duplicates rows between steps; a
stepper finds for every row the cached row it extends, so no strategy is special-cased.

Sampling knobs (temperature, top-k, top-p) are applied by memdec *after* the mixture:
``generate()`` would apply its own warpers to the base's scores before any custom processor.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from memdec_core.errors import ConfigError
from memdec_core.interfaces import Combiner, EvalContext, Generator, MemoryModel, MemoryStepper
from memdec_core.models import LoadedModel, capture_last_ffn_input, model_device
from memdec_core.progress import log


class MixtureLogitsProcessor(LogitsProcessor):
    """Mix a memory's next-token distribution into ``generate()``'s scores through a combiner."""

    def __init__(self, stepper: MemoryStepper, combiner: Combiner, captured: dict | None = None):
        self.stepper, self.combiner, self.captured = stepper, combiner, captured

    @torch.inference_mode()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        hidden = self.captured["hidden"][:, -1] if self.captured is not None else None
        base = torch.log_softmax(scores.float(), dim=-1)
        memory = self.stepper.next_logprobs(input_ids, hidden, scores.shape[-1]).to(base.device)
        mixed = self.combiner.combine(base, memory, {"positions": None, "split": "generate"})
        return mixed.to(scores.dtype)


def generation_settings(*, max_new_tokens: int = 64, do_sample: bool = False, num_beams: int = 1,
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        eos_token_id=None, pad_token_id=None) -> tuple[GenerationConfig, list]:
    """A GenerationConfig with neutral warpers, and memdec's warpers to run after the mixture."""
    if max_new_tokens < 1 or num_beams < 1:
        raise ConfigError("max_new_tokens and num_beams must be at least 1")
    if not temperature > 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ConfigError(f"need temperature > 0, top_k ≥ 0 and 0 < top_p ≤ 1 "
                          f"(got {temperature}, {top_k}, {top_p})")
    if not do_sample and (temperature != 1.0 or top_k or top_p < 1.0):
        raise ConfigError("temperature, top-k and top-p apply to sampling; add --sample")
    warpers = []
    if do_sample:
        if temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p))
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
                              temperature=1.0, top_k=None, top_p=None, eos_token_id=eos_token_id,
                              pad_token_id=pad_token_id)
    return config, warpers


def fixed_knobs(memory: MemoryModel) -> dict[str, Any]:
    """The memory's own knobs for generation: its grid must be a single setting."""
    grid = memory.grid()
    if len(grid) != 1:
        names = ", ".join(sorted({key for point in grid for key in point}))
        raise ConfigError(f"{memory.name} tunes {names} over {len(grid)} settings; generation needs one: "
                          f"fix it with --set {memory.name}.KEY=VALUE (memdec list memory-models)")
    return grid[0]


def fixed_combiner(combiner_class: type[Combiner]) -> Combiner:
    """The combiner for generation: its single grid point when fixed, else its default settings."""
    grid = combiner_class.grid()
    return combiner_class(grid[0] if len(grid) == 1 else combiner_class.Config())


def generate_with_memory(base: LoadedModel, memory: MemoryModel | None, input_ids: torch.Tensor, *,
                         combiner: Combiner | None = None, streamer=None, **settings) -> torch.Tensor:
    """``base.model.generate`` with a prepared memory mixed in (or the base alone when it is None)."""
    tokenizer = base.tokenizer
    eos = tokenizer.eos_token_id
    config, warpers = generation_settings(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id or eos, **settings)
    if streamer is not None and config.num_beams > 1:
        raise ConfigError("beam search cannot stream its output; the text is printed when it is done")
    if memory is not None and combiner is None:
        raise ConfigError("generation with a memory needs a combiner")
    with _capturing(base, memory) as captured:
        processors = [] if memory is None else [_mixture(memory, fixed_knobs(memory), combiner, captured)]
        return _generate(base.model, input_ids, config, processors + warpers, streamer=streamer).sequences


def _mixture(memory: MemoryModel, knobs: dict[str, Any], combiner: Combiner, captured) -> MixtureLogitsProcessor:
    """A mixture processor over a fresh stepper: its memory caches start empty."""
    return MixtureLogitsProcessor(memory.stepper(knobs), combiner, captured)


def _generate(model, input_ids: torch.Tensor, config: GenerationConfig, processors: list, *, cache=None,
              streamer=None):
    """``model.generate`` over an unpadded prompt; the output holds the sequences and the KV cache
    (``_kv_cache(output)``). ``cache`` holds a prefix of ``input_ids``: only the rest is run."""
    input_ids = input_ids.to(model_device(model))
    config = copy.copy(config)
    config.return_dict_in_generate = True  # in the config: beside it as an argument, generate warns
    continued = {} if cache is None else {_CACHE_NAME: cache}
    with torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                              generation_config=config, logits_processor=LogitsProcessorList(processors),
                              streamer=streamer, **continued)


def _cache_name() -> str:
    """transformers 5 renamed ``generate``'s ``past_key_values`` (argument and output) ``cache``."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


_CACHE_NAME = _cache_name()


def _kv_cache(output):
    return getattr(output, _CACHE_NAME)


# ----------------------------------------------------------------------------------------------
# Generators: each method's inference as ``generator(prompt_ids, n)`` (MethodResult.generator)


class _NoEos(LogitsProcessor):
    """Forbid EOS after the mixture: the memory could give it back the mass ``min_new_tokens`` took
    from the base's scores, and a generator must return exactly the tokens it was asked for."""

    def __init__(self, eos: int | None):
        self.eos = eos

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.eos is not None:
            scores[:, self.eos] = float("-inf")
        return scores


def _eos_id(tokenizer_or_eos) -> int | None:
    return tokenizer_or_eos if tokenizer_or_eos is None or isinstance(tokenizer_or_eos, int) \
        else tokenizer_or_eos.eos_token_id


def fixed_length_config(eos: int | None, new_tokens: int) -> GenerationConfig:
    """Greedy, exactly ``new_tokens`` tokens (EOS is never chosen, so it cannot stop early). The pad
    id is given so that ``generate`` does not warn about it on every call."""
    config, _ = generation_settings(max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos)
    config.min_new_tokens = new_tokens
    return config


def greedy_steps(model, input_ids: torch.Tensor, new_tokens: int, eos: int | None, *, cache=None,
                 processors: list | None = None) -> tuple[torch.Tensor, Any]:
    """Continue ``input_ids`` ([1, length]) by exactly ``new_tokens`` greedy tokens with the KV cache.

    ``cache`` (a cache returned by an earlier call) holds a prefix of ``input_ids``: only the rest
    is run through the model. Returns the new ids ``[1, new_tokens]`` and the cache to continue.
    """
    output = _generate(model, input_ids, fixed_length_config(eos, new_tokens),
                       [*(processors or []), _NoEos(eos)], cache=cache)
    return output.sequences[:, input_ids.shape[1]:].cpu(), _kv_cache(output)


def model_generator(model, tokenizer_or_eos) -> Generator:
    """The generator of a plain causal LM (the base, DAPT's weights, a PEFT model): greedy, KV cache.

    ``tokenizer_or_eos``: the tokenizer, or its EOS id.
    """
    eos = _eos_id(tokenizer_or_eos)

    def generate(prompt_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        return greedy_steps(model, prompt_ids, new_tokens, eos)[0]

    return generate


def mixture_generator(base: LoadedModel, memory: MemoryModel, knobs: dict[str, Any], combiner: Combiner) -> Generator:
    """The generator of the base mixed with ``memory`` (its ``knobs``) by ``combiner``, as
    ``generate_with_memory`` mixes: the memory steps with its own caches, fresh for every call."""
    eos = base.tokenizer.eos_token_id

    def generate(prompt_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        with _capturing(base, memory) as captured:
            mixture = _mixture(memory, knobs, combiner, captured)
            return greedy_steps(base.model, prompt_ids, new_tokens, eos, processors=[mixture])[0]

    return generate


def _capturing(base: LoadedModel, memory: MemoryModel | None):
    """The base's ``last_ffn_input`` of every forward pass, for a memory that reads it."""
    if memory is not None and memory.needs_hidden:
        return capture_last_ffn_input(base.model)
    return contextlib.nullcontext(None)


def generate_text(ctx: EvalContext, memory: MemoryModel | None, prompt: str, *, streamer_factory=None,
                  **generation) -> str:
    """Prepare the memory for ``ctx`` and continue ``prompt``; returns the new text."""
    from memdec_core.evaluate import check_memory_matches

    combiner = fixed_combiner(ctx.combiner)
    if memory is not None:
        memory.prepare(ctx)
        check_memory_matches(memory, ctx)
        log(f"generating with {memory.name} mixed by {combiner.name or type(combiner).__name__} "
            f"({', '.join(f'{k}={v}' for k, v in {**fixed_knobs(memory), **combiner.knobs()}.items())})")
    tokenizer = ctx.base.tokenizer
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if input_ids.shape[1] == 0:
        input_ids = torch.tensor([[tokenizer.eos_token_id]])
    streamer = streamer_factory(tokenizer) if streamer_factory else None
    output = generate_with_memory(ctx.base, memory, input_ids, combiner=combiner, streamer=streamer, **generation)
    return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
