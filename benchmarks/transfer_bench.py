"""Does moving a memory to another tokenizer pay? (issue 15; the paper's Table 4, offline)

A memory of family A (default: the demo family's, `memdec train --domain D`) is moved to family
B (default: SmolLM2-135M, another tokenizer) with `memdec transfer`, three ways of starting its
new rows, at a fraction of its original training. It is measured on B's base against:

- the same architecture with every weight fresh (`--fresh-blocks`), at the same budget and at the
  original's full budget: what transfer saves;
- B's own kNN-LM, and B's LoRA at the transfer's training tokens (LoRA at the transfer's FLOPs
  is reported as well when it amounts to at least one optimizer step).

Everything is one run, on one domain, λ tuned on validation for every mixture; perplexity and
bits per byte on the test split. Prints a markdown table; ``--output`` writes the JSON.

    python benchmarks/fetch_models.py smollm2-135m
    OMP_NUM_THREADS=2 python benchmarks/transfer_bench.py --domain finance \\
        --output benchmarks/results/transfer-finance-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from memdec_core.inputs.models import load_model
from memdec_core.interfaces import EvalSettings
from memdec_decoder import api as decoder
from memdec_decoder.memory import open_memory
from memdec_decoder.transfer import transfer_settings

SMOLLM2 = Path.home() / ".cache" / "memdec-models" / "smollm2-135m" / "model.gguf"


def main() -> int:
    args = parse_args()
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    windows = EvalSettings(max_train_tokens=args.max_train_tokens, max_eval_tokens=args.max_eval_tokens)
    memory = args.memory or original_memory(args.domain, work / "original", windows)
    original = open_memory(memory)
    context = original.manifest["context"]
    windows = EvalSettings(context=context, max_train_tokens=args.max_train_tokens,
                           max_eval_tokens=args.max_eval_tokens)
    variants = [(f"transfer, rows by strings, {args.fraction:.0%}", dict(embeddings="strings")),
                (f"transfer, rows from B's model, {args.fraction:.0%}", dict(embeddings="model")),
                (f"transfer, fresh rows, {args.fraction:.0%}", dict(embeddings="fresh")),
                (f"scratch (same architecture), {args.fraction:.0%}", dict(fresh_blocks=True)),
                ("scratch (same architecture), 100%", dict(fresh_blocks=True, fraction=1.0))]
    rows = [measure_base(args, windows)]
    for label, options in variants:
        options = {"fraction": args.fraction, **options}
        folder = work / label.replace(" ", "-").replace(",", "").replace("'", "").replace("%", "pct")
        started = time.perf_counter()
        decoder.transfer(memory, args.teacher, args.domain, folder, settings=windows, k=args.k, **options)
        rows.append(measure_memory(args, windows, label, folder, time.perf_counter() - started))
    rows.extend(measure_lora(args, windows, original, rows))
    report = {"domain": args.domain, "memory": str(memory), "teacher": args.teacher, "fraction": args.fraction,
              "original": {key: original.manifest.get(key) for key in (
                  "teacher", "init", "train_tokens", "train_seconds", "flops_per_token", "best_valid_ppl",
                  "parameters", "tokenizer_fingerprint")},
              "windows": {"context": context, "max_train_tokens": args.max_train_tokens,
                          "max_eval_tokens": args.max_eval_tokens}, "rows": rows, "command": sys.argv}
    print(table(report))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default="finance")
    parser.add_argument("--memory", default="", help="family A's trained memory [default: train the demo family's]")
    parser.add_argument("--teacher", default=str(SMOLLM2), help="family B's model (teacher and base)")
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--max-train-tokens", type=int, default=None)
    parser.add_argument("--max-eval-tokens", type=int, default=None)
    parser.add_argument("--work", default="~/.cache/memdec-transfer-bench", help="where the memories are kept")
    parser.add_argument("--output", default="")
    return parser.parse_args()


def original_memory(domain: str, folder: Path, windows: EvalSettings) -> str:
    """Family A's memory: `memdec train --domain DOMAIN` with the demo family's defaults."""
    return decoder.train(domain, output=folder, settings=windows)


def evaluate(args, windows, methods, method_settings=None) -> dict:
    from memdec_core.api import evaluate as run

    report = run(args.domain, bases=[args.teacher], methods=methods, settings=windows,
                 method_settings=method_settings or {})
    return {row["method"]: row for row in report["results"]}


def scores(row: dict) -> dict:
    return {"test_ppl": row["test_ppl"], "test_bpb": row.get("test_bpb"), "knobs": row.get("knobs", {})}


def measure_base(args, windows) -> dict:
    results = evaluate(args, windows, ["base", "knn-lm"], {"knn-lm": {"k": args.k}})
    return {"label": "B base", **scores(results["base"]),
            "knn_lm": scores(results["knn-lm"])}


def measure_memory(args, windows, label: str, folder: Path, seconds: float) -> dict:
    memory = open_memory(folder)
    manifest = memory.manifest
    row = evaluate(args, windows, ["memdec"], {"memdec": {"path": str(folder)}})["memdec"]
    return {"label": label, **scores(row), "folder": str(folder), "train_tokens": manifest["train_tokens"],
            "train_flops": manifest["train_tokens"] * manifest["flops_per_token"],
            "train_seconds": manifest["train_seconds"], "wall_seconds": round(seconds, 1),
            "memory_valid_ppl": manifest["best_valid_ppl"], "parameters": memory.parameters,
            "matched_tokens": manifest["transfer"]["matched_tokens"], "embeddings": manifest["transfer"]["embeddings"]}


def measure_lora(args, windows, original, rows) -> list[dict]:
    """B's LoRA at the transfer's tokens, and at its FLOPs where that is at least one step."""
    transfer = rows[1]
    tokens = transfer_settings(original, args.fraction).budget_tokens
    budgets = [(f"B LoRA, the transfer's budget ({tokens:,} tokens)", {"budget_tokens": tokens})]
    flops_tokens = transfer["train_flops"] / (4 * load_parameters(args.teacher))
    tokens_per_step = 8 * original.manifest["context"]  # LoRA's default batch of 8 windows
    if flops_tokens >= tokens_per_step:
        budgets.append((f"B LoRA, the transfer's FLOPs ({transfer['train_flops']:.3g})",
                        {"budget_flops": transfer["train_flops"]}))
    measured = []
    for label, budget in budgets:
        started = time.perf_counter()
        row = evaluate(args, windows, ["lora"], {"lora": budget})["lora"]
        measured.append({"label": label, **scores(row), "wall_seconds": round(time.perf_counter() - started, 1),
                         "budget": budget, "costs": row.get("costs")})
    if flops_tokens < tokens_per_step:
        measured.append({"label": "B LoRA, the transfer's FLOPs", "test_ppl": None, "test_bpb": None,
                         "note": f"{flops_tokens:,.0f} tokens at LoRA's ~4N FLOPs per token: less than one "
                                 f"optimizer step ({tokens_per_step:,} tokens)"})
    return measured


def load_parameters(name: str) -> int:
    return sum(parameter.numel() for parameter in load_model(name).model.parameters())


def table(report: dict) -> str:
    def number(value, digits):
        return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"

    base = report["rows"][0]
    lines = ["| B + … | test ppl ↓ | test bits/byte ↓ | λ | train tokens | train s | memory-alone valid ppl |",
             "|---|---|---|---|---|---|---|",
             f"| (base) | {number(base['test_ppl'], 2)} | {number(base['test_bpb'], 4)} | – | – | – | – |",
             f"| kNN-LM | {number(base['knn_lm']['test_ppl'], 2)} | {number(base['knn_lm']['test_bpb'], 4)} | "
             f"{base['knn_lm']['knobs'].get('lam', '–')} | – | – | – |"]
    for row in report["rows"][1:]:
        if row.get("test_ppl") is None:
            lines.append(f"| {row['label']} | – | – | – | – | – | {row['note']} |")
            continue
        lines.append(f"| {row['label']} | {number(row['test_ppl'], 2)} | {number(row['test_bpb'], 4)} | "
                     f"{row['knobs'].get('lam', '–')} | {row.get('train_tokens', row.get('budget'))} | "
                     f"{row.get('train_seconds', row.get('wall_seconds'))} | "
                     f"{number(row.get('memory_valid_ppl'), 2)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
