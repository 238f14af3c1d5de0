"""Adaptive retrieval: kNN-LM with the adaptive weight, with and without the retrieval gate, side by side.

    python benchmarks/gate_bench.py                                   # memdec-demo-l, finance, gate 0.01
    python benchmarks/gate_bench.py --domain law --gate 0.005

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
    parser.add_argument("--gate", type=float, default=0.01, help="held-out perplexity increase allowed (adaptive.gate)")
    parser.add_argument("--max-train-tokens", type=int, default=32768)
    parser.add_argument("--max-eval-tokens", type=int, default=4096)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured generation time per side, at least")
    args = parser.parse_args()

    base_ctx = prepare_context(args.domain, args.base, EvalSettings(max_train_tokens=args.max_train_tokens,
                                                                    max_eval_tokens=args.max_eval_tokens))
    results = {}
    for name, gate in (("ungated", 0.0), ("gated", args.gate)):
        ctx = dataclasses.replace(base_ctx, combiner=resolve_combiner(Adaptive(gate=gate)))
        results[name] = KnnLM().evaluate(ctx)
    prompt = torch.from_numpy(base_ctx.corpus.streams["test"][:64].astype("int64"))[None]
    timing = Timing(min_seconds=args.seconds, max_seconds=8 * args.seconds)
    base_generator = model_generator(base_ctx.base.model, base_ctx.base.tokenizer)
    with quiet():
        # Alternating rounds: the two kNN-LMs against each other, then each against the base.
        ratio, spread, ungated_ms, gated_ms = generation_latency(
            results["ungated"].generator, results["gated"].generator, prompt, args.new_tokens, timing=timing)
        versus_base = {name: generation_latency(base_generator, result.generator, prompt, args.new_tokens,
                                                timing=timing) for name, result in results.items()}
    gate = results["gated"].details.get("gate") or {}
    ungated_ppl, gated_ppl = results["ungated"].test_ppl, results["gated"].test_ppl
    print(f"{args.base} on {args.domain} (train {args.max_train_tokens}, eval {args.max_eval_tokens} tokens), "
          f"knn-lm --combiner adaptive, gate {args.gate}")
    print("| variant | test ppl | test searches skipped | held-out ppl | generation ms/token | "
          "generation × base |")
    print("|---|---|---|---|---|---|")
    rows = (("no gate", ungated_ppl, 0.0, gate.get("heldout_ppl_ungated"), ungated_ms, versus_base["ungated"]),
            (f"gate {args.gate}", gated_ppl, gate.get("test_skipped_share", 0.0), gate.get("heldout_ppl"), gated_ms,
             versus_base["gated"]))
    for label, ppl, skipped, heldout, ms, (base_ratio, base_spread, _, _) in rows:
        print(f"| {label} | {ppl:.3f} | {skipped:.1%} | {heldout or float('nan'):.3f} | {ms:.2f} | "
              f"{base_ratio:.2f} ± {base_spread:.2f} |")
    print(f"\ngate: threshold weight {gate.get('threshold_weight', float('nan')):.4f}, held-out skipped "
          f"{gate.get('heldout_skipped_share', 0.0):.1%}; test ppl {gated_ppl / ungated_ppl - 1:+.2%}; "
          f"generation gated/ungated {ratio:.3f} ± {spread:.3f} (alternating rounds)")


if __name__ == "__main__":
    main()
