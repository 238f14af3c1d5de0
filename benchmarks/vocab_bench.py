"""Vocabulary-restricted vs full-vocabulary Memory Decoder training on the Qwen2 tokenizer.

The memory is the PAPER.md recipe: Qwen2.5-Coder-0.5B's first blocks (151,936-token vocabulary).
The restricted variant keeps only the tokens that occur as datastore values of a domain's train
split. Each variant runs in its own subprocess (so peak memory is its own), alternating
full / restricted, and reports the median optimizer-step time and the peak resident memory.

    python benchmarks/fetch_models.py qwen2.5-coder-0.5b
    python benchmarks/vocab_bench.py --domain biomed --train-tokens 40000 --layers 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

QWEN = Path.home() / ".cache" / "memdec-models" / "qwen2.5-coder-0.5b" / "model.gguf"


def build_variant(args, folder: Path) -> None:
    """Subprocess 1: cut the 0.5B to a memory (full or restricted vocabulary) and save it with the tokens."""
    import numpy as np

    from memdec_core.api import prepare_context
    from memdec_core.interfaces import EvalSettings
    from memdec_decoder.settings import TrainSettings
    from memdec_decoder.train import build_memory_model, choose_vocabulary

    ctx = prepare_context(args.domain, args.model, EvalSettings(max_train_tokens=args.train_tokens))
    stream = ctx.corpus.streams["train"]
    vocabulary = choose_vocabulary(args.variant, stream, ctx.base.vocab_size)
    model = build_memory_model(ctx.base, TrainSettings(init_layers=args.layers, vocabulary=args.variant), vocabulary)
    model.save_pretrained(folder)
    np.save(folder / "stream.npy", stream)
    if vocabulary:
        vocabulary.save(folder)


def train_variant(args, folder: Path) -> dict:
    """Subprocess 2: only the memory in memory; time optimizer steps, record the peak RSS."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from memdec_decoder.loss import memory_decoder_loss
    from memdec_decoder.vocab import VOCABULARY_FILE, Vocabulary

    torch.manual_seed(0)
    stream = np.load(folder / "stream.npy")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    full_size = 151_936
    vocabulary = Vocabulary.load(folder, full_size) if (folder / VOCABULARY_FILE).exists() else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.from_numpy(stream[: args.batch * args.context + 1].astype(np.int64))
    inputs, gold = tokens[:-1].view(args.batch, args.context), tokens[1:]
    # Sparse targets shaped like real kNN targets: the gold token plus another token of the domain.
    others = torch.from_numpy(np.unique(stream[1:]).astype(np.int64))
    target_ids = torch.stack([gold, others[torch.randint(len(others), (len(gold),))]], dim=1)
    target_probs = torch.tensor([[0.7, 0.3]]).expand(len(gold), 2).contiguous()
    if vocabulary:
        inputs, gold, target_ids = vocabulary.inputs(inputs), vocabulary.inputs(gold), vocabulary.inputs(target_ids)
    times = []
    for _ in range(args.steps + 1):
        started = time.perf_counter()
        logits = model(input_ids=inputs, use_cache=False).logits
        if vocabulary:
            vocabulary.mask_other(logits)
        loss = memory_decoder_loss(logits.view(-1, logits.shape[-1]), gold, target_ids, target_probs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return {"variant": args.variant, "step_seconds": float(np.median(times[1:])),
            "parameters": sum(p.numel() for p in model.parameters()),
            "output_rows": model.get_output_embeddings().weight.shape[0],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(QWEN))
    parser.add_argument("--domain", default="biomed")
    parser.add_argument("--train-tokens", type=int, default=40_000)
    parser.add_argument("--layers", type=int, default=2, help="blocks of the 0.5B kept in the memory")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternating full / restricted runs")
    parser.add_argument("--work", default="/tmp/memdec-vocab-bench", help="where the two memories are saved")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        folder = Path(args.work) / args.variant
        if args.phase == "build":
            build_variant(args, folder)
        else:
            print(json.dumps(train_variant(args, folder)))
        return
    results = {"full": [], "restricted": []}

    def child(variant: str, phase: str) -> str:
        return subprocess.run([sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--phase", phase],
                              capture_output=True, text=True, check=True,
                              env={**os.environ, "MEMDEC_NO_PROGRESS": "1"}).stdout

    for variant in results:
        if not (Path(args.work) / variant / "stream.npy").exists():
            child(variant, "build")
    for _ in range(args.rounds):
        for variant in results:
            results[variant].append(json.loads(child(variant, "train").strip().splitlines()[-1]))
    full, restricted = (min(runs, key=lambda run: run["step_seconds"]) for runs in results.values())
    dropped = full["output_rows"] - restricted["output_rows"] + 1
    print(f"Memory: first {args.layers} blocks of {Path(args.model).parent.name}; {args.batch} × {args.context} "
          f"tokens per step; {args.domain} train split, first {args.train_tokens:,} tokens ({dropped:,} tokens "
          f"dropped); best of {args.rounds} alternating runs, median of {args.steps} steps each.\n")
    print("| vocabulary | output rows | parameters | step time | peak RSS |\n|---|---|---|---|---|")
    for run in (full, restricted):
        print(f"| {run['variant']} | {run['output_rows']:,} | {run['parameters'] / 1e6:.1f}M | "
              f"{run['step_seconds']:.2f} s | {run['peak_rss_gb']:.2f} GB |")
    print("\n(peak RSS of a process holding only the memory, its optimizer and one training step)")
    print(f"\nRestricted vs full: {full['step_seconds'] / restricted['step_seconds']:.2f}× faster per step, "
          f"{full['peak_rss_gb'] / restricted['peak_rss_gb']:.2f}× less peak memory.")


if __name__ == "__main__":
    main()
