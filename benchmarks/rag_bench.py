"""RAG scoring with passage runs merged vs one forward pass per retrieval, side by side.

    python benchmarks/rag_bench.py                                  # demo-m, finance, 4,096 test tokens
    python benchmarks/rag_bench.py --base memdec-demo-l --tokens 8192 --repeats 3

Both variants score the same tokens with the same retrievals (BM25, a 32-token query every 4
tokens); they differ only in whether consecutive retrievals of one passage share a forward pass.
Prints the forward passes, the wall time of each (alternating repeats, median) and the
perplexities, so the speed-up and what it costs are read from one run.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    from memdec_core.api import prepare_context
    from memdec_core.interfaces import EvalSettings
    from memdec_rag.index import PassageIndex
    from memdec_rag.method import Rag

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", default="finance")
    parser.add_argument("--base", default="memdec-demo-m")
    parser.add_argument("--tokens", type=int, default=4096, help="test tokens scored")
    parser.add_argument("--train-tokens", type=int, default=65536, help="train tokens cut into passages")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    ctx = prepare_context(args.domain, args.base, EvalSettings(max_train_tokens=args.train_tokens,
                                                               max_eval_tokens=args.tokens))
    stream = ctx.corpus.streams["test"]
    variants = {"merged": Rag(merge_runs=True), "per retrieval": Rag(merge_runs=False)}
    index = PassageIndex.for_corpus(ctx, variants["merged"].config.passage_tokens, ctx.create("retrievers", "bm25"))
    seconds = {name: [] for name in variants}
    totals = {}
    for _ in range(args.repeats):
        for name, rag in variants.items():
            started = time.perf_counter()
            totals[name] = rag.score(ctx, index, stream, f"rag {name}")
            seconds[name].append(time.perf_counter() - started)
    passes = {name: len(rag.runs(ctx, index, stream)) for name, rag in variants.items()}
    print(f"{args.base} on {args.domain}: {len(stream) - 1} test tokens, {len(index)} passages, "
          f"median of {args.repeats} alternating repeats")
    print("| variant | forward passes | seconds | perplexity |")
    print("|---|---|---|---|")
    for name in variants:
        print(f"| {name} | {passes[name]} | {statistics.median(seconds[name]):.1f} | {totals[name].perplexity:.3f} |")
    ratio = statistics.median(seconds["per retrieval"]) / statistics.median(seconds["merged"])
    print(f"\nmerged is {ratio:.2f}× faster; perplexity differs by "
          f"{abs(totals['merged'].perplexity / totals['per retrieval'].perplexity - 1) * 100:.2f} %")


if __name__ == "__main__":
    main()
