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
from memdec_core.interfaces import LogLikelihood
from memdec_core.models import model_device

if TYPE_CHECKING:
    from memdec_core.interfaces import Combiner, EvalContext, MemoryModel
    from memdec_core.models import LoadedModel

Request = tuple[Sequence[int], Sequence[int]]


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
    base's tokenizer and positions."""
    tokenizer = base.tokenizer
    eos = tokenizer.eos_token_id
    return model_loglikelihood(base.model if model is None else model, batch_size=batch_size,
                               pad_id=eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
                               start_id=eos if tokenizer.bos_token_id is None else tokenizer.bos_token_id,
                               max_length=positions(base))


def positions(base: "LoadedModel") -> int:
    """The longest sequence the base reads (what lm-evaluation-harness assumes when it knows none)."""
    return base.max_positions or 2048


def score_requests(model, requests: Sequence[Request], *, batch_size: int, pad_id: int, start_id: int,
                   max_length: int) -> list[float]:
    """Summed log-probs of each continuation, in the order of ``requests``.

    Requests that feed the model the same tokens share one forward pass: every one-token
    continuation after one context (a task's verbaliser words after one prompt) is read off the
    same output row, so a class vocabulary of hundreds of words costs one pass per prompt.
    """
    prepared = [_model_inputs(context, continuation, start_id, max_length) for context, continuation in requests]
    sharing: dict[tuple[int, ...], list[int]] = {}  # model input → the requests it serves
    for index, (inputs, continuation) in enumerate(prepared):
        if continuation:  # an empty continuation needs no forward pass: its log-prob is 0
            sharing.setdefault(tuple(inputs), []).append(index)
    # Longest first, so that a batch holds inputs of similar lengths and padding costs little.
    inputs_in_order = sorted(sharing, key=len, reverse=True)
    results = [0.0] * len(prepared)
    with torch.inference_mode():
        for first in range(0, len(inputs_in_order), batch_size):
            chunk = inputs_in_order[first:first + batch_size]
            served = [[(index, prepared[index][1]) for index in sharing[inputs]] for inputs in chunk]
            for index, value in _score_batch(model, [list(inputs) for inputs in chunk], served, pad_id):
                results[index] = value
    return results


def _model_inputs(context: Sequence[int], continuation: Sequence[int], start_id: int,
                  max_length: int) -> tuple[list[int], list[int]]:
    """What the model reads (context and continuation but its last token, at most ``max_length``
    tokens, cut on the left) and the continuation it predicts."""
    context, continuation = [int(token) for token in context], [int(token) for token in continuation]
    if len(continuation) > max_length:
        raise ConfigError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                          f"{max_length} positions")
    if not context:
        context = [start_id]
    return (context + continuation)[-(max_length + 1):-1], continuation


def _score_batch(model, batch: list[list[int]], served: list[list[tuple[int, list[int]]]],
                 pad_id: int) -> list[tuple[int, float]]:
    """``(request index, summed log-prob)`` of every request ``served`` by each input of ``batch``:
    a continuation of ``c`` tokens is predicted by the input's last ``c`` columns."""
    length = max(len(inputs) for inputs in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, inputs in enumerate(batch):
        input_ids[row, :len(inputs)] = torch.tensor(inputs)
        attention_mask[row, :len(inputs)] = 1
    longest = [max(len(continuation) for _, continuation in requests) for requests in served]
    # The output layer is the costly part: keep the columns from the earliest one that predicts
    # a continuation token.
    keep = length - min(len(inputs) - needed for inputs, needed in zip(batch, longest))
    device = model_device(model)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                   logits_to_keep=keep, use_cache=False).logits
    offset = length - logits.shape[1]  # a model that ignores logits_to_keep returns every column
    values = []
    for row, (inputs, requests) in enumerate(zip(batch, served)):
        first = len(inputs) - longest[row] - offset
        logprobs = torch.log_softmax(logits[row, first:first + longest[row]].float(), dim=-1)
        for index, continuation in requests:
            columns = logprobs[longest[row] - len(continuation):]
            gold = torch.tensor(continuation, device=logprobs.device)[:, None]
            values.append((index, float(columns.gather(1, gold).double().sum())))
    return values


# ----------------------------------------------------------------------------------------------
# A mixture: the composite model, with knobs that a task may override


def mixture_loglikelihood(ctx: "EvalContext", memory: "MemoryModel", memory_knobs: dict[str, Any],
                          combiner_config: Any) -> LogLikelihood:
    """The LogLikelihood of the base mixed with ``memory`` (its chosen ``memory_knobs``) by the
    combiner with ``combiner_config``, through the composite model. ``knobs`` overrides any of
    them, memory knobs and combiner knobs alike (``{"lam": 0.3}``); the composite is built on first
    use, so a method result that is never asked to score continuations pays nothing for it."""
    chosen: list = []  # the composite with the chosen memory knobs, once built
    memory_names = sorted({key for point in memory.grid() for key in point} | set(memory_knobs))
    combiner_names = [item.name for item in dataclasses.fields(combiner_config)]

    def composite(memory_part: dict, combiner: "Combiner"):
        from memdec_core.composite import MemdecForCausalLM

        if memory_part:  # other memory knobs: another composite
            return MemdecForCausalLM.from_parts(ctx.base, memory, {**memory_knobs, **memory_part}, combiner)
        if not chosen:
            chosen.append(MemdecForCausalLM.from_parts(ctx.base, memory, memory_knobs, combiner))
        return chosen[0].with_combiner(combiner)

    def loglikelihood(requests: Sequence[Request], knobs: dict[str, Any] | None = None) -> list[float]:
        memory_part, combiner_part = _split_knobs(knobs or {}, memory_names, combiner_names)
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
