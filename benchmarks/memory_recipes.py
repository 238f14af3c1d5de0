"""Which Memory Decoder recipe works on a real model family? (issue 16)

On a small and a large model of one tokenizer (default: the Qwen2.5-Coder 0.5B / 1.5B GGUF pair)
and one or more packs, every recipe variant is a memory trained through memdec's own pipeline
(teacher datastore → kNN targets → training, cached by content), then measured against:

- the small model alone and with its own kNN-LM (``memdec eval --method base,knn-lm``: the
  product's numbers, λ and T tuned on validation);
- the large model alone;
- each base mixed with the memory: λ tuned on validation over the linear combiner's grid, the
  test split scored once. The linear mixture needs only the gold token's probability under each
  side, so every base runs once per split and its gold log-probs are stored; a variant then costs
  its training and a pass of the memory alone. The first variant of each pack is also scored by
  ``memdec eval --set memdec.path=...`` to show that this shortcut gives the product's number;
- the memory alone (over the tokens it can name, and their share), its fidelity to the kNN
  targets on validation (memdec's own measure), its training time, and its inference cost per
  token relative to the small base, beside kNN-LM's, timed alternately in this run.

Rows are kept in ``--output`` as they are measured, and a rerun skips them (memories and
datastores come back from the cache), so a killed study resumes.

    python benchmarks/fetch_models.py qwen2.5-coder-0.5b qwen2.5-coder-1.5b
    OMP_NUM_THREADS=2 python benchmarks/memory_recipes.py --domain biomed --domain law \\
        --output benchmarks/results/memory-recipes.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from memdec_core.api import evaluate, prepare_context
from memdec_core.components import registry
from memdec_core.components.plan import Plan
from memdec_core.engine.latency import Timing, ratio_statistics, time_pairs
from memdec_core.engine.scoring import iter_scored_batches
from memdec_core.inputs.data import load_corpus
from memdec_core.inputs.models import capture_last_ffn_input
from memdec_core.interfaces import EvalSettings
from memdec_core.store.artifacts import folder_bytes
from memdec_decoder.fidelity import target_fidelity
from memdec_decoder.memory import open_memory
from memdec_decoder.pipeline import memory_for
from memdec_decoder.settings import DecoderSettings

MODELS = Path.home() / ".cache" / "memdec-models"
SMALL = MODELS / "qwen2.5-coder-0.5b" / "model.gguf"
LARGE = MODELS / "qwen2.5-coder-1.5b" / "model.gguf"

#: The recipe of benchmarks/RESULTS.md ("One vocabulary-restricted memory for two real models"):
#: the small model teaches and initialises, its first 2 blocks, restricted vocabulary, 4 epochs
#: of 2 windows per step at lr 5e-4, T tuned on the teacher's kNN-LM. Each variant changes one thing.
#: (vocabulary "auto" restricts above 32k tokens: Qwen's 151,936 are restricted.)
CURRENT = dict(init_layers=2, vocabulary="auto", tune_temperature=True, epochs=4, batch_size=2, lr=5e-4)

VARIANTS = {
    "current": {},
    "default": None,  # no settings at all: what memdec eval --method memdec does (memdec_decoder.recipe)
    "4 blocks": dict(init_layers=4),
    "8 blocks": dict(init_layers=8),
    "2x steps": dict(epochs=8),
    "lr 1e-3": dict(lr=1e-3),
    "lr 2e-4": dict(lr=2e-4),
    "beta 0.75": dict(beta=0.75),
    "beta 0.25": dict(beta=0.25),
    "k 64": dict(k=64),
    "T 16 (the paper's)": dict(tune_temperature=False, temperature=16.0),
    "norm from block 3": dict(cut_norm="next"),
    "4 blocks, 2x steps": dict(init_layers=4, epochs=8),
    "teacher 1.5B": dict(teacher="LARGE"),
    "whole 0.5B": dict(init_layers=0),
    "whole 0.5B, lr 1e-4": dict(init_layers=0, lr=1e-4),  # the paper's memory and its lr for Qwen
    "full vocabulary": dict(vocabulary="full"),
    "distill 0.5": dict(distill=0.5),
    "distill 0.25": dict(distill=0.25),
    "cosine schedule": dict(schedule="cosine"),
    "constant lr": dict(schedule="constant"),
}


def main() -> int:
    args = parse_args()
    output = Path(args.output)
    report = json.loads(output.read_text()) if output.exists() else {"rows": [], "packs": {}}
    report["command"] = sys.argv
    work = Path(args.work).expanduser()
    windows = EvalSettings(context=args.context, stride=args.stride, max_train_tokens=args.max_train_tokens,
                           max_eval_tokens=args.max_eval_tokens)
    for domain in args.domain:
        pack = report["packs"].get(domain) or measure_pack(domain, args, windows, work)
        report["packs"][domain] = pack
        save(report, output)
        for name in args.variant:
            if any(row["domain"] == domain and row["variant"] == name for row in report["rows"]):
                continue
            report["rows"].append(measure_variant(domain, name, args, windows, work, pack))
            save(report, output)
        for row in report["rows"]:
            wanted = [f"{tau:g}" for tau in args.mixing_temperatures or ()]
            done = list(row.get("mixing_temperature", {}).get("small", {}).get("by_temperature", {}))
            if wanted and wanted != done and row["domain"] == domain and row["variant"] in args.variant:
                row["mixing_temperature"] = mixing_temperatures(domain, row, args, windows, work)
                save(report, output)
    print(table(report))
    if args.mixing_temperatures:
        print(temperature_table(report))
    return 0


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", action="append", default=None)
    parser.add_argument("--small", default=str(SMALL), help="the family's small model (base, default teacher, init)")
    parser.add_argument("--large", default=str(LARGE), help="the family's large model (a second base)")
    parser.add_argument("--variant", action="append", default=None, choices=sorted(VARIANTS),
                        help="recipe variants to measure, in order [default: current, then all]")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--max-train-tokens", type=int, default=40_000)
    parser.add_argument("--max-eval-tokens", type=int, default=4_096)
    parser.add_argument("--work", default="~/.cache/memdec-recipes", help="stored gold log-probs of the bases")
    parser.add_argument("--output", default="memory-recipes.json")
    parser.add_argument("--mixing-temperatures", type=lambda text: [float(t) for t in text.split(",")],
                        default=None, help="also mix the variants' memories at these temperatures τ "
                                           "(p_mem ∝ exp(logits/τ)), e.g. 0.7,0.85,1,1.25,1.5")
    args = parser.parse_args()
    args.domain = args.domain or ["biomed"]
    args.variant = args.variant or list(VARIANTS)
    return args


def save(report: dict, output: Path) -> None:
    temporary = output.with_suffix(".partial")
    temporary.write_text(json.dumps(report, indent=2) + "\n")
    temporary.replace(output)


# --- what every variant of a pack is measured against


def measure_pack(domain: str, args, windows: EvalSettings, work: Path) -> dict:
    """The small model alone and with its kNN-LM (memdec eval), the large model alone."""
    started = time.perf_counter()
    report = evaluate(domain, bases=[args.small], methods=["base", "knn-lm"], settings=windows)
    rows = {row["method"]: row for row in report["results"]}
    large = {}
    for size, model in (("small", args.small), ("large", args.large)):
        ctx = context_for(domain, model, windows)
        large[size] = {split: base_perplexity(ctx, split, work) for split in ("valid", "test")}
    shortcut = large["small"]["test"]
    if not math.isclose(shortcut, rows["base"]["test_ppl"], rel_tol=1e-6):
        raise SystemExit(f"stored gold log-probs give {shortcut} for the small base, memdec eval "
                         f"{rows['base']['test_ppl']}: the shortcut is not the product's measure")
    return {"small_base": rows["base"]["test_ppl"], "knn_lm": rows["knn-lm"]["test_ppl"],
            "knn_knobs": rows["knn-lm"]["knobs"], "knn_bytes": rows["knn-lm"]["costs"]["bytes_added"],
            "large_base": large["large"]["test"], "large_base_valid": large["large"]["valid"],
            "small_base_valid": large["small"]["valid"], "seconds": round(time.perf_counter() - started, 1),
            "test_tokens": rows["base"]["test_tokens"]}


_CONTEXTS: dict[tuple, object] = {}


def context_for(domain: str, model: str, windows: EvalSettings):
    """memdec's evaluation context for one base (model loaded once per process)."""
    key = (domain, model)
    if key not in _CONTEXTS:
        _CONTEXTS[key] = prepare_context(load_corpus(domain), model, windows, plan=Plan())
    return _CONTEXTS[key]


def base_gold(ctx, split: str, work: Path) -> np.ndarray:
    """log p(gold) of the base at every scored position of ``split``, in memdec's window order (stored)."""
    corpus = ctx.corpus
    path = work / f"{ctx.base.fingerprint[:16]}-{corpus.data_hash(split)[:16]}-{ctx.context}-{ctx.stride}-{split}.npy"
    if path.exists():
        return np.load(path)
    values = [batch.gold_logprobs().double().numpy() for batch in iter_scored_batches(
        ctx.base.model, corpus.streams[split], ctx.windows(split), batch_size=ctx.settings.batch_size,
        description=f"{split} {ctx.base.short_name}")]
    gold = np.concatenate(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, gold)
    return gold


def base_perplexity(ctx, split: str, work: Path) -> float:
    return float(np.exp(-base_gold(ctx, split, work).mean()))


# --- one recipe variant


def variant_settings(name: str, args) -> DecoderSettings:
    if VARIANTS[name] is None:
        return DecoderSettings()
    values = {"teacher": args.small, "init": args.small, **CURRENT, **VARIANTS[name]}
    if values["teacher"] == "LARGE":
        values["teacher"] = args.large
    return DecoderSettings(**values)


def measure_variant(domain: str, name: str, args, windows: EvalSettings, work: Path, pack: dict) -> dict:
    config = variant_settings(name, args)
    small = context_for(domain, args.small, windows)
    started = time.perf_counter()
    memory = memory_for(small, config)
    made_seconds = time.perf_counter() - started
    row = {"domain": domain, "variant": name, "settings": dataclasses.asdict(config),
           "trained_with": memory.manifest.get("train"),
           "memory_folder": str(memory.folder), "parameters": memory.parameters,
           "memory_bytes": folder_bytes(memory.folder), "train_seconds": memory.manifest.get("train_seconds"),
           "train_tokens": memory.manifest.get("train_tokens"), "made_seconds": round(made_seconds, 1),
           "temperature": memory.manifest.get("temperature"), "best_epoch": memory.manifest.get("best_epoch")}
    gold = {split: memory_gold(memory, small, split) for split in ("valid", "test")}
    row.update(alone(gold["test"]))
    for size, model in (("small", args.small), ("large", args.large)):
        ctx = context_for(domain, model, windows)
        row[size] = mixed({split: base_gold(ctx, split, work) for split in ("valid", "test")}, gold)
    row.update(target_fidelity(small, config, memory))
    row["overhead"] = overhead(small, memory, args)
    if name == args.variant[0] and not pack.get("checked_with_eval"):
        row["memdec_eval_test_ppl"] = check_with_eval(domain, args, windows, memory, row["small"]["test_ppl"])
        pack["checked_with_eval"] = name
    print(f"{domain} {name}: small {pack['small_base']:.2f} → {row['small']['test_ppl']:.2f} "
          f"(kNN-LM {pack['knn_lm']:.2f}); large {pack['large_base']:.2f} → {row['large']['test_ppl']:.2f}",
          file=sys.stderr)
    return row


def memory_gold(memory, ctx, split: str, temperature: float = 1.0) -> np.ndarray:
    """The memory's log p(gold) on the base's windows (−inf for tokens it cannot name), its
    logits divided by ``temperature`` (1: the memory as trained, as memdec mixes it)."""
    values = []
    for batch in iter_scored_batches(memory.model, _memory_stream(memory, ctx.corpus.streams[split]),
                                     ctx.windows(split), batch_size=ctx.settings.batch_size,
                                     description=f"{split} memory"):
        logits = memory.vocabulary.mask_other(batch.logits) if memory.vocabulary else batch.logits
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        values.append(logprobs.gather(1, batch.targets[:, None])[:, 0].double().numpy())
    return np.concatenate(values)


def _memory_stream(memory, stream: np.ndarray) -> np.ndarray:
    """The stream in the memory's numbering (a restricted memory names other tokens by one id)."""
    if not memory.vocabulary:
        return stream
    return memory.vocabulary.inputs(torch.from_numpy(stream.astype(np.int64))).numpy()


def alone(gold: np.ndarray) -> dict:
    named = np.isfinite(gold)
    return {"memory_alone_ppl": float(np.exp(-gold[named].mean())), "memory_coverage": float(named.mean())}


def mixed(base: dict[str, np.ndarray], memory: dict[str, np.ndarray]) -> dict:
    """λ tuned on validation over the linear combiner's grid, test scored once with it."""
    linear = registry.get("combiners", "linear")
    grid = [config.lam for config in linear.grid()]

    def perplexity(split: str, lam: float) -> float:
        gold = linear(linear.Config(lam)).combine(torch.from_numpy(base[split]), torch.from_numpy(memory[split]), {})
        return float(torch.exp(-gold.mean()))

    valid = {lam: perplexity("valid", lam) for lam in grid}
    best = min(valid, key=valid.get)
    return {"lam": best, "valid_ppl": valid[best], "test_ppl": perplexity("test", best),
            "lam_at_grid_edge": best in (grid[0], grid[-1])}


def mixing_temperatures(domain: str, row: dict, args, windows: EvalSettings, work: Path) -> dict:
    """A measured variant's memory mixed at each temperature of ``--mixing-temperatures``, λ tuned on
    validation for each; per base, the τ that validation picks and every τ's numbers. (Does a
    memory trained on a few thousand windows come out over- or under-confident?)"""
    memory = open_memory(row["memory_folder"])
    small = context_for(domain, args.small, windows)
    gold = {tau: {split: memory_gold(memory, small, split, tau) for split in ("valid", "test")}
            for tau in args.mixing_temperatures}
    found = {}
    for size, model in (("small", args.small), ("large", args.large)):
        ctx = context_for(domain, model, windows)
        base = {split: base_gold(ctx, split, work) for split in ("valid", "test")}
        by_temperature = {tau: mixed(base, gold[tau]) for tau in args.mixing_temperatures}
        picked = min(by_temperature, key=lambda tau: by_temperature[tau]["valid_ppl"])
        found[size] = {"picked": picked, "by_temperature": {f"{tau:g}": value for tau, value in by_temperature.items()}}
    return found


def overhead(ctx, memory, args) -> dict:
    """Per-token scoring cost over the small base's, timed alternately on one batch of windows:
    the base and its memory, and the base and its kNN-LM (hidden states captured, k neighbours
    searched in its datastore and turned into a distribution)."""
    from memdec_knn import api as knn

    windows = ctx.windows("test")[:ctx.settings.batch_size]
    batch = next(iter_scored_batches(ctx.base.model, ctx.corpus.streams["test"], windows,
                                     batch_size=len(windows), description="timing"))
    model, inputs, mask = ctx.base.model, batch.input_ids, batch.attention_mask
    store = knn.datastore_for(ctx).with_index(ctx.create("retrievers", "faiss"))
    k = min(1024, len(store))

    @torch.inference_mode()
    def base_call():
        model(input_ids=inputs, attention_mask=mask, use_cache=False)

    @torch.inference_mode()
    def memory_call():
        base_call()
        memory.scored_logprobs(inputs, mask, batch.rows, batch.columns)

    @torch.inference_mode()
    def knn_call():
        with capture_last_ffn_input(model) as captured:
            model(input_ids=inputs, attention_mask=mask, use_cache=False)
        hidden = captured["hidden"][batch.rows, batch.columns].float().numpy()
        distances, ids = store.search(hidden, k)
        values = store.vals[np.clip(ids, 0, None)].astype(np.int64)
        knn.sparse_distribution(torch.from_numpy(distances), torch.from_numpy(ids), torch.from_numpy(values), 1.0)

    timing = Timing(min_pairs=5, min_seconds=3.0, max_seconds=60.0)
    results = {}
    for label, call in (("memory", memory_call), ("knn_lm", knn_call)):
        ratio, spread = ratio_statistics(*time_pairs(base_call, call, timing))
        results[label] = {"ratio": round(ratio, 3), "spread": round(spread, 3)}
    return results


def check_with_eval(domain: str, args, windows: EvalSettings, memory, shortcut: float) -> float:
    """The product's own number for this memory on the small base: it must equal the shortcut's."""
    report = evaluate(domain, bases=[args.small], methods=["memdec"], settings=windows,
                      method_settings={"memdec": {"path": str(memory.folder)}})
    product = report["results"][0]["test_ppl"]
    if not math.isclose(product, shortcut, rel_tol=1e-5):
        raise SystemExit(f"memdec eval gives {product}, the stored gold log-probs {shortcut}")
    return product


# --- the report


def table(report: dict) -> str:
    """One line per pack and variant: test perplexities (λ tuned on validation), the memory's own
    facts, and the per-token scoring cost of memory and kNN-LM over the small base's."""
    lines = ["| pack | variant | small base | + kNN-LM | + memory | large base | + memory (change) | "
             "memory alone (coverage) | top-1 agree | KL | train s | cost × memory / kNN-LM |", "|" + "---|" * 12]
    for row in report["rows"]:
        pack = report["packs"][row["domain"]]
        kl, cost = row.get("target_kl"), row["overhead"]
        change = row["large"]["test_ppl"] / pack["large_base"] - 1
        lines.append(
            f"| {row['domain']} | {row['variant']} | {pack['small_base']:.2f} | {pack['knn_lm']:.2f} | "
            f"{row['small']['test_ppl']:.2f} (λ {row['small']['lam']:g}) | {pack['large_base']:.2f} | "
            f"{row['large']['test_ppl']:.2f} ({change:+.1%}, λ {row['large']['lam']:g}) | "
            f"{row['memory_alone_ppl']:.1f} ({row['memory_coverage']:.0%}) | "
            f"{row.get('target_agreement', float('nan')):.1%} | {'–' if kl is None else f'{kl:.3f}'} | "
            f"{row['train_seconds']:.0f} | {cost['memory']['ratio']:.3f} / {cost['knn_lm']['ratio']:.3f} |")
    return "\n".join(lines)


def temperature_table(report: dict) -> str:
    """Validation and test perplexity of each base + memory at each mixing temperature."""
    lines = ["| pack | variant | base | τ: valid / test (λ) | τ validation picks |", "|---|---|---|---|---|"]
    for row in report["rows"]:
        for size, found in row.get("mixing_temperature", {}).items():
            cells = "; ".join(f"{tau}: {value['valid_ppl']:.2f} / {value['test_ppl']:.2f} ({value['lam']:g})"
                              for tau, value in found["by_temperature"].items())
            lines.append(f"| {row['domain']} | {row['variant']} | {size} | {cells} | {found['picked']:g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
