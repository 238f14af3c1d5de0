"""Per-position features of a base and a memory, for combiners that learn their weight.

Every base and every memory provides them, from their next-token distributions alone: how sure
each one is (entropy, top log-prob), how many tokens the memory names, and how much the two agree
(KL, each one's log-prob of the other's top token). A memory may add facts of its own
(``MemoryModel.features``: a kNN store's nearest distance). The memory's distribution comes
either as whole rows or kept sparse (``MemoryModel.support``); both give the same features, so a
combiner fitted in evaluation (sparse) behaves the same in generation (whole rows).
"""

from __future__ import annotations

import torch

#: The features every base and memory give, in this order (log-probs in nats).
GENERIC_FEATURES = ("base_entropy", "base_top", "memory_entropy", "memory_top", "memory_support",
                    "memory_kl", "memory_at_base_top", "base_at_memory_top")
#: Where a log-prob is −inf (the memory names no such token), the feature reads this floor.
LOGPROB_FLOOR = -30.0


def feature_names(memory) -> tuple[str, ...]:
    """The names of the features a combiner sees with ``memory``: the generic ones, then its own."""
    return GENERIC_FEATURES + tuple(memory.feature_names)


def base_features(base_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(entropy, top log-prob, top token)`` of the base, each ``[N]``: known before any search."""
    top, token = base_logprobs.max(dim=-1)
    return _entropy(base_logprobs), top, token


#: The base-only features a retrieval gate reads (``Combiner.gate``): the first columns of
#: ``GENERIC_FEATURES``, computed the same way, so a gate fitted on ``FitData.features`` reads the same numbers.
GATE_FEATURES = GENERIC_FEATURES[:2]


def gate_features(base_logprobs: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, 2 (+ dim)]`` what a retrieval gate knows before any search: the base's entropy and
    top log-prob (``GATE_FEATURES``), then its hidden state (``[N, dim]``, the kNN query) where
    the memory reads one."""
    entropy, top, _ = base_features(base_logprobs.float())
    columns = [entropy.float().clamp(min=LOGPROB_FLOOR)[:, None], top.float().clamp(min=LOGPROB_FLOOR)[:, None]]
    if hidden is not None:
        columns.append(hidden.float().reshape(len(entropy), -1).to(entropy.device))
    return torch.cat(columns, dim=1)


def token_features(base_logprobs: torch.Tensor, memory_logprobs: torch.Tensor | None = None, *,
                   support: tuple[torch.Tensor, torch.Tensor] | None = None,
                   own: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, F]`` features (``GENERIC_FEATURES``, then the memory's ``own`` columns), fp32.

    The memory is given as whole rows ``memory_logprobs`` ``[N, vocab]`` or as ``support``
    ``(token_ids, logprobs)`` ``[N, S]`` (padding: id −1, log-prob −inf).
    """
    base_logprobs = base_logprobs.float()
    base_entropy, base_top, base_token = base_features(base_logprobs)
    if support is None:
        ids, logprobs = None, memory_logprobs.float()
        base_at = base_logprobs
    else:
        ids, logprobs = support[0], support[1].float()
        logprobs = logprobs.masked_fill(ids < 0, float("-inf"))
        base_at = base_logprobs.gather(1, ids.clamp(min=0))
    named = torch.isfinite(logprobs)
    probs = logprobs.exp()
    memory_entropy = -torch.where(named, probs * logprobs, 0.0).sum(-1)
    memory_kl = torch.where(named, probs * (logprobs - base_at), 0.0).sum(-1)
    memory_top, best = logprobs.max(dim=-1)
    memory_token = best if ids is None else ids.gather(1, best[:, None])[:, 0]
    if ids is None:
        at_base_top = logprobs.gather(1, base_token[:, None])[:, 0]
    else:
        at_base_top = torch.logsumexp(logprobs.masked_fill(ids != base_token[:, None], float("-inf")), dim=-1)
    base_at_memory_top = base_logprobs.gather(1, memory_token.clamp(min=0)[:, None])[:, 0]
    columns = [base_entropy, base_top, memory_entropy, memory_top, named.sum(-1).float().log1p(),
               memory_kl, at_base_top, base_at_memory_top]
    features = torch.stack([column.float().clamp(min=LOGPROB_FLOOR) for column in columns], dim=1)
    if own is not None:
        features = torch.cat([features, own.float().reshape(len(features), -1)], dim=1)
    return features


def _entropy(logprobs: torch.Tensor) -> torch.Tensor:
    probs = logprobs.exp()
    return -torch.where(probs > 0, probs * logprobs, 0.0).sum(-1)
