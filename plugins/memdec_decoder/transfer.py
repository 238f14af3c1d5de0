"""Moving a trained memory to another tokenizer (the paper's Table 4: Qwen → Llama-3).

A memory of family A keeps its transformer blocks and gets an embedding and an output layer for
family B's tokenizer; it is then trained on B's kNN targets with a fraction of the original
memory's training (the paper: 10 %). The new rows start from one of:

- ``strings``: the A row of the token that decodes to the same text, fresh rows for the rest;
- ``model``: the rows of a B model (its embedding and output layers), projected onto their
  leading principal directions when B's width differs from the memory's, and rescaled to the
  spread of the memory's own rows;
- ``fresh``: random rows with the per-dimension mean and spread of the memory's rows (the blocks
  were trained on inputs of that scale).

``fresh_blocks`` is the control a transfer is measured against: the same architecture, every
weight fresh. The result is a plain memory of family B: ``eval``, ``compare`` and ``generate``
use it with B's bases like any other.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

from memdec_core.engine.training import seeded
from memdec_core.errors import ConfigError, ModelError
from memdec_core.inputs.models import LoadedModel, default_device, last_block_mlp, model_fingerprint
from memdec_core.store.artifacts import artifact_reference, content_key
from memdec_decoder.memory import MemoryDecoder
from memdec_decoder.settings import TrainSettings
from memdec_decoder.train import MemoryStart
from memdec_decoder.vocab import Vocabulary, restrict_model

EMBEDDING_CHOICES = ("strings", "model", "fresh")
#: The paper's budget: 10 % of the original memory's training.
DEFAULT_FRACTION = 0.1


def check_transfer(memory: MemoryDecoder, teacher: LoadedModel, fraction: float, embeddings: str,
                   context: int) -> None:
    """Everything that makes a transfer impossible, before any work."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"the budget fraction must be in (0, 1], got {fraction}")
    if embeddings not in EMBEDDING_CHOICES:
        raise ConfigError(f"embeddings must be one of {', '.join(EMBEDDING_CHOICES)}, got {embeddings!r}")
    if memory.tokenizer_fingerprint == teacher.tokenizer_fingerprint:
        raise ConfigError(f"memory {memory.folder} already has {teacher.model_id}'s tokenizer: nothing to transfer; "
                          f"use it as it is (memdec eval --base {teacher.model_id} --method memdec "
                          f"--set memdec.path={memory.folder})")
    last_block_mlp(teacher.model)  # a teacher must give last_ffn_input, the datastore's keys
    if memory.max_positions and context > memory.max_positions:
        raise ConfigError(f"windows of {context} tokens are longer than memory {memory.folder}'s "
                          f"{memory.max_positions} positions; pass a smaller --context")
    if not memory.manifest.get("train_tokens"):
        raise ConfigError(f"memory {memory.folder} does not record how many tokens it trained on, so a fraction "
                          f"of its budget is undefined")


def transfer_settings(memory: MemoryDecoder, fraction: float, **overrides) -> TrainSettings:
    """The original memory's recipe, with a budget of ``fraction`` of its training tokens.

    The budget counts tokens as each family's tokenizer cuts them: the same number of optimizer
    steps at the same batch and window size.
    """
    names = {item.name for item in dataclasses.fields(TrainSettings)}
    recipe = {key: value for key, value in (memory.manifest.get("train") or {}).items() if key in names}
    budget = max(1, math.ceil(fraction * memory.manifest["train_tokens"]))
    recipe.update(budget_tokens=budget, budget_flops=0.0, max_steps=0, init_layers=0, from_scratch=False)
    recipe.update({key: value for key, value in overrides.items() if value is not None})
    return TrainSettings(**recipe)


def transferred_start(memory: MemoryDecoder, family: LoadedModel, *, embeddings: str = "strings",
                      rows_model: LoadedModel | None = None, fresh_blocks: bool = False, seed: int = 0) -> MemoryStart:
    """The start of a memory of ``family``'s tokenizer made from ``memory``'s blocks.

    ``rows_model`` (a model of ``family``'s tokenizer, default ``family``) gives the rows of
    ``embeddings="model"``.
    """
    rows_model = rows_model or family
    if rows_model.tokenizer_fingerprint != family.tokenizer_fingerprint:
        raise ModelError(f"{rows_model.model_id} has another tokenizer than {family.model_id}: its rows cannot "
                         f"start the new memory's embeddings")
    size = family.vocab_size
    if embeddings == "model" and rows_model.vocab_size < size:
        raise ModelError(f"{rows_model.model_id} has {rows_model.vocab_size} output rows, fewer than the "
                         f"{size} of {family.model_id}")
    matches = matching_rows(memory, family.tokenizer, size) if embeddings == "strings" and not fresh_blocks else {}
    facts = {"transfer": {
        "memory": artifact_reference(memory.folder), "memory_tokenizer_fingerprint": memory.tokenizer_fingerprint,
        "memory_teacher": memory.manifest.get("teacher"), "embeddings": "init" if fresh_blocks else embeddings,
        "embeddings_model": rows_model.model_id if embeddings == "model" and not fresh_blocks else None,
        "fresh_blocks": fresh_blocks, "matched_tokens": len(matches), "vocabulary": size}}
    fingerprint = content_key("transfer", model_fingerprint(str(memory.folder)), family.tokenizer_fingerprint,
                              embeddings, rows_model.fingerprint if embeddings == "model" else None,
                              fresh_blocks, seed)

    def build(vocabulary: Vocabulary | None) -> torch.nn.Module:
        if fresh_blocks:
            model = _fresh_model(memory.model.config, family, seed)
        else:
            rows = _new_rows(memory, rows_model, embeddings, matches, size, seed)
            model = _with_rows(copy.deepcopy(memory.model).cpu().float(), rows, family)
        if vocabulary:
            restrict_model(model, vocabulary)
        return model.float().to(default_device()).train()

    return MemoryStart(family, f"transfer of {memory.folder}", fingerprint, build, facts)


def token_strings(tokenizer, size: int) -> list[str | None]:
    """The text each id decodes to; None past the tokenizer's end, for empty text, and for a
    partial UTF-8 sequence (which would match any other partial one)."""
    known = min(size, len(tokenizer))
    texts = tokenizer.batch_decode([[token] for token in range(known)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    strings = [text if text and "\ufffd" not in text else None for text in texts]
    return strings + [None] * (size - known)


def matching_rows(memory: MemoryDecoder, tokenizer, size: int) -> dict[int, int]:
    """New token id → the memory's row of the token that decodes to the same text (the lowest id
    where several do). A restricted memory has rows only for its kept tokens."""
    from transformers import AutoTokenizer

    memory_tokenizer = AutoTokenizer.from_pretrained(memory.folder)
    row_of = (memory.vocabulary.to_restricted if memory.vocabulary else torch.arange(memory.full_vocab_size)).tolist()
    other = memory.vocabulary.other if memory.vocabulary else None
    rows_by_text: dict[str, int] = {}
    for token, text in enumerate(token_strings(memory_tokenizer, memory.full_vocab_size)):
        if text is not None and row_of[token] != other:
            rows_by_text.setdefault(text, row_of[token])
    return {token: rows_by_text[text] for token, text in enumerate(token_strings(tokenizer, size))
            if text in rows_by_text}


def _new_rows(memory: MemoryDecoder, rows_model: LoadedModel, embeddings: str, matches: dict[int, int], size: int,
              seed: int) -> dict[str, torch.Tensor]:
    """``{"input": [size, width], "output": [size, width]}``; one tensor for both when the memory ties them."""
    model, donor = memory.model, rows_model.model
    layers = {"input": (model.get_input_embeddings().weight, donor.get_input_embeddings().weight)}
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        layers["output"] = (model.get_output_embeddings().weight, donor.get_output_embeddings().weight)
    rows = {}
    for offset, (kind, (own, donor_rows)) in enumerate(layers.items()):
        own = own.detach().float().cpu()
        reference = own[:-1] if memory.vocabulary else own  # without a restricted memory's shared "other" row
        if embeddings == "model":
            rows[kind] = _projected(donor_rows.detach().float().cpu()[:size], reference)
            continue
        with seeded(seed + offset):
            rows[kind] = reference.mean(0) + reference.std(0) * torch.randn(size, reference.shape[1])
        if matches:
            rows[kind][torch.tensor(list(matches))] = own[torch.tensor(list(matches.values()))]
    rows.setdefault("output", rows["input"])
    return rows


def _projected(donor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``donor`` rows in ``reference``'s width (its leading principal directions when wider) and
    at ``reference``'s mean and overall spread."""
    width = reference.shape[1]
    centred = donor - donor.mean(0)
    if donor.shape[1] != width:
        if donor.shape[1] < width:
            raise ModelError(f"the embedding model's rows have width {donor.shape[1]}, fewer than the memory's "
                             f"{width}; use embeddings 'strings' or 'fresh'")
        _, _, directions = torch.linalg.svd(centred[:: max(1, len(centred) // 65536)], full_matrices=False)
        centred = centred @ directions[:width].T
    scale = (reference - reference.mean(0)).std() / centred.std().clamp(min=1e-12)
    return reference.mean(0) + centred * scale


def _with_rows(model, rows: dict[str, torch.Tensor], family: LoadedModel):
    """``model`` (a memory's copy) with new embedding and output layers over ``family``'s vocabulary."""
    output = model.get_output_embeddings()
    tied = output.weight is model.get_input_embeddings().weight
    size, width = rows["input"].shape
    embedding = torch.nn.Embedding(size, width)
    embedding.weight.data = rows["input"].clone()
    head = torch.nn.Linear(width, size, bias=output.bias is not None)
    if tied:
        head.weight = embedding.weight
    else:
        head.weight.data = rows["output"].clone()
    if output.bias is not None:
        head.bias.data.zero_()
    model.set_input_embeddings(embedding)
    model.set_output_embeddings(head)
    _adopt_vocabulary(model, family)
    return model


def _fresh_model(config, family: LoadedModel, seed: int):
    """The memory's architecture over ``family``'s vocabulary, every weight fresh."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    _set_vocabulary(config, family)
    with seeded(seed):
        return AutoModelForCausalLM.from_config(config)


def _adopt_vocabulary(model, family: LoadedModel) -> None:
    _set_vocabulary(model.config, family)
    if getattr(model, "generation_config", None) is not None:
        source = getattr(family.model, "generation_config", None) or family.model.config
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            setattr(model.generation_config, key, getattr(source, key, None))


def _set_vocabulary(config, family: LoadedModel) -> None:
    """The vocabulary size and special token ids of ``family``, in ``config`` and its text config."""
    source = family.model.config.get_text_config()
    for target in {id(c): c for c in (config, config.get_text_config())}.values():
        target.vocab_size = family.vocab_size
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            setattr(target, key, getattr(source, key, None))
