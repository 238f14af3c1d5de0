"""Memory Decoder costs, measured side by side in one run (this machine is noisy: read the ratios).

1. Target storage: memdec's sparse CSR shards (ids int32 + probabilities fp16) against the dense
   fp32 full-vocabulary rows the paper's public code builds, for real kNN targets.
2. KL step time: forward + backward of the objective on one batch with the sparse KL against
   densify-then-``kl_div`` (what the public code does), at the demo vocabulary (8,192) and at
   Qwen2's (151,936). Repetitions alternate between the two so drift hits both alike.
3. Inference time per scored token relative to the base alone: base + Memory Decoder and
   base + kNN-LM (k = 1024 neighbours searched per token), on the same windows.

    python benchmarks/decoder_bench.py --cache /tmp/runs/cache-bench --domain finance \\
        --base memdec-demo-l --tokens 8192 [--memory DIR]

It reuses (or builds) the domain's datastore, targets and memory from the artifact cache.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def directory_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*.npy"))


def storage_report(targets) -> dict:
    """Bytes as stored, and as the current writer stores them (entries that are 0 in fp16 dropped:
    targets built before that change still hold them)."""
    rows = len(targets)
    sparse = directory_bytes(targets.folder)
    supports, nonzero = [], 0
    for shard in sorted(targets.folder.glob("shard-*")):
        offsets, probs = np.load(shard / "offsets.npy"), np.load(shard / "probs.npy", mmap_mode="r")
        positive = np.concatenate([[0], np.cumsum(probs > 0)])
        supports.append(positive[offsets[1:]] - positive[offsets[:-1]])
        nonzero += int(positive[-1])
    supports = np.concatenate(supports)
    return {"rows": rows, "sparse_bytes": sparse, "nonzero_bytes": nonzero * 6 + (rows + 1) * 8,
            "mean_support": float(supports.mean()), "median_support": float(np.median(supports)),
            "max_support": int(supports.max()), "supports": supports}


def kl_step_times(supports: np.ndarray, vocab: int, rows: int, repeats: int) -> tuple[float, float]:
    """Seconds per step (median) of the sparse and the dense objective on the same batch."""
    from memdec_decoder.loss import memory_decoder_loss

    generator = torch.Generator().manual_seed(0)
    sample = supports[torch.randint(len(supports), (rows,), generator=generator).numpy()]
    width = int(sample.max())
    ids = torch.full((rows, width), -1, dtype=torch.long)
    probs = torch.zeros(rows, width)
    for row, support in enumerate(sample):
        ids[row, :support] = torch.randperm(vocab, generator=generator)[:support]
        weights = torch.rand(support, generator=generator)
        probs[row, :support] = weights / weights.sum()
    gold = ids[:, 0].clone()
    logits = torch.randn(rows, vocab, generator=generator, requires_grad=True)

    def sparse_step():
        memory_decoder_loss(logits, gold, ids, probs, 0.5).backward()

    def dense_step():  # the public code: a full fp32 row per token, then kl_div
        dense = torch.zeros(rows, vocab).scatter_add_(1, ids.clamp(min=0), probs * (ids >= 0))
        logprobs = torch.log_softmax(logits, dim=-1)
        kl = F.kl_div(logprobs, dense, reduction="none").sum(-1)
        ce = F.nll_loss(logprobs, gold, reduction="none")
        (0.5 * kl + 0.5 * ce).mean().backward()

    times = {"sparse": [], "dense": []}
    for _ in range(repeats):
        for name, step in (("sparse", sparse_step), ("dense", dense_step)):
            logits.grad = None
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    return float(np.median(times["sparse"])), float(np.median(times["dense"]))


def latency_report(domain: str, base: str, tokens: int, repeats: int, memory_folder: str | None) -> dict:
    """Seconds per scored token: base alone, base + memory, base + kNN-LM, on the same windows."""
    from memdec_core.api import prepare_context
    from memdec_core.engine.scoring import iter_scored_batches
    from memdec_core.interfaces import EvalSettings

    ctx = prepare_context(domain, base, EvalSettings(max_eval_tokens=tokens))
    memory = ctx.create("memory-models", "memory-decoder", **({"path": memory_folder} if memory_folder else {}))
    knn = ctx.create("memory-models", "knn-datastore", k=1024, temperatures=(10.0,))
    memory.prepare(ctx)
    knn.prepare(ctx)
    stream, windows = ctx.corpus.streams["valid"], ctx.windows("valid")

    def run(kind: str) -> float:
        started, scored = time.perf_counter(), 0
        for batch in iter_scored_batches(ctx.base.model, stream, windows, batch_size=4,
                                         capture_hidden=kind == "knn-lm", description=kind):
            if kind == "memdec":
                memory.gold_logprobs(memory.score(batch), batch, {})
            elif kind == "knn-lm":
                knn.gold_logprobs(knn.score(batch), batch, {"temperature": 10.0})
            batch.gold_logprobs()
            scored += len(batch.targets)
        return (time.perf_counter() - started) / scored

    times = {kind: [] for kind in ("base", "memdec", "knn-lm")}
    run("base")  # warm-up
    for _ in range(repeats):
        for kind in times:
            times[kind].append(run(kind))
    medians = {kind: float(np.median(values)) for kind, values in times.items()}
    return {"seconds_per_token": medians, "memory_parameters": memory.costs().params_added,
            "base_parameters": sum(p.numel() for p in ctx.base.model.parameters()),
            "scored_tokens": sum(window.n_scored for window in windows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=None, help="artifact cache holding (or receiving) the artifacts")
    parser.add_argument("--domain", default="finance")
    parser.add_argument("--base", default="memdec-demo-l")
    parser.add_argument("--tokens", type=int, default=8192, help="valid tokens scored per latency run")
    parser.add_argument("--rows", type=int, default=2048, help="scored tokens per KL step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory", default=None, help="a trained memory folder (default: the cached one)")
    parser.add_argument("--no-latency", action="store_true", help="only the storage and KL measurements")
    args = parser.parse_args()
    if args.cache:
        os.environ["MEMDEC_CACHE"] = args.cache
    os.environ.setdefault("MEMDEC_NO_PROGRESS", "1")

    from memdec_core.api import prepare_context
    from memdec_core.interfaces import EvalSettings
    from memdec_decoder.pipeline import targets_for
    from memdec_decoder.settings import DecoderSettings

    teacher_ctx = prepare_context(args.domain, "memdec-demo-l", EvalSettings())
    storage = storage_report(targets_for(teacher_ctx, DecoderSettings()))
    print(f"## Target storage ({args.domain}, teacher memdec-demo-l, k = 1024)\n")
    print("| vocabulary | rows | sparse, as stored | sparse, fp16 zeros dropped (memdec now) | "
          "dense fp32 rows (public code) | dense / memdec |\n|---|---|---|---|---|---|")
    for vocab in (8192, 151_936):
        dense = storage["rows"] * vocab * 4
        print(f"| {vocab:,} | {storage['rows']:,} | {storage['sparse_bytes'] / 1e6:,.1f} MB | "
              f"{storage['nonzero_bytes'] / 1e6:,.1f} MB | {dense / 1e9:,.1f} GB | "
              f"{dense / storage['nonzero_bytes']:,.0f}× |")
    print(f"\nNon-zero entries per row: mean {storage['mean_support']:.1f}, median {storage['median_support']:.0f}, "
          f"max {storage['max_support']} tokens.\n")
    print(f"## KL step (forward + backward of the objective, {args.rows} tokens, median of {args.repeats})\n")
    print("| vocabulary | sparse KL | densify + kl_div | dense / sparse |\n|---|---|---|---|")
    for vocab in (8192, 151_936):
        sparse, dense = kl_step_times(storage["supports"], vocab, args.rows, args.repeats)
        print(f"| {vocab:,} | {sparse * 1e3:.1f} ms | {dense * 1e3:.1f} ms | {dense / sparse:.2f}× |")
    if args.no_latency:
        return
    latency = latency_report(args.domain, args.base, args.tokens, args.repeats, args.memory)
    per_token = latency["seconds_per_token"]
    print(f"\n## Inference per scored token ({args.base}, {latency['base_parameters']:,} parameters; memory "
          f"{latency['memory_parameters']:,}; {latency['scored_tokens']:,} valid tokens, median of {args.repeats})\n")
    print("| method | ms / token | relative to the base |\n|---|---|---|")
    for kind in ("base", "memdec", "knn-lm"):
        print(f"| {kind} | {per_token[kind] * 1e3:.3f} | {per_token[kind] / per_token['base']:.2f}× |")


if __name__ == "__main__":
    main()
