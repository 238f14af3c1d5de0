"""Generation with a Memory Decoder beside any ``generate()`` strategy: greedy, sampling, beams.

``MemoryLogitsProcessor`` runs the memory with its own KV cache and replaces the base's
next-token scores by the mixture log(λ·p_mem + (1−λ)·p_base). Beam search reorders and
duplicates rows between steps; the processor finds, for every row, the cached row whose
tokens are its prefix and reorders the memory's cache to match, so nothing is recomputed and
no strategy is special-cased. (The paper's public code supports greedy decoding only.)

Sampling knobs (temperature, top-k, top-p) are applied by memdec *after* the mixture:
``generate()`` would apply its own warpers to the base's scores before any custom processor.
"""

from __future__ import annotations

import math

import torch
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from memdec_combiners.linear import check_lambda
from memdec_core.errors import ConfigError
from memdec_core.models import model_device
from memdec_decoder.memory import MemoryDecoder


class MemoryLogitsProcessor(LogitsProcessor):
    """Mix a memory's next-token distribution into ``generate()``'s scores."""

    def __init__(self, memory: MemoryDecoder, lam: float, use_cache: bool = True):
        self.memory, self.lam, self.use_cache = memory, check_lambda(lam), use_cache
        self._cache = None
        self._seen: torch.Tensor | None = None  # [rows, length] the tokens the cache holds

    @torch.inference_mode()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        memory = self.memory.to_full(self.next_logprobs(input_ids), scores.shape[-1])
        base = torch.log_softmax(scores.float(), dim=-1)
        log_lam = math.log(self.lam) if self.lam > 0 else float("-inf")
        log_rest = math.log1p(-self.lam) if self.lam < 1 else float("-inf")
        return torch.logaddexp(base + log_rest, memory + log_lam).to(scores.dtype)

    def next_logprobs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[rows, memory vocab]`` log-probs of the token after each row of ``input_ids``."""
        if not self.use_cache:
            logits = self.memory.forward(input_ids, logits_to_keep=1).logits[:, -1]
            return self.memory.restricted_logprobs(logits)
        source = self._source_rows(input_ids)
        if source is None:  # first step (or an unrelated call): fill the cache with the whole prompt
            from transformers import DynamicCache

            self._cache = DynamicCache(config=self.memory.model.config)
            new_tokens = input_ids
        else:
            if not torch.equal(source, torch.arange(len(self._seen), device=source.device)):
                self._cache.reorder_cache(source)
            new_tokens = input_ids[:, -1:]
        output = self.memory.forward(new_tokens, past_key_values=self._cache, logits_to_keep=1)
        self._seen = input_ids.clone()
        return self.memory.restricted_logprobs(output.logits[:, -1])

    def _source_rows(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """For each row, the cached row it extends by one token; None when some row has none."""
        if self._seen is None or input_ids.shape[1] != self._seen.shape[1] + 1:
            return None
        matches = (input_ids[:, None, :-1] == self._seen[None, :, :]).all(dim=-1)  # [rows, cached rows]
        if not bool(matches.any(dim=1).all()):
            return None
        return matches.float().argmax(dim=1)


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


def generate_with_memory(base, memory: MemoryDecoder | None, input_ids: torch.Tensor, *, lam: float = 0.6,
                         streamer=None, use_cache: bool = True, **settings) -> torch.Tensor:
    """``base.model.generate`` with the memory mixed in (or the base alone when ``memory`` is None)."""
    tokenizer = base.tokenizer
    eos = tokenizer.eos_token_id
    config, warpers = generation_settings(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id or eos, **settings)
    processors = []
    if memory is not None:
        memory.check_compatible(base)
        processors.append(MemoryLogitsProcessor(memory, lam, use_cache=use_cache))
    if streamer is not None and config.num_beams > 1:
        raise ConfigError("beam search cannot stream its output; the text is printed when it is done")
    input_ids = input_ids.to(model_device(base.model))
    with torch.inference_mode():
        return base.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   generation_config=config, logits_processor=LogitsProcessorList(processors + warpers),
                                   streamer=streamer)
