"""Rendering results on stdout: rich tables, JSON, markdown, csv."""

from __future__ import annotations

import json
import math
import os
import sys

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

#: How wide a table may grow when stdout is a file or a pipe (no terminal to fit): wider than any real row,
#: so a cell is never cut; the table itself is printed at its natural width.
PIPE_MAX_WIDTH = 1000


def _console(*tables: Table) -> Console:
    """A terminal's own width, or $COLUMNS when set (rich reads it); otherwise, for a file or a pipe,
    the natural width of ``tables``, as rich's 80-column fallback would fold or cut their cells."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS", "").strip().isdigit():
        return Console()
    wide = Console(width=PIPE_MAX_WIDTH)
    natural = max((Measurement.get(wide, wide.options, table).maximum for table in tables), default=80)
    return Console(width=max(natural, 80))


def _new_table(title: str, columns: list[str]) -> Table:
    """A table whose cells fold onto more lines when space runs short, never cut with an ellipsis."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    table = _new_table(title, columns)
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    _console(table).print(table)


def format_ppl(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def evaluation_rows(report: dict) -> list[list[str]]:
    from memdec_core.engine.scoring import format_knobs

    weights = learned_weights(report)
    return [[r["base"], r["method"], format_ppl(r["test_ppl"]), format_bpb(r.get("test_bpb")),
             format_ppl(r["valid_ppl"]), _given(r, format_knobs(r["knobs"]) or "-"),
             *([weight_cell(r)] if weights else []), f"{r['seconds']:.1f}"] for r in report["results"]]


EVAL_COLUMNS = ["base", "method", "test ppl ↓", "test bits/byte ↓", "valid ppl ↓", "tuned knobs", "seconds"]
#: The column of a learned weight (``details.weights``), beside the knobs; only in a report that has one.
WEIGHT_COLUMN = "learned λ (mean ±sd)"


def evaluation_columns(report: dict) -> list[str]:
    return _with_weights(EVAL_COLUMNS, report)


def _with_weights(columns: list[str], report: dict) -> list[str]:
    """``columns`` with the learned weight's column after the knobs, where some row learned one."""
    if not learned_weights(report):
        return columns
    at = columns.index("tuned knobs") + 1
    return [*columns[:at], WEIGHT_COLUMN, *columns[at:]]


def row_weights(row: dict) -> dict:
    """A row's learned weight per position (``details.weights``: mean, spread, a sample), or {}."""
    weights = (row.get("details") or {}).get("weights")
    return weights if isinstance(weights, dict) and weights.get("weight_mean") is not None else {}


def learned_weights(report: dict) -> bool:
    return any(row_weights(row) for row in report["results"])


def weight_cell(row: dict) -> str:
    """``0.23 ±0.27``: the memory's mean weight over the test positions and its standard deviation
    (the sample drawn by ``--plot`` stays in the JSON)."""
    weights = row_weights(row)
    if not weights:
        return "-"
    return f"{weights['weight_mean']:.2f}" + _number(weights.get("weight_std"), " ±{:.2f}")


def format_bpb(value) -> str:
    return _number(value, "{:.4f}")


def mixed_tokenizers(report: dict) -> bool:
    """Whether the report's bases have different tokenizers (then perplexities do not compare across them)."""
    meta = report.get("meta", {})
    if (meta.get("token_caps") or {}).get("applied_as") == "text":  # the run found their tokenizations differ
        return True
    return len({entry.get("tokenizer") for entry in meta.get("contexts", {}).values()} - {None}) > 1


def compare_columns(report: dict) -> list[str]:
    """The comparison's columns; bits per byte first where bases of different tokenizers are compared."""
    columns = _with_weights(COMPARE_COLUMNS, report)
    if not mixed_tokenizers(report):
        return columns
    return [*columns[:2], "test bits/byte ↓", *columns[2:]]


def print_evaluation(report: dict, output_format: str) -> None:
    if output_format == "json":
        print(json.dumps(report, indent=2, default=str, allow_nan=False))
    elif output_format == "markdown":
        _print_markdown(evaluation_columns(report), evaluation_rows(report))
    else:
        print_table(f"{report['domain']}: perplexity on the test split", evaluation_columns(report),
                    evaluation_rows(report))
    note = caps_note(report.get("meta") or {}) if output_format != "json" else None
    if note:
        print("\n" + note)


def _print_markdown(columns: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row) + " |")


COMPARE_COLUMNS = ["base", "method", "test ppl ↓", "general ppl ↓", "tuned knobs", "params added", "MB added",
                   "train s", "latency ×", "gen ×"]
#: The second table: how closely each memory reproduces the kNN distribution it was trained on.
FIDELITY_COLUMNS = ["base", "method", "memory alone ppl ↓", "top-1 agreement with kNN targets ↑",
                    "KL(p_kNN‖p_mem) nats ↓"]
FIDELITY_KEYS = ("memory_alone_ppl", "target_agreement", "target_kl")
#: The csv columns: the row's keys, raw; the last ones are absent (empty) in reports written before them.
CSV_KEYS = ["base", "method", "test_ppl", "general_ppl", "knobs", "params_added", "bytes_added", "train_seconds",
            "latency_ratio", "latency_spread", "generation_ratio", *FIDELITY_KEYS, "memory_coverage", "test_bpb",
            "valid_bpb", "general_bpb", "combiner", "weight_mean", "weight_std"]
#: The csv columns read from ``details.weights`` rather than from the row.
WEIGHT_KEYS = ("weight_mean", "weight_std")


#: How the table abbreviates common knob names (the JSON keeps the full names).
KNOB_LABELS = {"temperature": "T", "lam": "λ", "alpha": "α", "beta": "β", "rank": "r"}


def _given(row: dict, knobs: str) -> str:
    """The knobs as shown, marked when they were given rather than tuned (validation not scored)."""
    return f"{knobs} (given)" if (row.get("details") or {}).get("knobs_from") == "given" else knobs


def compact_knobs(knobs: dict) -> str:
    """``{"lr": 0.002, "rank": 34, "lam": 0.4}`` → ``lr=2e-03 r=34 λ=0.4``."""
    shown = []
    for key, value in knobs.items():
        text = f"{value:.0e}" if key == "lr" else f"{value:g}" if isinstance(value, float) else str(value)
        shown.append(f"{KNOB_LABELS.get(key, key)}={text}")
    return " ".join(shown) or "-"


def human_count(value) -> str:
    """1475840 → 1.48M; 655360 → 655k."""
    if value is None:
        return "-"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.3g}{suffix}"
    return str(value)


def _number(value, pattern: str) -> str:
    """``pattern`` applied to ``value``; "-" for a figure the report does not have (None, NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return pattern.format(value)


def latency_cell(ratio, spread) -> str:
    """1.38 and 0.03 → ``1.38 ±3%``: the median ratio to the base and the relative spread of the repeats."""
    if ratio is None:
        return "-"
    return f"{ratio:.2f}" + ("" if spread is None else f" ±{spread * 100:.2g}%")


def comparison_rows(report: dict) -> list[list[str]]:
    bpb, weights = mixed_tokenizers(report), learned_weights(report)
    return [[r["base"], r["method"], *([format_bpb(r.get("test_bpb"))] if bpb else []),
             format_ppl(r.get("test_ppl")), format_ppl(r.get("general_ppl")),
             _given(r, compact_knobs(r.get("knobs") or {})), *([weight_cell(r)] if weights else []),
             human_count(r.get("params_added")),
             _number(r.get("bytes_added") and r["bytes_added"] / 1e6, "{:.1f}"),
             _number(r.get("train_seconds"), "{:.0f}"),
             latency_cell(r.get("latency_ratio"), r.get("latency_spread")),
             _number(r.get("generation_ratio"), "{:.2f}")] for r in report["results"]]


def fidelity_rows(report: dict) -> list[list[str]]:
    """The memory-fidelity figures of the rows that have any (the memory methods); none for old reports."""
    return [[r["base"], r["method"], _memory_alone(r),
             _number(r.get("target_agreement"), "{:.1%}"), _number(r.get("target_kl"), "{:.3f}")]
            for r in report["results"] if any(r.get(key) is not None for key in FIDELITY_KEYS)]


def _memory_alone(row: dict) -> str:
    """The memory's own perplexity, with the share of tokens it names when that is not all of them
    (a kNN-LM alone gives probability 0 to tokens none of its neighbours holds)."""
    text = format_ppl(row.get("memory_alone_ppl"))
    coverage = row.get("memory_coverage")
    return f"{text} ({coverage:.0%} of tokens)" if coverage is not None and coverage < 1 else text


def best_rows(report: dict) -> set[int]:
    """Index of the row with the lowest test perplexity of each base."""
    best: dict[str, int] = {}
    for index, row in enumerate(report["results"]):
        current = best.get(row["base"])
        if current is None or row["test_ppl"] < report["results"][current]["test_ppl"]:
            best[row["base"]] = index
    return set(best.values())


def protocol_note(meta: dict) -> str | None:
    """One line saying how the methods that train were given compute, or None for a report that does not say."""
    protocol = meta.get("protocol")
    if not protocol:
        return None
    measure = meta.get("measure") or {}
    if protocol == "equal-flops" and measure.get("budget_flops"):
        return f"training compute: every method that trains gets the same {measure['budget_flops']:.3g} FLOPs"
    if protocol == "equal-flops":
        return "training compute: every method that trains gets the Memory Decoder's FLOPs (the paper's protocol)"
    if protocol == "tokens":
        tokens = measure.get("budget_tokens")
        budget = f"{tokens:,} training tokens" if tokens else "token budget"
        return f"training compute: every method that trains gets the same {budget}"
    if protocol == "own-schedule":
        return "training compute: each method's own schedule (its epochs, with early stopping)"
    return f"training compute: {protocol}"


def caps_note(meta: dict) -> str | None:
    """One line saying that the token caps were read as text (bases of different tokenizers), and how much."""
    caps = meta.get("token_caps") or {}
    if caps.get("applied_as") != "text":
        return None
    kept = ", ".join(f"{split} {caps['documents'][split]} documents ({caps['bytes'][split]:,} bytes)"
                     for split in caps.get("bytes", {}))
    return (f"token caps: the bases have different tokenizers, so each cap of N tokens kept the same whole documents "
            f"within {caps.get('bytes_per_token')}×N bytes for every base: {kept}")


def memory_note(report: dict) -> str | None:
    """Which teacher the Memory Decoder learned from and which model it started from, as its rows record."""
    described = []
    for row in report["results"]:
        details = row.get("details") or {}
        if row["method"] != "memdec" or not (details.get("teacher") or details.get("init")):
            continue
        parts = [f"{label} {details[key]}" for key, label in (("teacher", "teacher"), ("init", "initialised from"))
                 if details.get(key)]
        if details.get("init_layers"):
            parts[-1] += f" (its first {details['init_layers']} blocks)"
        if details.get("recipe"):
            temperature = details.get("temperature")
            parts.append(f"recipe {details['recipe']}" + (f", T = {temperature:g}" if temperature is not None else ""))
        described.append(", ".join(parts))
    unique = list(dict.fromkeys(described))  # one memory is usually shared by every base
    return f"memory decoder: {'; '.join(unique)}" if unique else None


def grid_notes(report: dict) -> list[str]:
    """Knobs whose best value was the edge of their grid (the grid was extended once; see the row)."""
    return [f"grid edge: {row['method']} on {row['base']}: {note}" for row in report["results"]
            for note in (row.get("details") or {}).get("grid_edges", [])]


def comparison_notes(report: dict) -> list[str]:
    notes = [protocol_note(report.get("meta") or {}), caps_note(report.get("meta") or {}), memory_note(report),
             *grid_notes(report)]
    return [note for note in notes if note]


def print_comparison(report: dict, output_format: str) -> None:
    if output_format == "json":
        print(json.dumps(report, indent=2, default=str, allow_nan=False))
    elif output_format == "csv":
        _print_comparison_csv(report)
    elif output_format == "markdown":
        _print_comparison_markdown(report)
    else:
        _print_comparison_table(report)


def _print_comparison_csv(report: dict) -> None:
    import csv

    writer = csv.writer(sys.stdout)
    writer.writerow(CSV_KEYS)
    for r in report["results"]:
        writer.writerow([_csv_value(r, key) for key in CSV_KEYS])


def _csv_value(row: dict, key: str):
    if key == "knobs":
        return json.dumps(row.get("knobs") or {})
    if key in WEIGHT_KEYS:
        return row_weights(row).get(key)
    return row.get(key)


def _print_comparison_markdown(report: dict) -> None:
    best = best_rows(report)
    rows = [[*row[:2], f"**{row[2]}**", *row[3:]] if index in best else row
            for index, row in enumerate(comparison_rows(report))]
    _print_markdown(compare_columns(report), rows)
    fidelity = fidelity_rows(report)
    if fidelity:
        print("\nMemory fidelity:\n")
        _print_markdown(FIDELITY_COLUMNS, fidelity)
    notes = comparison_notes(report)
    if notes:
        print("\n" + "  \n".join(notes))  # two trailing spaces: a markdown line break


def _print_comparison_table(report: dict) -> None:
    results, best = report["results"], best_rows(report)
    table = _new_table(f"{report['domain']}: adaptation methods compared (best test ppl per base in green)",
                       compare_columns(report))
    for index, row in enumerate(comparison_rows(report)):
        if index in best:
            row = [*row[:2], f"[bold green]{row[2]}[/bold green]", *row[3:]]
        if index and results[index - 1]["base"] == results[index]["base"]:
            row = ["", *row[1:]]  # the base is named once per group
        last_of_base = index + 1 == len(results) or results[index + 1]["base"] != results[index]["base"]
        table.add_row(*row, end_section=last_of_base)
    tables = [table]
    fidelity = fidelity_rows(report)
    if fidelity:
        tables.append(_new_table("memory fidelity", FIDELITY_COLUMNS))
        for row in fidelity:
            tables[1].add_row(*row)
    console = _console(*tables)
    for printed in tables:
        console.print(printed)
    for note in comparison_notes(report):
        console.print(note, markup=False, highlight=False, soft_wrap=True)  # a file keeps it on one line
