"""Generation with any memory beside any ``generate()`` strategy: greedy, sampling, beam search.

Base and memory run as one model (``memdec_core.engine.composite.MemdecForCausalLM``), whose logits
are the chosen Combiner's mixture — the same ``combine`` that evaluation tuned — so
``generate()``'s own logits processors and warpers (temperature, top-k, top-p, the repetition
penalty) act on the mixture, and a padded batch generates what each prompt generates alone.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from memdec_core.engine.composite import (
    MemdecForCausalLM,
    fixed_combiner,
    fixed_knobs,
    mixing_combiner,
    position_limit,
    prepare_memory,
)
from memdec_core.errors import ConfigError
from memdec_core.inputs.models import LoadedModel, autocast, model_device
from memdec_core.interfaces import Combiner, EvalContext, Generator, MemoryModel
from memdec_core.runtime.progress import log


def generation_settings(*, max_new_tokens: int = 64, do_sample: bool = False, num_beams: int = 1,
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        repetition_penalty: float = 1.0, stop: tuple[str, ...] | list[str] = (),
                        num_return_sequences: int = 1, eos_token_id=None, pad_token_id=None) -> GenerationConfig:
    """A checked GenerationConfig (every bad value is one ConfigError before anything runs)."""
    if max_new_tokens < 1 or num_beams < 1 or num_return_sequences < 1:
        raise ConfigError("max_new_tokens, num_beams and num_return_sequences must be at least 1")
    if not 0 < temperature < math.inf or top_k < 0 or not 0 < top_p <= 1:  # NaN fails every comparison
        raise ConfigError(f"need a finite temperature > 0, top_k ≥ 0 and 0 < top_p ≤ 1 "
                          f"(got {temperature}, {top_k}, {top_p})")
    if not do_sample and (temperature != 1.0 or top_k or top_p < 1.0):
        raise ConfigError("temperature, top-k and top-p apply to sampling; add --sample")
    if not 0 < repetition_penalty < math.inf:
        raise ConfigError(f"the repetition penalty must be a positive number (1: none), got {repetition_penalty}")
    if not do_sample and num_return_sequences > num_beams:
        raise ConfigError(f"{num_return_sequences} return sequences need sampling (--sample) or at least as "
                          f"many beams (--num-beams {num_return_sequences})")
    if any(not text for text in stop):
        raise ConfigError("a stop string must not be empty")
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=num_beams,
                            temperature=temperature if do_sample else None, top_k=top_k or None if do_sample else None,
                            top_p=top_p if do_sample and top_p < 1 else None,
                            repetition_penalty=repetition_penalty if repetition_penalty != 1.0 else None,
                            stop_strings=list(stop) or None, num_return_sequences=num_return_sequences,
                            eos_token_id=eos_token_id, pad_token_id=pad_token_id)


def mixture_model(base: LoadedModel, memory: MemoryModel, knobs: dict[str, Any], combiner: Combiner):
    """Base + prepared memory (under ``knobs``) + combiner as one causal LM."""
    return MemdecForCausalLM.from_parts(base, memory, knobs, combiner)


def generate_with_memory(base: LoadedModel, memory: MemoryModel | None, input_ids: torch.Tensor, *,
                         attention_mask: torch.Tensor | None = None, combiner: Combiner | None = None,
                         streamer=None, **settings) -> torch.Tensor:
    """``generate`` on the base mixed with a prepared memory (or the base alone when it is None).

    ``input_ids`` may be a left-padded batch with its ``attention_mask``. Returns the sequences,
    ``num_return_sequences`` rows per prompt; they end early where base and memory run out of
    positions (``fit_prompt`` cuts a prompt that leaves no room).
    """
    tokenizer = base.tokenizer
    eos = tokenizer.eos_token_id
    config = generation_settings(eos_token_id=eos, pad_token_id=_pad_id(tokenizer), **settings)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    config.max_new_tokens = fit_new_tokens(attention_mask, config.max_new_tokens, position_limit(base, memory))
    if streamer is not None and (config.num_beams > 1 or config.num_return_sequences > 1 or len(input_ids) > 1):
        raise ConfigError("only one sequence at a time can stream; the text is printed when it is done")
    if memory is not None and combiner is None:
        raise ConfigError("generation with a memory needs a combiner")
    model = base.model if memory is None else mixture_model(base, memory, fixed_knobs(memory), combiner)
    return _generate(model, input_ids, config, [], streamer=streamer, attention_mask=attention_mask,
                     tokenizer=tokenizer if config.stop_strings else None).sequences


def fit_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
               limit: tuple[int, str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts cut to their last tokens that leave room for ``max_new_tokens`` within
    ``limit`` (positions, whose: ``position_limit``). A prompt keeps at least half the positions:
    asking for more new tokens than fit must not cost it its end."""
    if limit is None:
        return input_ids, attention_mask
    positions, owner = limit
    keep = positions - min(max_new_tokens, positions // 2)
    longest = int(attention_mask.sum(-1).max())
    if longest <= keep:
        return input_ids, attention_mask
    log(f"the prompt has {longest:,} tokens; kept its last {keep:,}, so that new tokens fit in "
        f"{owner}'s {positions:,} positions")
    return input_ids[:, -keep:], attention_mask[:, -keep:]


def fit_new_tokens(attention_mask: torch.Tensor, max_new_tokens: int, limit: tuple[int, str] | None) -> int:
    """``max_new_tokens``, or fewer where the prompts and they would overrun ``limit``'s positions
    (transformers fails with an IndexError past them, and every token generated is lost)."""
    if limit is None:
        return max_new_tokens
    positions, owner = limit
    longest = int(attention_mask.sum(-1).max())  # positions follow the mask: padding takes none
    room = positions - longest
    if room < 1:
        raise ConfigError(f"the prompt has {longest:,} tokens, which fill {owner}'s {positions:,} positions; "
                          f"cut it (memdec_core.api.generate keeps its end)")
    if max_new_tokens > room:
        log(f"generating at most {room:,} new tokens: with the prompt's {longest:,} they fill "
            f"{owner}'s {positions:,} positions")
    return min(max_new_tokens, room)


def _pad_id(tokenizer) -> int | None:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _generate(model, input_ids: torch.Tensor, config: GenerationConfig, processors: list, *, cache=None,
              streamer=None, attention_mask: torch.Tensor | None = None, tokenizer=None):
    """``model.generate``; the output holds the sequences and the KV cache (``_kv_cache(output)``).
    ``cache`` holds a prefix of ``input_ids``: only the rest is run."""
    device = model_device(model)
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    config = copy.copy(config)
    config.return_dict_in_generate = True  # in the config: beside it as an argument, generate warns
    extra = {} if cache is None else {CACHE_NAME: cache}
    if tokenizer is not None:
        extra["tokenizer"] = tokenizer  # generate matches stop strings with it
    with torch.inference_mode(), autocast():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                              logits_processor=LogitsProcessorList(processors), streamer=streamer, **extra)


def _cache_name() -> str:
    """transformers 5 renamed ``generate``'s ``past_key_values`` (argument and output) ``cache``."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


#: The KV cache's name as an argument of generate() and forward(), and in their outputs.
CACHE_NAME = _cache_name()


def _kv_cache(output):
    return getattr(output, CACHE_NAME)


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
    config = generation_settings(max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos)
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
    """The generator of the base mixed with ``memory`` (its ``knobs``) by ``combiner``: the
    composite model, whose memory state is fresh for every call."""
    model = mixture_model(base, memory, knobs, combiner)
    return model_generator(model, base.tokenizer)


def generate_texts(ctx: EvalContext, memory: MemoryModel | None, prompts: list[str], *, streamer_factory=None,
                   **generation) -> list[str]:
    """Prepare the memory for ``ctx`` and continue every prompt (one left-padded batch); returns
    the new texts, ``num_return_sequences`` per prompt, each cut before its first stop string."""
    combiner = fixed_combiner(ctx.combiner)
    if memory is not None:
        prepare_memory(ctx, memory)
        combiner = mixing_combiner(ctx, memory, fixed_knobs(memory))
        log(f"generating with {memory.name} mixed by {combiner.name or type(combiner).__name__} "
            f"({', '.join(f'{k}={v}' for k, v in {**fixed_knobs(memory), **combiner.knobs()}.items())})")
    tokenizer = ctx.base.tokenizer
    max_new_tokens = generation_settings(**generation).max_new_tokens
    input_ids, attention_mask = fit_prompt(*left_padded(tokenizer, prompts), max_new_tokens,
                                           position_limit(ctx.base, memory))
    streamer = streamer_factory(tokenizer) if streamer_factory else None
    output = generate_with_memory(ctx.base, memory, input_ids, attention_mask=attention_mask, combiner=combiner,
                                  streamer=streamer, **generation)
    texts = tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)
    return [cut_at_stop(text, generation.get("stop", ())) for text in texts]


def left_padded(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[prompts, length]`` ids padded on the left, and their attention mask. An empty prompt
    starts from the EOS token (a model needs one token to continue)."""
    rows = [tokenizer(prompt)["input_ids"] or [tokenizer.eos_token_id] for prompt in prompts]
    length, pad = max(map(len, rows)), _pad_id(tokenizer)
    input_ids = torch.tensor([[pad] * (length - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    return input_ids, attention_mask


def cut_at_stop(text: str, stop) -> str:
    """``text`` up to its first stop string (generate stops there but keeps the stop string)."""
    ends = [text.index(marker) for marker in stop if marker in text]
    return text[:min(ends)] if ends else text
