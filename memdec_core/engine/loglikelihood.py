"""Continuations scored as each method scores text: every method's ``MethodResult.loglikelihood``.

A downstream task (multiple choice, lm-evaluation-harness's ``loglikelihood`` requests) asks for
log p(continuation | context) summed over the continuation's tokens. One code path serves every
causal LM whose forward returns logits: the base, DAPT's weights, a PEFT model, and the composite
``MemdecForCausalLM`` of a mixture, whose logits are already log-probs (log_softmax leaves
log-probs as they are).

The conventions are lm-evaluation-harness's, so that both give the same numbers: an empty context
becomes the BOS id (EOS where there is none), and a sequence longer than the model's positions
loses its oldest context tokens, never the continuation's.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Sequence

import torch

from memdec_core.errors import ConfigError
from memdec_core.inputs.models import model_device
from memdec_core.interfaces import LogLikelihood

if TYPE_CHECKING:
    from memdec_core.inputs.models import LoadedModel
    from memdec_core.interfaces import Combiner, EvalContext, MemoryModel

Request = tuple[Sequence[int], Sequence[int]]
#: Logit entries one pass over continuation tails may hold (rows × tail length × vocabulary):
#: 2^25 fp32 values, 128 MB.
TAIL_LOGITS = 1 << 25


def model_loglikelihood(model, *, batch_size: int = 8, pad_id: int, max_length: int,
                        start_id: int | None = None) -> LogLikelihood:
    """The LogLikelihood of a causal LM: requests batched (longest first, right-padded, with an
    attention mask), each scored as it would be alone. ``start_id`` (default ``pad_id``) is the
    context of a request whose context is empty. It has no knobs, so it ignores ``knobs``."""
    start = pad_id if start_id is None else start_id

    def loglikelihood(requests: Sequence[Request], knobs: dict[str, Any] | None = None) -> list[float]:
        return score_requests(model, requests, batch_size=batch_size, pad_id=pad_id, start_id=start,
                              max_length=max_length)

    return loglikelihood


def base_loglikelihood(base: "LoadedModel", batch_size: int, model=None) -> LogLikelihood:
    """The LogLikelihood of ``base`` (or of ``model``, the base with adapted weights) with the
    base's tokenizer and positions (a composite's, which are fewer where its memory reads fewer)."""
    tokenizer = base.tokenizer
    eos = tokenizer.eos_token_id
    return model_loglikelihood(base.model if model is None else model, batch_size=batch_size,
                               pad_id=eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
                               start_id=eos if tokenizer.bos_token_id is None else tokenizer.bos_token_id,
                               max_length=_composite_positions(model) or positions(base))


def _composite_positions(model) -> int | None:
    from memdec_core.engine.composite import MemdecForCausalLM

    return model.max_positions if isinstance(model, MemdecForCausalLM) else None


def positions(base: "LoadedModel") -> int:
    """The longest sequence the base reads (what lm-evaluation-harness assumes when it knows none)."""
    return base.max_positions or 2048


def score_requests(model, requests: Sequence[Request], *, batch_size: int, pad_id: int, start_id: int,
                   max_length: int) -> list[float]:
    """Summed log-probs of each continuation, in the order of ``requests``.

    Requests after the same context share its forward pass. A task asks for hundreds of
    verbaliser words after every prompt: the distinct contexts run once, batched, for every
    continuation's first token; the rest of a longer continuation runs on its context's KV
    cache, many continuations per pass, so a word costs its own tokens, not the prompt's.
    """
    split = [_context_and_continuation(context, continuation, start_id, max_length)
             for context, continuation in requests]
    after: dict[tuple[int, ...], list[int]] = {}  # context → the requests that continue it
    for index, (context, continuation) in enumerate(split):
        if continuation:  # an empty continuation needs no forward pass: its log-prob is 0
            after.setdefault(context, []).append(index)
    results = [0.0] * len(split)
    with torch.inference_mode():
        firsts = _first_token_logprobs(model, after, split, batch_size, pad_id)
        for index, value in firsts.items():
            results[index] = value
        vocabulary = _vocab_size(model)
        for context, indices in after.items():
            longer = [index for index in indices if len(split[index][1]) > 1]
            # Tails are short: many fit one pass, as many as keep its logits within a budget.
            tail = max((len(split[index][1]) - 1 for index in longer), default=1)
            rows = max(batch_size, TAIL_LOGITS // (tail * vocabulary))
            for first in range(0, len(longer), rows):
                chunk = longer[first:first + rows]
                tails = _tail_logprobs(model, context, [split[index][1] for index in chunk], pad_id)
                for index, value in zip(chunk, tails):
                    results[index] += value
    return results


def _vocab_size(model) -> int:
    config = getattr(model, "config", None)
    return getattr(config.get_text_config(), "vocab_size", None) or 50_000 if config is not None else 50_000


def _context_and_continuation(context: Sequence[int], continuation: Sequence[int], start_id: int,
                              max_length: int) -> tuple[tuple[int, ...], list[int]]:
    """The context the model reads before the continuation (cut on the left so that context and
    continuation but its last token fit ``max_length`` positions) and the continuation."""
    context, continuation = [int(token) for token in context], [int(token) for token in continuation]
    if len(continuation) > max_length:
        raise ConfigError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                          f"{max_length} positions")
    context = context or [start_id]
    room = max_length - (len(continuation) - 1)
    return tuple(context[-room:]), continuation


def _first_token_logprobs(model, after: dict[tuple[int, ...], list[int]], split, batch_size: int,
                          pad_id: int) -> dict[int, float]:
    """log p(first continuation token | context) for every request: one row per distinct
    context, longest first so that a batch pads little, left-padded so that only the last
    column goes through the output layer (and through a memory's search)."""
    from memdec_core.engine.composite import positions_from_mask

    values: dict[int, float] = {}
    contexts = sorted(after, key=len, reverse=True)
    device = model_device(model)
    for first in range(0, len(contexts), batch_size):
        chunk = contexts[first:first + batch_size]
        length = max(map(len, chunk))
        input_ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, context in enumerate(chunk):
            input_ids[row, length - len(context):], attention_mask[row, length - len(context):] = \
                torch.tensor(context), 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       position_ids=positions_from_mask(attention_mask).to(device), logits_to_keep=1,
                       use_cache=False).logits
        logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1)
        for row, context in enumerate(chunk):
            for index in after[context]:
                values[index] = float(logprobs[row, split[index][1][0]].double())
    return values


def _tail_logprobs(model, context: tuple[int, ...], continuations: list[list[int]], pad_id: int) -> list[float]:
    """log p(continuation[1:] | context, continuation[0]) of each continuation, on the context's
    KV cache repeated for every row (tails right-padded, positions after the context)."""
    from memdec_core.engine.generation import CACHE_NAME

    device = model_device(model)
    prefix = torch.tensor([context], device=device)
    cache = getattr(model(input_ids=prefix, use_cache=True), CACHE_NAME)
    cache.batch_repeat_interleave(len(continuations))
    inputs = [continuation[:-1] for continuation in continuations]  # each predicts the next token
    length = max(map(len, inputs))
    input_ids = torch.full((len(inputs), length), pad_id, dtype=torch.long)
    attention_mask = torch.ones(len(inputs), len(context) + length, dtype=torch.long)
    for row, tokens in enumerate(inputs):
        input_ids[row, :len(tokens)] = torch.tensor(tokens)
        attention_mask[row, len(context) + len(tokens):] = 0
    positions = torch.arange(len(context), len(context) + length).expand(len(inputs), -1)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                   position_ids=positions.to(device), use_cache=True, **{CACHE_NAME: cache}).logits
    values = []
    for row, continuation in enumerate(continuations):
        logprobs = torch.log_softmax(logits[row, :len(continuation) - 1].float(), dim=-1)
        gold = torch.tensor(continuation[1:], device=logprobs.device)[:, None]
        values.append(float(logprobs.gather(1, gold).double().sum()))
    return values


# ----------------------------------------------------------------------------------------------
# A mixture: the composite model, with knobs that a task may override


def mixture_loglikelihood(ctx: "EvalContext", memory: "MemoryModel", memory_knobs: dict[str, Any],
                          combiner_config: Any, fitted: "Combiner | None" = None) -> LogLikelihood:
    """The LogLikelihood of the base mixed with ``memory`` (its chosen ``memory_knobs``) by the
    combiner with ``combiner_config``, through the composite model. ``knobs`` overrides any of
    them, memory knobs and combiner knobs alike (``{"lam": 0.3}``); the composite is built on first
    use, so a method result that is never asked to score continuations pays nothing for it.
    ``fitted``: a combiner that learned its weights, used as it is (its knobs are not overridden)."""
    chosen: list = []  # the composite with the chosen memory knobs, once built
    memory_names = sorted({key for point in memory.grid() for key in point} | set(memory_knobs))
    combiner_names = [item.name for item in dataclasses.fields(combiner_config)]

    def composite(memory_part: dict, combiner: "Combiner"):
        from memdec_core.engine.composite import MemdecForCausalLM

        if memory_part:  # other memory knobs: another composite
            return MemdecForCausalLM.from_parts(ctx.base, memory, {**memory_knobs, **memory_part}, combiner)
        if not chosen:
            chosen.append(MemdecForCausalLM.from_parts(ctx.base, memory, memory_knobs, combiner))
        return chosen[0].with_combiner(combiner)

    def loglikelihood(requests: Sequence[Request], knobs: dict[str, Any] | None = None) -> list[float]:
        memory_part, combiner_part = _split_knobs(knobs or {}, memory_names, combiner_names)
        if fitted is not None:
            if any(fitted.knobs().get(key) != value for key, value in combiner_part.items()):
                raise ConfigError(f"combiner {fitted.name!r} learned its weights on validation; its knobs "
                                  f"are not overridden per task")
            combiner = fitted
        else:
            combiner = ctx.combiner(dataclasses.replace(combiner_config, **combiner_part))  # its Config checks values
        return base_loglikelihood(ctx.base, ctx.settings.batch_size, composite(memory_part, combiner))(requests)

    return loglikelihood


def _split_knobs(knobs: dict[str, Any], memory_names: list[str], combiner_names: list[str]) -> tuple[dict, dict]:
    unknown = sorted(set(knobs) - set(memory_names) - set(combiner_names))
    if unknown:
        raise ConfigError(f"unknown knob(s) {', '.join(unknown)} for this mixture "
                          f"(knobs: {', '.join(memory_names + combiner_names) or 'none'})")
    return ({key: value for key, value in knobs.items() if key in memory_names},
            {key: value for key, value in knobs.items() if key in combiner_names})
