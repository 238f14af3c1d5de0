"""Adaptive retrieval: kNN-LM with the adaptive weight, with and without the retrieval gate, side by side.

    python benchmarks/gate_bench.py                                   # memdec-demo-l, finance, gate 0.01
    python benchmarks/gate_bench.py --domain law --gate 0.01 0.005   # a row per allowance

Both rows are the same kNN-LM (the same datastore, the same fitted weight: the fit is seeded and
the gate is fitted after it) with ``--combiner adaptive``; the gated one skips the search wherever
a base-only predictor of the weight is below the threshold chosen on held-out validation
positions (``adaptive.gate``: the held-out perplexity increase allowed). Prints each one's test
perplexity, the share of test searches skipped, and the generation latency of each (greedy, 16
tokens after each of ``--prompts`` 64-token prompts spread over the test split, timed in alternating
rounds with ``memdec_core.engine.latency``, the compare's latency column; the median over the prompts),
with the share of those generation steps that searched, so the saving and its cost are read from one run.
"""

from __future__ import annotations

import argparse
import dataclasses


def main() -> None:
    import torch

    from memdec_combiners.adaptive import Adaptive
    from memdec_core.api import prepare_context
    from memdec_core.components.combiner_files import resolve_combiner
    from memdec_core.engine.generation import model_generator
    from memdec_core.engine.latency import Timing, generation_latency
    from memdec_core.interfaces import EvalSettings
    from memdec_core.runtime.progress import quiet
    from memdec_knn.method import KnnLM

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", default="finance")
    parser.add_argument("--base", default="memdec-demo-l")
    parser.add_argument("--gate", type=float, nargs="+", default=[0.01],
                        help="validation perplexity increase allowed (adaptive.gate); several: a row each")
    parser.add_argument("--max-train-tokens", type=int, default=32768)
    parser.add_argument("--max-eval-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured generation time per side, at least")
    parser.add_argument("--prompts", type=int, default=8, help="prompts, evenly spaced over the test split")
    args = parser.parse_args()

    base_ctx = prepare_context(args.domain, args.base, EvalSettings(max_train_tokens=args.max_train_tokens,
                                                                    max_eval_tokens=args.max_eval_tokens))
    gates = {"no gate": 0.0, **{f"gate {gate:g}": gate for gate in args.gate}}
    results = {}
    for name, gate in gates.items():
        ctx = dataclasses.replace(base_ctx, combiner=resolve_combiner(Adaptive(gate=gate)))
        results[name] = KnnLM().evaluate(ctx)
    test = base_ctx.corpus.streams["test"]
    offsets = [round(i * (len(test) - 64 - args.new_tokens) / max(args.prompts - 1, 1)) for i in range(args.prompts)]
    prompts = [torch.from_numpy(test[at:at + 64].astype("int64"))[None] for at in offsets]
    timing = Timing(min_seconds=args.seconds, max_seconds=8 * args.seconds)
    base_generator = model_generator(base_ctx.base.model, base_ctx.base.tokenizer)
    ungated = results["no gate"]
    with quiet():
        searched = {name: _searched_share(result.generator, prompts, args.new_tokens)
                    for name, result in results.items()}
        # Alternating rounds, prompt by prompt: each kNN-LM against the base, each gated one against the ungated one.
        versus_base = {name: _over_prompts(generation_latency, base_generator, result.generator, prompts,
                                           args.new_tokens, timing) for name, result in results.items()}
        versus_ungated = {name: _over_prompts(generation_latency, ungated.generator, result.generator, prompts,
                                              args.new_tokens, timing)
                          for name, result in results.items() if name != "no gate"}
    print(f"{args.base} on {args.domain} (train {args.max_train_tokens}, eval {args.max_eval_tokens} tokens), "
          f"knn-lm --combiner adaptive; generation: {args.prompts} prompts of 64 test tokens, {args.new_tokens} "
          f"new tokens each")
    print("| variant | test ppl | vs no gate | test searches skipped | valid ppl (out of fold) | valid skipped | "
          "generation steps skipped | generation ms/token | generation × base | generation × no gate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        gate = result.details.get("gate") or {}
        ratio, spread, ms = versus_base[name]
        own = versus_ungated.get(name)
        print(f"| {name} | {result.test_ppl:.3f} | {result.test_ppl / ungated.test_ppl - 1:+.2%} | "
              f"{gate.get('test_skipped_share', 0.0):.1%} | {gate.get('valid_ppl', float('nan')):.3f} | "
              f"{gate.get('valid_skipped_share', 0.0):.1%} | {1 - searched[name]:.1%} | {ms:.2f} | "
              f"{ratio:.2f} ± {spread:.2f} | {f'{own[0]:.2f} ± {own[1]:.2f}' if own else '1'} |")


def _over_prompts(generation_latency, reference, generator, prompts, new_tokens, timing):
    """``(median ratio, spread, median ms/token)`` over the prompts: each prompt's median ratio of
    ``generator`` to ``reference``; the spread is half the interquartile range of those over their median."""
    import statistics

    runs = [generation_latency(reference, generator, prompt, new_tokens, timing=timing) for prompt in prompts]
    ratios = [run[0] for run in runs]
    median = statistics.median(ratios)
    lower, _, upper = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (median,) * 3
    return median, (upper - lower) / 2 / median, statistics.median(run[3] for run in runs)


def _searched_share(generator, prompts, new_tokens) -> float:
    """The share of the generation steps over ``prompts`` at which the kNN search ran (counted at the
    kNN stepper, which is given the gate's mask; no mask: every step searched)."""
    from memdec_knn.memory import KnnStepper

    counts = [0, 0]  # searched, steps
    original = KnnStepper.logprobs

    def counting(self, input_ids, attention_mask, hidden, width, keep, needed=None):
        steps = hidden.shape[0] * hidden.shape[1]
        counts[0] += steps if needed is None else int(needed.sum())
        counts[1] += steps
        return original(self, input_ids, attention_mask, hidden, width, keep, needed=needed)

    KnnStepper.logprobs = counting
    try:
        for prompt in prompts:
            generator(prompt, new_tokens)
    finally:
        KnnStepper.logprobs = original
    return counts[0] / counts[1]

if __name__ == "__main__":
    main()
