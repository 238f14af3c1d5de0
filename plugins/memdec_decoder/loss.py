"""The Memory Decoder objective: β·KL(p_kNN ‖ p_mem) + (1−β)·CE(gold), the KL computed sparsely.

kNN targets put mass on a handful of tokens, so the KL is summed over each row's support only:
Σ_{v∈support} p_kNN(v)·(log p_kNN(v) − log p_mem(v)). Nothing the size of the vocabulary is built
from the targets (the public code densifies every row to a full fp32 vocabulary vector).
"""

from __future__ import annotations

import torch

from memdec_core.errors import ConfigError


def sparse_kl(logprobs: torch.Tensor, target_ids: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """``[N]`` KL(p_kNN ‖ p_mem) per row.

    ``logprobs``: ``[N, vocab]`` log p_mem; ``target_ids`` / ``target_probs``: ``[N, S]`` sparse
    targets, padded with id −1 and probability 0.
    """
    support = target_ids >= 0
    memory = logprobs.gather(1, target_ids.clamp(min=0))
    probs = target_probs.to(logprobs.dtype)
    # 0·log 0 = 0: padding and zero-probability entries contribute nothing.
    terms = torch.where(support & (probs > 0), probs * (probs.clamp(min=1e-30).log() - memory), 0.0)
    return terms.sum(dim=1)


def memory_decoder_loss(logits: torch.Tensor, gold: torch.Tensor, target_ids: torch.Tensor,
                        target_probs: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Mean over rows of β·KL(p_kNN ‖ p_mem) + (1−β)·CE(gold); ``logits`` is ``[N, vocab]``."""
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"β (beta) must be in [0, 1], got {beta}")
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    cross_entropy = -logprobs.gather(1, gold[:, None])[:, 0]
    return (beta * sparse_kl(logprobs, target_ids, target_probs) + (1 - beta) * cross_entropy).mean()
