"""The kNN next-token distribution: softmax(−d/T) over neighbours, summed per token, kept sparse.

A full-vocabulary row is never built here: a row has at most k distinct tokens.
"""

from __future__ import annotations

import torch


def neighbour_logweights(distances: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(−d/T) over each row's neighbours; missing neighbours (id −1) get −inf."""
    scores = (-distances.double() / temperature).masked_fill(ids < 0, float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def gold_logprobs(distances: torch.Tensor, ids: torch.Tensor, values: torch.Tensor,
                  targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[N]`` log p_kNN(gold): log of the summed weights of the neighbours whose value is the gold token."""
    logweights = neighbour_logweights(distances, ids, temperature)
    matching = (values == targets[:, None]) & (ids >= 0)
    return torch.logsumexp(logweights.masked_fill(~matching, float("-inf")), dim=-1).float()


def sparse_distribution(distances: torch.Tensor, ids: torch.Tensor, values: torch.Tensor,
                        temperature: float, grouping: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the distinct tokens among the neighbours and their summed probability.

    Returns ``(token_ids, probs)``, both ``[N, k]``: row r's support is the entries with
    ``token_ids[r] >= 0``; the remaining slots are padding (id −1, probability 0). ``grouping``:
    ``token_groups(ids, values)``, when several temperatures share one search.
    """
    order, group, token_ids = grouping or token_groups(ids, values)
    sorted_weights = neighbour_logweights(distances, ids, temperature).exp().gather(-1, order)
    probs = torch.zeros_like(sorted_weights).scatter_add_(-1, group, sorted_weights)
    probs = probs.masked_fill(token_ids < 0, 0.0)
    return token_ids, probs.float()


def token_groups(ids: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which neighbours hold the same token, independent of the temperature: ``(order, group,
    token_ids)``: the neighbours sorted by token, the output slot of each, the token of each slot."""
    tokens = values.long().masked_fill(ids < 0, -1)
    sorted_tokens, order = tokens.sort(dim=-1)
    starts_group = torch.ones_like(sorted_tokens, dtype=torch.bool)
    starts_group[:, 1:] = sorted_tokens[:, 1:] != sorted_tokens[:, :-1]
    group = starts_group.long().cumsum(dim=-1) - 1  # slot of each neighbour's token in the output
    token_ids = torch.full_like(sorted_tokens, -1).scatter_(-1, group, sorted_tokens)
    return order, group, token_ids


def dense_logprobs(distances: torch.Tensor, ids: torch.Tensor, values: torch.Tensor,
                   temperature: float, vocab_size: int) -> torch.Tensor:
    """``[N, vocab]`` log p_kNN, for combiners that need whole rows (one batch at a time)."""
    token_ids, probs = sparse_distribution(distances, ids, values, temperature)
    dense = torch.zeros(len(token_ids), vocab_size, dtype=torch.float32)
    dense.scatter_add_(-1, token_ids.clamp(min=0), probs)
    return dense.log()
