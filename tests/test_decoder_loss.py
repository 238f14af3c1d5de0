"""The Memory Decoder objective against the dense reference."""

import pytest
import torch
import torch.nn.functional as F

from memdec_core.errors import ConfigError
from memdec_decoder.loss import memory_decoder_loss, sparse_kl


def random_sparse_targets(rows: int, vocab: int, width: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((rows, width), -1, dtype=torch.long)
    probs = torch.zeros(rows, width)
    for row in range(rows):
        support = int(torch.randint(1, width + 1, (1,), generator=generator))
        ids[row, :support] = torch.randperm(vocab, generator=generator)[:support]
        weights = torch.rand(support, generator=generator)
        weights[0] = 0.0 if support > 1 else 1.0  # a zero-probability entry on the support
        probs[row, :support] = weights / weights.sum()
    return ids, probs


def densify(ids, probs, vocab):
    dense = torch.zeros(len(ids), vocab, dtype=torch.float64)
    return dense.scatter_add_(1, ids.clamp(min=0), probs.double() * (ids >= 0))


def test_sparse_kl_equals_dense_kl_div():
    vocab = 97
    logits = torch.randn(12, vocab, dtype=torch.float64) * 3
    ids, probs = random_sparse_targets(12, vocab, 6, seed=0)
    logprobs = torch.log_softmax(logits, dim=-1)
    dense = F.kl_div(logprobs, densify(ids, probs, vocab), reduction="none").sum(dim=1)
    assert torch.allclose(sparse_kl(logprobs, ids, probs.double()), dense, atol=1e-5)


def test_padded_rows_from_a_target_set_feed_the_loss(tmp_path):
    import numpy as np
    from test_targets import make_store

    from memdec_decoder.targets import TargetSettings, build_targets

    store = make_store(tmp_path, np.tile(np.arange(10), 8))
    target_set = build_targets(store, tmp_path / "t", TargetSettings(k=3, temperature=1.0))
    ids, probs = target_set.padded([0, 5, 17])
    assert ids.shape == probs.shape and ids.shape[0] == 3
    for row, position in enumerate([0, 5, 17]):
        row_ids, row_probs = target_set.row(position)
        assert ids[row, :len(row_ids)].tolist() == row_ids.tolist()
        assert (ids[row, len(row_ids):] == -1).all() and (probs[row, len(row_ids):] == 0).all()
    logits = torch.randn(3, 10)
    assert torch.isfinite(memory_decoder_loss(logits, torch.tensor([1, 6, 8]), ids, probs))


def test_loss_mixes_kl_and_cross_entropy_and_has_gradients():
    vocab = 50
    logits = torch.randn(8, vocab, requires_grad=True)
    gold = torch.randint(0, vocab, (8,))
    ids, probs = random_sparse_targets(8, vocab, 4, seed=1)
    logprobs = torch.log_softmax(logits, dim=-1)
    kl = F.kl_div(logprobs.double(), densify(ids, probs, vocab), reduction="none").sum(1).mean()
    ce = F.cross_entropy(logits.double(), gold)
    for beta in (0.0, 0.5, 1.0):
        loss = memory_decoder_loss(logits, gold, ids, probs, beta).detach()
        assert float(loss) == pytest.approx(float((beta * kl + (1 - beta) * ce).detach()), abs=1e-5)
    memory_decoder_loss(logits, gold, ids, probs).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ConfigError, match=r"β \(beta\) must be in \[0, 1\]"):
        memory_decoder_loss(logits, gold, ids, probs, beta=1.5)
