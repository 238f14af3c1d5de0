"""The adaptive combiner and the features it learns from, against brute-force references."""

import math

import numpy as np
import pytest
import torch

from memdec_combiners.adaptive import Adaptive, mixture_nll
from memdec_core.api import prepare_context
from memdec_core.engine.features import GENERIC_FEATURES, LOGPROB_FLOOR, token_features
from memdec_core.engine.learning import HOLDOUT_BLOCK, HOLDOUT_EVERY, fit_combiners
from memdec_core.interfaces import EvalSettings, FitData
from memdec_knn.memory import KnnDatastore

CONTEXT, STRIDE = 64, 32


def brute_force_features(base: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """GENERIC_FEATURES of one row pair, written out token by token from their definitions."""
    p_base, p_memory = np.exp(base), np.exp(memory)
    named = [v for v in range(len(base)) if p_memory[v] > 0]
    base_top, memory_top = int(np.argmax(base)), int(np.argmax(memory))
    values = {
        "base_entropy": -sum(p_base[v] * base[v] for v in range(len(base))),
        "base_top": base[base_top],
        "memory_entropy": -sum(p_memory[v] * memory[v] for v in named),
        "memory_top": memory[memory_top],
        "memory_support": math.log1p(len(named)),
        "memory_kl": sum(p_memory[v] * (memory[v] - base[v]) for v in named),
        "memory_at_base_top": memory[base_top],
        "base_at_memory_top": base[memory_top],
    }
    return np.array([max(values[name], LOGPROB_FLOOR) for name in GENERIC_FEATURES])


def sparse_rows(vocab: int, rows: int, support: int, seed: int):
    """A memory naming ``support`` tokens per row: as (token ids, log-probs) padded with −1, and whole."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:support] for _ in range(rows)])
    logprobs = torch.log_softmax(torch.randn(rows, support, generator=generator) * 2, -1)
    ids = torch.cat([ids, torch.full((rows, 3), -1)], 1)  # padding slots, as a kNN support has
    logprobs = torch.cat([logprobs, torch.full((rows, 3), float("-inf"))], 1)
    dense = torch.full((rows, vocab), float("-inf"))
    dense.scatter_(1, ids[:, :support], logprobs[:, :support])
    return (ids, logprobs), dense


def test_features_equal_their_definitions_from_whole_rows_and_from_a_sparse_support():
    """The features evaluation computes from a kNN's sparse support are the ones generation
    computes from whole rows, and both are the definitions (a row where the memory misses the
    base's top token reads the floor)."""
    vocab, rows = 30, 5
    base = torch.log_softmax(torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1)) * 2, -1)
    support, dense = sparse_rows(vocab, rows, support=6, seed=2)
    reference = np.stack([brute_force_features(base[r].double().numpy(), dense[r].double().numpy())
                          for r in range(rows)])
    from_dense = token_features(base, dense).double().numpy()
    from_support = token_features(base, support=support).double().numpy()
    np.testing.assert_allclose(from_dense, reference, atol=1e-5)
    np.testing.assert_allclose(from_support, reference, atol=1e-5)
    assert (from_dense[:, GENERIC_FEATURES.index("memory_at_base_top")] == LOGPROB_FLOOR).any()


def fit_data(features: torch.Tensor, base_gold: torch.Tensor, memory_gold: torch.Tensor, seed: int = 0) -> FitData:
    positions = torch.arange(len(base_gold))
    train = (positions // HOLDOUT_BLOCK) % HOLDOUT_EVERY != HOLDOUT_EVERY - 1
    return FitData(features, tuple(f"f{i}" for i in range(features.shape[1])), base_gold, memory_gold, positions,
                   train, seed)


def test_with_constant_features_the_learned_weight_is_the_best_fixed_lambda():
    """Features that say nothing leave one weight for every position: the fixed λ that a
    brute-force search over λ finds best on the positions fitted on."""
    generator = torch.Generator().manual_seed(0)
    count = 2000
    base_gold = -torch.rand(count, generator=generator) * 6
    memory_gold = -torch.rand(count, generator=generator) * 6
    memory_gold[::7] = float("-inf")  # a kNN-LM names no gold token at some positions
    data = fit_data(torch.full((count, 4), 3.0), base_gold, memory_gold)
    combiner = Adaptive()
    combiner.fit(data)
    weights = combiner.weights({"features": data.features})
    assert torch.all(weights == weights[0])
    lams = torch.linspace(0.0005, 0.9995, 2000, dtype=torch.float64)
    nll = [float(mixture_nll(torch.full((int(data.train.sum()),), math.log(lam / (1 - lam)), dtype=torch.float64),
                             base_gold[data.train].double(), memory_gold[data.train].double())) for lam in lams]
    assert float(weights[0]) == pytest.approx(float(lams[int(np.argmin(nll))]), abs=1e-3)


def test_a_weight_that_tracks_a_feature_is_learned_and_beats_the_fixed_lambda_on_held_out_positions():
    """Where the memory is right exactly when a feature is high, the fit finds it: the held-out NLL
    falls below the fixed λ's, and the weights rise with the feature."""
    generator = torch.Generator().manual_seed(3)
    count = 3000
    signal = torch.randn(count, generator=generator)
    features = torch.stack([signal, torch.randn(count, generator=generator)], 1)
    base_gold = torch.where(signal > 0, -5.0, -1.0)
    memory_gold = torch.where(signal > 0, -0.2, -7.0)
    combiner = Adaptive()
    facts = combiner.fit(fit_data(features, base_gold, memory_gold))
    assert facts["heldout_nll"] < facts["constant_heldout_nll"] - 0.5
    weights = combiner.weights({"features": features})
    assert float(weights[signal > 1].mean()) > 0.9 > 0.1 > float(weights[signal < -1].mean())


def test_the_same_seed_fits_the_same_bits_and_another_seed_other_bits():
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(1500, 6, generator=generator)
    base_gold = -torch.rand(1500, generator=generator) * 4
    memory_gold = -torch.rand(1500, generator=generator) * 4 + features[:, 0]
    states = []
    for seed in (0, 0, 1):
        combiner = Adaptive()
        combiner.fit(fit_data(features, base_gold, memory_gold.clamp(max=0), seed))
        states.append(combiner.state_dict())
    assert all(torch.equal(states[0][name], states[1][name]) for name in states[0])
    assert not torch.equal(states[0]["w1"], states[2]["w1"])


def test_an_unfitted_adaptive_combiner_says_so_in_one_line():
    from memdec_core.errors import ConfigError

    with pytest.raises(ConfigError, match="not fitted"):
        Adaptive().combine(torch.zeros(2, 3), torch.zeros(2, 3), {"features": torch.zeros(2, 8)})


@pytest.fixture(scope="module")
def knn_ctx(tiny_gpt2, corpus_dir):
    return prepare_context(str(corpus_dir), str(tiny_gpt2), EvalSettings(context=CONTEXT, stride=STRIDE),
                           combiner="adaptive")


def test_a_fit_is_cached_and_a_corrupt_cached_fit_is_fitted_again(knn_ctx, monkeypatch):
    """The second fit of the same base, memory and data is read back (the same tensors, no
    validation pass); a cached file that cannot be read is fitted again, not trusted."""
    from memdec_core.engine import learning

    memory = KnnDatastore(k=16, temperatures=(3.0, 10.0))
    memory.prepare(knn_ctx)
    settings = [(knobs, knn_ctx.combiner.Config()) for knobs in memory.grid()]
    path = learning.cached_artifact("combiners", learning.fit_key(knn_ctx, memory, settings) + ".safetensors")
    path.unlink(missing_ok=True)  # another test may have made this fit already
    first = fit_combiners(knn_ctx, memory, settings)
    assert not first.cached
    passes = []
    original = learning.collect_fit_data
    monkeypatch.setattr(learning, "collect_fit_data", lambda *a, **k: passes.append(1) or original(*a, **k))
    second = fit_combiners(knn_ctx, memory, settings)
    assert second.cached and not passes and second.best == first.best
    for one, other in zip(first.combiners, second.combiners):
        assert all(torch.equal(tensor, other.state_dict()[name]) for name, tensor in one.state_dict().items())
    path.write_bytes(b"not safetensors")
    third = fit_combiners(knn_ctx, memory, settings)
    assert not third.cached and passes == [1]
    assert third.facts[third.best]["heldout_nll"] == first.facts[first.best]["heldout_nll"]


def test_knn_lm_with_the_adaptive_combiner_reports_its_fit_and_weights(knn_ctx):
    """knn-lm mixed by ``adaptive``: chosen by fit (no λ grid), a finite test perplexity, the
    weights' mean and spread, the fit's seconds and FLOPs in the row's costs."""
    from memdec_knn.method import KnnLM

    result = KnnLM(k=16, temperatures=(3.0, 10.0)).evaluate(knn_ctx)
    assert math.isfinite(result.test_ppl)
    assert result.details["knobs_from"] == "fit" and "lam" not in result.knobs
    weights = result.details["weights"]
    assert 0 < weights["weight_mean"] < 1 and weights["weight_std"] >= 0 and weights["weight_sample"]
    fit = result.details["fit"]
    assert fit["fitted"] and math.isfinite(fit["heldout_nll"])
    assert result.costs.train_flops >= fit["flops"] > 0
