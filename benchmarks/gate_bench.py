"""Adaptive retrieval: kNN-LM with the adaptive weight, with and without the retrieval gate, side by side.

    python benchmarks/gate_bench.py                                   # memdec-demo-l, finance, gate 0.01
    python benchmarks/gate_bench.py --domain law --gate 0.01 0.005   # a row per allowance

Both rows are the same kNN-LM (the same datastore, the same fitted weight: the fit is seeded and
the gate is fitted after it) with ``--combiner adaptive``; the gated one skips the search wherever
a base-only predictor of the weight is below the threshold chosen on held-out validation
positions (``adaptive.gate``: the held-out perplexity increase allowed). Prints each one's test
perplexity, the share of test searches skipped, and the generation latency of each (greedy, 16
tokens after a 64-token test prompt, timed in alternating rounds with
``memdec_core.engine.latency``, the compare's latency column), so the saving and its cost are read from one run.
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
    args = parser.parse_args()

    base_ctx = prepare_context(args.domain, args.base, EvalSettings(max_train_tokens=args.max_train_tokens,
                                                                    max_eval_tokens=args.max_eval_tokens))
    gates = {"no gate": 0.0, **{f"gate {gate:g}": gate for gate in args.gate}}
    results = {}
    for name, gate in gates.items():
        ctx = dataclasses.replace(base_ctx, combiner=resolve_combiner(Adaptive(gate=gate)))
        results[name] = KnnLM().evaluate(ctx)
    prompt = torch.from_numpy(base_ctx.corpus.streams["test"][:64].astype("int64"))[None]
    timing = Timing(min_seconds=args.seconds, max_seconds=8 * args.seconds)
    base_generator = model_generator(base_ctx.base.model, base_ctx.base.tokenizer)
    ungated = results["no gate"]
    with quiet():
        # Alternating rounds: each kNN-LM against the base, and each gated one against the ungated one.
        versus_base = {name: generation_latency(base_generator, result.generator, prompt, args.new_tokens,
                                                timing=timing) for name, result in results.items()}
        versus_ungated = {name: generation_latency(ungated.generator, result.generator, prompt, args.new_tokens,
                                                   timing=timing)
                          for name, result in results.items() if name != "no gate"}
    print(f"{args.base} on {args.domain} (train {args.max_train_tokens}, eval {args.max_eval_tokens} tokens), "
          f"knn-lm --combiner adaptive")
    print("| variant | test ppl | vs no gate | test searches skipped | valid ppl (out of fold) | valid skipped | "
          "generation ms/token | generation × base | generation × no gate |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        gate = result.details.get("gate") or {}
        ratio, spread, _, ms = versus_base[name]
        own = versus_ungated.get(name)
        print(f"| {name} | {result.test_ppl:.3f} | {result.test_ppl / ungated.test_ppl - 1:+.2%} | "
              f"{gate.get('test_skipped_share', 0.0):.1%} | {gate.get('valid_ppl', float('nan')):.3f} | "
              f"{gate.get('valid_skipped_share', 0.0):.1%} | {ms:.2f} | {ratio:.2f} ± {spread:.2f} | "
              f"{f'{own[0]:.2f} ± {own[1]:.2f}' if own else '1'} |")


if __name__ == "__main__":
    main()
