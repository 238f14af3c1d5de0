"""How well a Memory Decoder imitates its kNN teacher, on text it was not trained on.

On the validation split the teacher's hidden states search its datastore exactly as the training
targets did (the memory's own k and T; validation positions have no entry of their own to
exclude), and the memory runs on the same windows. Reported: top-1 agreement (the memory's most
likely token is the kNN distribution's) and KL(p_kNN ‖ p_memory) in nats per position, the
paper's training objective measured where it was not optimised ("Memory Decoder at Scale"
reports 86.6 % and 0.18).

The figures are measured once per memory, data, windows and retriever and kept in the cache
(``fidelity/<key>.json``): a later evaluation of the same memory reads them back, without loading
the teacher or opening its datastore again.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from memdec_core.components import registry
from memdec_core.components.identity import component_identity
from memdec_core.engine.scoring import iter_scored_batches
from memdec_core.inputs.models import compute_dtype, model_fingerprint
from memdec_core.interfaces import EvalContext
from memdec_core.store.artifacts import cached_artifact, content_key, write_json
from memdec_decoder.memory import MemoryDecoder
from memdec_decoder.pipeline import (
    context_with_teacher,
    decoder_identity,
    run_bases,
    teacher_and_init,
    teacher_datastore,
)
from memdec_decoder.settings import DecoderSettings


def target_fidelity(ctx: EvalContext, config: DecoderSettings, memory: MemoryDecoder) -> dict:
    """``{"target_agreement", "target_kl", "fidelity_positions"}`` of ``memory`` on validation,
    measured on first use and cached."""
    config = _with_teacher(config, memory)
    teacher_name, _ = teacher_and_init(ctx.base, config, run_bases(ctx))
    path = cached_artifact("fidelity", fidelity_key(ctx, config, teacher_name, memory) + ".json")
    figures = _read(path)
    if figures is None:
        teacher_ctx = context_with_teacher(ctx, teacher_name)
        figures = _measure(teacher_ctx, teacher_datastore(teacher_ctx, config), memory, int(memory.manifest["k"]),
                           float(memory.manifest["temperature"]))
        write_json(path, figures)
    return figures


def fidelity_key(ctx: EvalContext, config: DecoderSettings, teacher_name: str, memory: MemoryDecoder) -> str:
    """Everything the figures depend on, known without loading the teacher: the memory's files, the
    teacher's (its windows follow from the settings and its config), the data, the retriever and
    its search settings, the plugins' code and the precision the passes run in."""
    retriever = ctx.create("retrievers", config.retriever)
    teacher = ctx.base.fingerprint if teacher_name == ctx.base.model_id else model_fingerprint(teacher_name)
    corpus, settings = ctx.corpus, ctx.settings
    return content_key("fidelity", model_fingerprint(str(memory.folder)), teacher, ctx.base.tokenizer_fingerprint,
                       corpus.data_hash("train"), corpus.data_hash("valid"), settings.context, settings.stride,
                       settings.batch_size, retriever.name, component_identity(type(retriever)),
                       dataclasses.asdict(retriever.config), decoder_identity(),
                       component_identity(registry.get("memory-models", "knn-datastore")), compute_dtype())


def _read(path: Path) -> dict | None:
    """Figures measured before, or None (never measured, or unreadable: then measured again)."""
    try:
        figures = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return figures if isinstance(figures, dict) else None


def _with_teacher(config: DecoderSettings, memory: MemoryDecoder) -> DecoderSettings:
    """A memory opened from a folder names its teacher in its manifest."""
    if config.path and memory.manifest.get("teacher"):
        return dataclasses.replace(config, path="", teacher=memory.manifest["teacher"])
    return config


def _measure(teacher_ctx: EvalContext, store, memory: MemoryDecoder, k: int, temperature: float) -> dict:
    from memdec_knn.api import sparse_distribution

    stream = teacher_ctx.corpus.streams["valid"]
    agree, kl, positions = 0, 0.0, 0
    batches = iter_scored_batches(teacher_ctx.base.model, stream, teacher_ctx.windows("valid"),
                                  batch_size=teacher_ctx.settings.batch_size, capture_hidden=True,
                                  with_logits=False, description="memory fidelity")
    for batch in batches:
        distances, ids = store.search(batch.hidden.numpy(), min(k, len(store)))
        values = store.vals[np.clip(ids, 0, None)].astype(np.int64)
        tokens, probs = sparse_distribution(torch.from_numpy(distances), torch.from_numpy(ids),
                                            torch.from_numpy(values), temperature)
        restricted = memory.scored_logprobs(batch.input_ids, batch.attention_mask, batch.rows, batch.columns)
        memory_logprobs = memory.to_full(restricted, memory.full_vocab_size)
        batch_agree, batch_kl = agreement_and_kl(tokens, probs, memory_logprobs)
        agree, kl, positions = agree + batch_agree, kl + batch_kl, positions + len(tokens)
    if not positions:
        return {}
    # A token of the kNN support that the memory cannot name makes the KL infinite: not a number to report.
    return {"target_agreement": agree / positions, "target_kl": kl / positions if math.isfinite(kl) else None,
            "fidelity_positions": positions}


def agreement_and_kl(tokens: torch.Tensor, probs: torch.Tensor, memory_logprobs: torch.Tensor) -> tuple[int, float]:
    """Over rows of a sparse kNN distribution (``tokens``/``probs``, padded with id −1) and the
    memory's full log-probs: how many rows share their top token, and the summed KL(p_kNN ‖ p_mem)."""
    support = tokens >= 0
    knn_top = tokens.gather(1, probs.argmax(dim=1, keepdim=True))[:, 0]
    agree = int((memory_logprobs.argmax(dim=1) == knn_top).sum())
    safe_tokens = tokens.clamp(min=0)
    memory_at_support = memory_logprobs.gather(1, safe_tokens).double()
    p = probs.double()
    terms = torch.where(support & (p > 0), p * (p.log() - memory_at_support), torch.zeros_like(p))
    return agree, float(terms.sum())
