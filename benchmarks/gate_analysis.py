"""How far a retrieval gate could go, and what its inputs and target change (an analysis, not a fit).

    python benchmarks/gate_analysis.py --domain law --allow 0.01 0.005

kNN-LM with the adaptive weight (memdec-demo-l, the compare's caps, the best temperature by held-out
NLL, as ``--combiner adaptive`` picks it). The shipped gate (``memdec_combiners.adaptive.fit_gate``)
regresses the fitted weight's logit on base-only inputs (the base's entropy and top log-prob, its
hidden state) and skips below a threshold chosen out of fold on validation. This script reuses its
pieces to compare, on the test split:

- the shipped gate (target: the weight's logit);
- the same inputs with the gain as target (the mixture's gold log-prob minus the base's: what skipping
  a position costs);
- either, with the context's n-gram counts in the datastore's tokens as extra inputs (log 1 + the
  number of times the last 1, 2, 3, 4 tokens occur in the train stream: known before any search);
- an oracle that skips in the order of the true test gain: the most any gate could skip.

It reads the test split for the comparison, which no fit does; nothing here is shipped.
"""

from __future__ import annotations

import argparse
import math


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", default="finance")
    parser.add_argument("--base", default="memdec-demo-l")
    parser.add_argument("--allow", type=float, nargs="+", default=[0.01, 0.005])
    parser.add_argument("--ridge", type=float, default=1000.0)
    args = parser.parse_args()

    from memdec_combiners.adaptive import Adaptive
    from memdec_core.api import prepare_context
    from memdec_core.engine.learning import collect_fit_data
    from memdec_core.interfaces import EvalSettings
    from memdec_knn.method import KnnLM

    ctx = prepare_context(args.domain, args.base, EvalSettings(max_train_tokens=32768, max_eval_tokens=4096))
    memory = KnnLM().create_memory(ctx)
    memory.prepare(ctx)
    settings = [dict(knobs) for knobs in memory.grid()]
    fitted = []
    for knobs, data in zip(settings, collect_fit_data(ctx, memory, settings, "valid")):
        combiner = Adaptive()
        fitted.append((combiner.fit(data)["heldout_nll"], knobs, data, combiner))
    _, knobs, valid, combiner = min(fitted, key=lambda entry: entry[0])
    test = _test_data(ctx, memory, knobs)
    print(f"{args.base} on {args.domain}, knn-lm --combiner adaptive at {knobs}")
    print("| gate inputs | target | allowance | valid skipped (out of fold) | test skipped | test ppl vs no gate |")
    print("|---|---|---|---|---|---|")
    counts = {split: _ngram_counts(ctx, split, data.positions) for split, data in (("valid", valid), ("test", test))}
    for ngrams in (False, True):
        for target in ("logit", "gain"):
            for allowance in args.allow:
                valid_share, test_share, increase = _gate(combiner.parameters, valid, test, target, allowance,
                                                          args.ridge, counts if ngrams else None)
                inputs = "entropy, top log-prob, hidden" + (", n-gram counts" if ngrams else "")
                print(f"| {inputs} | {target} | {allowance:g} | {valid_share:.1%} | {test_share:.1%} "
                      f"| {increase:+.2%} |")
    from memdec_combiners.adaptive import choose_threshold

    base_gold, mixed = _golds(combiner.parameters, test)
    for allowance in args.allow:
        _, share = choose_threshold(mixed - base_gold, mixed, base_gold, math.log1p(allowance))
        print(f"| oracle (the true test gain) | | {allowance:g} | | {share:.1%} | +{allowance:.2%} at most |")


def _test_data(ctx, memory, knobs):
    """The test split's FitData (``collect_fit_data`` refuses the test split, as every fit must)."""
    import torch

    from memdec_core.engine import learning
    from memdec_core.engine.scoring import batch_features, iter_scored_batches

    parts = []
    for batch in iter_scored_batches(ctx.base.model, ctx.corpus.streams["test"], ctx.windows("test"),
                                     batch_size=ctx.settings.batch_size, capture_hidden=memory.needs_hidden):
        state = memory.score(batch)
        parts.append((batch_features(memory, state, batch, knobs), batch.gold_logprobs(),
                      memory.gold_logprobs(state, batch, knobs).float(), torch.as_tensor(batch.positions),
                      batch.hidden))
    return learning._fit_data(parts, learning.feature_names(memory), ctx.settings.seed, memory.skippable)


def _ngram_counts(ctx, split: str, positions):
    """``[N, 4]`` log(1 + count) of the n tokens ending at each position (n = 1..4) among the train
    stream's n-grams that have a next token (the datastore's entries)."""
    import numpy as np
    import torch

    train = np.asarray(ctx.corpus.streams["train"]).astype(np.int64)
    stream = np.asarray(ctx.corpus.streams[split]).astype(np.int64)
    ends = positions.numpy().astype(np.int64)
    columns = []
    for n in (1, 2, 3, 4):
        keys, counts = np.unique(_hashes(train, np.arange(n - 1, len(train) - 1), n), return_counts=True)
        query = _hashes(stream, ends, n)
        at = np.clip(np.searchsorted(keys, query), 0, len(keys) - 1)
        columns.append(np.where(keys[at] == query, counts[at], 0))
    return torch.from_numpy(np.log1p(np.stack(columns, 1)).astype(np.float32))


def _hashes(stream, ends, n: int):
    import numpy as np

    hashes = np.zeros(len(ends), dtype=np.int64)
    for back in range(n):
        at = ends - back
        hashes = hashes * 1_000_003 + np.where(at >= 0, stream[np.clip(at, 0, None)], -1)
    return hashes


def _golds(parameters, data):
    """``(base gold, mixture gold)`` log-probs per position, in float64."""
    from memdec_combiners.adaptive import mixture_nll_each, mlp_logits

    logits = mlp_logits(parameters, data.features.float()).clamp(-12, 12)
    base_gold = data.base_gold.double()
    return base_gold, -mixture_nll_each(logits, base_gold, data.memory_gold.double())


def _gate(parameters, valid, test, target: str, allowance: float, ridge: float, counts):
    """``(valid share skipped out of fold, test share skipped, test perplexity increase)`` of a ridge
    gate over base-only inputs, fitted and thresholded on validation as ``fit_gate`` does."""
    import torch

    from memdec_combiners.adaptive import (
        GATE_BLOCK,
        GATE_FOLDS,
        _ridge,
        choose_threshold,
        gate_terms,
        mlp_logits,
        share_threshold,
    )
    from memdec_core.engine.features import GATE_FEATURES

    def inputs(data, split):
        columns = [data.feature_names.index(name) for name in GATE_FEATURES]
        parts = [data.features[:, columns].float(), data.hidden.float()]
        return torch.cat(parts + ([counts[split]] if counts else []), dim=1)

    features, test_features = inputs(valid, "valid"), inputs(test, "test")
    mean, std = features.mean(0), features.std(0)
    scaling = {"gate_mean": mean, "gate_std": torch.where(std > 1e-6, std, torch.ones_like(std))}
    terms, test_terms = gate_terms(scaling, features).double(), gate_terms(scaling, test_features).double()
    base_gold, mixed = _golds(parameters, valid)
    values = (mlp_logits(parameters, valid.features.float()).clamp(-12, 12).double() if target == "logit"
              else (mixed - base_gold).clamp(-3, 3))
    folds = (valid.positions // GATE_BLOCK) % GATE_FOLDS
    scores = torch.empty(len(terms), dtype=torch.float64)
    for fold in range(GATE_FOLDS):
        rows = folds == fold
        scores[rows] = terms[rows] @ _ridge(terms[~rows], values[~rows], ridge)
    weights = _ridge(terms, values, ridge)
    _, share = choose_threshold(scores, mixed, base_gold, math.log1p(allowance))
    threshold = share_threshold(terms @ weights, share)
    test_base, test_mixed = _golds(parameters, test)
    skipped = (test_terms @ weights) < threshold
    gated = torch.where(skipped, test_base, test_mixed)
    return share, float(skipped.double().mean()), math.exp(float(test_mixed.mean() - gated.mean())) - 1


if __name__ == "__main__":
    main()
