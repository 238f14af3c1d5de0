"""How well a Memory Decoder imitates its kNN teacher, on text it was not trained on.

On the validation split the teacher's hidden states search its datastore exactly as the training
targets did (the memory's own k and T; validation positions have no entry of their own to
exclude), and the memory runs on the same windows. Reported: top-1 agreement (the memory's most
likely token is the kNN distribution's) and KL(p_kNN ‖ p_memory) in nats per position, the
paper's training objective measured where it was not optimised ("Memory Decoder at Scale"
reports 86.6 % and 0.18).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch

from memdec_core.engine.scoring import iter_scored_batches
from memdec_core.interfaces import EvalContext
from memdec_decoder.memory import MemoryDecoder
from memdec_decoder.settings import DecoderSettings

#: Fidelity per (memory folder, validation data, teacher windows): one memory serves every base.
_MEASURED: dict[tuple, dict] = {}


def target_fidelity(ctx: EvalContext, config: DecoderSettings, memory: MemoryDecoder) -> dict:
    """``{"target_agreement", "target_kl", "fidelity_positions"}`` of ``memory`` on validation."""
    from memdec_decoder.pipeline import teacher_context, teacher_datastore

    teacher_ctx = teacher_context(ctx, _with_teacher(config, memory))
    key = (Path(memory.folder), teacher_ctx.corpus.data_hash("valid"), teacher_ctx.base.fingerprint,
           teacher_ctx.context, teacher_ctx.stride)
    if key not in _MEASURED:
        store = teacher_datastore(teacher_ctx, config)
        _MEASURED[key] = _measure(teacher_ctx, store, memory, int(memory.manifest["k"]),
                                  float(memory.manifest["temperature"]))
    return dict(_MEASURED[key])


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
