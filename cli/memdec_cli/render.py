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
        print(json.dumps(report, indent=2, default=str))
    elif output_format == "markdown":
        print("| " + " | ".join(EVAL_COLUMNS) + " |")
        print("|" + "---|" * len(EVAL_COLUMNS))
        for row in evaluation_rows(report):
            print("| " + " | ".join(row) + " |")
    else:
        print_table(f"{report['domain']}: perplexity on the test split", EVAL_COLUMNS, evaluation_rows(report))
