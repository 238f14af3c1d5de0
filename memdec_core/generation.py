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
from memdec_core.interfaces import Combiner, EvalContext, MemoryModel, MemoryStepper
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
    input_ids = input_ids.to(model_device(base.model))
    with _capturing(base, memory) as captured, torch.inference_mode():
        processors = []
        if memory is not None:
            if combiner is None:
                raise ConfigError("generation with a memory needs a combiner")
            processors.append(MixtureLogitsProcessor(memory.stepper(fixed_knobs(memory)), combiner, captured))
        return base.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   generation_config=config, logits_processor=LogitsProcessorList(processors + warpers),
                                   streamer=streamer)


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
