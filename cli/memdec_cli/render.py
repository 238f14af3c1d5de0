"""Rendering results on stdout: rich tables, JSON, markdown."""

from __future__ import annotations

import json
import math

from rich.console import Console
from rich.table import Table


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[str(cell) for cell in row])
    Console().print(table)


def format_ppl(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def evaluation_rows(report: dict) -> list[list[str]]:
    from memdec_core.evaluate import format_knobs

    return [[r["base"], r["method"], format_ppl(r["test_ppl"]), format_ppl(r["valid_ppl"]),
             format_knobs(r["knobs"]) or "-", f"{r['seconds']:.1f}"] for r in report["results"]]


EVAL_COLUMNS = ["base", "method", "test ppl ↓", "valid ppl ↓", "tuned knobs", "seconds"]


def print_evaluation(report: dict, output_format: str) -> None:
    if output_format == "json":
        print(json.dumps(report, indent=2, default=str, allow_nan=False))
    elif output_format == "markdown":
        print("| " + " | ".join(EVAL_COLUMNS) + " |")
        print("|" + "---|" * len(EVAL_COLUMNS))
        for row in evaluation_rows(report):
            print("| " + " | ".join(row) + " |")
    else:
        print_table(f"{report['domain']}: perplexity on the test split", EVAL_COLUMNS, evaluation_rows(report))


COMPARE_COLUMNS = ["base", "method", "test ppl ↓", "general ppl ↓", "tuned knobs", "params added", "MB added",
                   "train s", "latency ×"]


#: How the table abbreviates common knob names (the JSON keeps the full names).
KNOB_LABELS = {"temperature": "T", "lam": "λ", "alpha": "α", "beta": "β", "rank": "r"}


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


def comparison_rows(report: dict) -> list[list[str]]:
    def number(value, pattern):
        return "-" if value is None else pattern.format(value)

    return [[r["base"], r["method"], format_ppl(r["test_ppl"]), format_ppl(r["general_ppl"]),
             compact_knobs(r["knobs"]), human_count(r["params_added"]),
             number(r["bytes_added"] and r["bytes_added"] / 1e6, "{:.1f}"), number(r["train_seconds"], "{:.0f}"),
             number(r["latency_ratio"], "{:.2f}")] for r in report["results"]]


def best_rows(report: dict) -> set[int]:
    """Index of the row with the lowest test perplexity of each base."""
    best: dict[str, int] = {}
    for index, row in enumerate(report["results"]):
        current = best.get(row["base"])
        if current is None or row["test_ppl"] < report["results"][current]["test_ppl"]:
            best[row["base"]] = index
    return set(best.values())


def print_comparison(report: dict, output_format: str) -> None:
    rows, best = comparison_rows(report), best_rows(report)
    if output_format == "json":
        print(json.dumps(report, indent=2, default=str, allow_nan=False))
    elif output_format == "csv":
        import csv
        import sys

        writer = csv.writer(sys.stdout)
        writer.writerow(["base", "method", "test_ppl", "general_ppl", "knobs", "params_added", "bytes_added",
                         "train_seconds", "latency_ratio"])
        for r in report["results"]:
            writer.writerow([r["base"], r["method"], r["test_ppl"], r["general_ppl"], json.dumps(r["knobs"]),
                             r["params_added"], r["bytes_added"], r["train_seconds"], r["latency_ratio"]])
    elif output_format == "markdown":
        print("| " + " | ".join(COMPARE_COLUMNS) + " |")
        print("|" + "---|" * len(COMPARE_COLUMNS))
        for index, row in enumerate(rows):
            if index in best:
                row = [*row[:2], f"**{row[2]}**", *row[3:]]
            print("| " + " | ".join(row) + " |")
    else:
        table = Table(title=f"{report['domain']}: adaptation methods compared (best test ppl per base in green)")
        for column in COMPARE_COLUMNS:
            table.add_column(column, no_wrap=column != "tuned knobs")
        results = report["results"]
        for index, row in enumerate(rows):
            if index in best:
                row = [*row[:2], f"[bold green]{row[2]}[/bold green]", *row[3:]]
            if index and results[index - 1]["base"] == results[index]["base"]:
                row = ["", *row[1:]]  # the base is named once per group
            last_of_base = index + 1 == len(results) or results[index + 1]["base"] != results[index]["base"]
            table.add_row(*row, end_section=last_of_base)
        _console().print(table)


def _console() -> Console:
    """Rich's console; a pipe or file gets 120 columns rather than rich's 80, so tables do not wrap."""
    import sys

    return Console() if sys.stdout.isatty() else Console(width=120)
