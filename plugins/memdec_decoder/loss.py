"""The Memory Decoder objective: β·KL(p_kNN ‖ p_mem) + (1−β)·CE(gold), the KL computed sparsely.

Optionally part of the KL's weight goes to the teacher's own distribution (``distill``, see
``teacher_targets``).

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
                        target_probs: torch.Tensor, beta: float = 0.5, teacher: tuple | None = None,
                        distill: float = 0.0) -> torch.Tensor:
    """Mean over rows of β·KL(p_kNN ‖ p_mem) + (1−β)·CE(gold); ``logits`` is ``[N, vocab]``.

    With ``teacher`` (sparse ids and probabilities of the teacher's own distribution, padded like
    the kNN targets) and ``distill`` = d, the KL term is β·[(1−d)·KL(p_kNN ‖ p_mem) + d·KL(p_teacher ‖ p_mem)].
    """
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"β (beta) must be in [0, 1], got {beta}")
    if not 0.0 <= distill <= 1.0:
        raise ConfigError(f"distill must be in [0, 1], got {distill}")
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    cross_entropy = -logprobs.gather(1, gold[:, None])[:, 0]
    kl = sparse_kl(logprobs, target_ids, target_probs)
    if distill:
        if teacher is None:
            raise ConfigError("distill > 0 needs the teacher's distributions")
        kl = (1 - distill) * kl + distill * sparse_kl(logprobs, *teacher)
    return (beta * kl + (1 - beta) * cross_entropy).mean()
