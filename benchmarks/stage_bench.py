"""The hot stages against a plain forward over the same windows (issue 32), side by side in one run.

Each round times, back to back on the same base and windows:

- ``forward(train)``: a plain ``torch.inference_mode()`` forward of the base over the train
  windows, in batches of the run's batch size (what a user would write, output layer included);
- ``datastore``: memdec's datastore build over the same windows (keys and values to disk, fsync
  and progress records included), into a fresh folder;
- ``forward(test)``: the plain forward over the test windows;
- ``knn-lm test``: the test split scored by kNN-LM with its knobs fixed (exact search, k = 1024,
  the datastore above indexed ``Flat``), as ``memdec eval`` scores it once λ and T are chosen.

Rounds alternate the sides (this machine is shared); the ratios are per round, printed with
their median and spread (half the interquartile range over the median).

    python benchmarks/stage_bench.py --domain finance --base memdec-demo-l --rounds 5
    python benchmarks/stage_bench.py --profile knn   # cProfile of one kNN-LM test pass, top 25
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="finance")
    parser.add_argument("--base", default="memdec-demo-l")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-train-tokens", type=int, default=32_768)
    parser.add_argument("--max-eval-tokens", type=int, default=4_096)
    parser.add_argument("--batch-size", type=int, default=4)  # EvalSettings' default
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--profile", choices=("knn", "datastore"), default=None)
    args = parser.parse_args()

    bench = Bench(args)
    try:
        if args.profile:
            bench.profile(args.profile)
            return 0
        bench.run(args.rounds)
    finally:
        shutil.rmtree(bench.work, ignore_errors=True)
    return 0


class Bench:
    def __init__(self, args):
        from memdec_core.inputs.context import prepare_context
        from memdec_core.interfaces import EvalSettings

        settings = EvalSettings(batch_size=args.batch_size, max_train_tokens=args.max_train_tokens,
                                max_eval_tokens=args.max_eval_tokens)
        self.ctx = prepare_context(args.domain, args.base, settings)
        self.k, self.work, self.builds = args.k, Path(tempfile.mkdtemp(prefix="stage-bench-")), 0
        self.store = self.datastore()  # built once before timing: the index and the warm caches
        print(f"# {args.base} on {args.domain}: {len(self.ctx.windows('train'))} train windows, "
              f"{len(self.ctx.windows('test'))} test windows of {self.ctx.context} (stride {self.ctx.stride}), "
              f"batch {args.batch_size}, {len(self.store):,} keys, k = {self.k}, torch threads "
              f"{torch.get_num_threads()}", file=sys.stderr)
        self.knn = self.knn_memory()

    def forward(self, split: str) -> None:
        """The plain forward: padded batches of the split's windows through the model, nothing kept."""
        model, stream, windows = self.ctx.base.model, self.ctx.corpus.streams[split], self.ctx.windows(split)
        size = self.ctx.settings.batch_size
        with torch.inference_mode():
            for first in range(0, len(windows), size):
                batch = windows[first:first + size]
                length = max(window.end - window.start for window in batch)
                ids = torch.zeros(len(batch), length, dtype=torch.long)
                mask = torch.zeros(len(batch), length, dtype=torch.long)
                for row, window in enumerate(batch):
                    ids[row, :window.end - window.start] = torch.from_numpy(
                        stream[window.start:window.end].astype(np.int64))
                    mask[row, :window.end - window.start] = 1
                model(input_ids=ids, attention_mask=mask, use_cache=False)

    def datastore(self):
        from memdec_knn.datastore import build_datastore

        self.builds += 1
        folder = self.work / f"store-{self.builds}"
        ctx = self.ctx
        store = build_datastore(ctx.base, ctx.corpus.streams["train"], folder, context=ctx.context, stride=ctx.stride,
                                batch_size=ctx.settings.batch_size, data_hash="bench")
        if self.builds > 1:
            shutil.rmtree(folder)
        return store

    def knn_memory(self):
        from memdec_core.components import registry

        memory = registry.get("memory-models", "knn-datastore")(k=self.k, temperatures=(10.0,))
        retriever = registry.get("retrievers", "faiss")(factory="Flat")
        memory.store = self.store.with_index(retriever)
        memory.tokenizer_fingerprint = self.store.manifest["tokenizer_fingerprint"]
        return memory

    def knn_test(self) -> float:
        from memdec_core.engine.scoring import score_stream

        ctx = self.ctx
        setting = (self.knn.grid()[0], ctx.combiner.Config(lam=0.25))
        total = score_stream(ctx, self.knn, ctx.corpus.streams["test"], ctx.windows("test"), [setting], "test",
                             "knn-lm test")[0]
        return total.perplexity

    def run(self, rounds: int) -> None:
        from memdec_core.runtime.progress import quiet

        sides = {"forward(train)": lambda: self.forward("train"), "datastore": self.datastore,
                 "forward(test)": lambda: self.forward("test"), "knn-lm test": self.knn_test}
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        with quiet():
            for number in range(rounds):
                order = list(sides) if number % 2 == 0 else list(reversed(sides))
                for name in order:
                    started = time.perf_counter()
                    sides[name]()
                    seconds[name].append(time.perf_counter() - started)
        ratios = {"datastore / forward(train)": _ratios(seconds["datastore"], seconds["forward(train)"]),
                  "knn-lm test / forward(test)": _ratios(seconds["knn-lm test"], seconds["forward(test)"])}
        print(f"{'stage':<30}{'median s':>10}{'spread':>9}   per round")
        for name, values in seconds.items():
            print(f"{name:<30}{statistics.median(values):>10.3f}{_spread(values):>9.3f}   "
                  + " ".join(f"{value:.3f}" for value in values))
        for name, values in ratios.items():
            print(f"{name:<30}{statistics.median(values):>10.3f}{_spread(values):>9.3f}   "
                  + " ".join(f"{value:.3f}" for value in values))

    def profile(self, what: str) -> None:
        from memdec_core.runtime.progress import quiet

        work = self.knn_test if what == "knn" else self.datastore
        profiler = cProfile.Profile()
        with quiet():
            profiler.runcall(work)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def _ratios(side: list[float], reference: list[float]) -> list[float]:
    return [a / b for a, b in zip(side, reference)]


def _spread(values: list[float]) -> float:
    """Half the interquartile range over the median (0.05: the middle half within ±5 %)."""
    if len(values) < 2:
        return 0.0
    quartiles = np.percentile(values, [25, 75])
    return float((quartiles[1] - quartiles[0]) / 2 / statistics.median(values))


if __name__ == "__main__":
    sys.exit(main())
