"""Run `memdec compare` on every domain pack, cold (fresh cache) then warm, and time both.

    python benchmarks/compare_domains.py                       # biomed, finance, law
    python benchmarks/compare_domains.py --domain finance -- --budget 64k

Runs the command a user types (a subprocess; `--format json`), each domain with its own fresh
artifact cache so that every datastore, target set, adapter and memory is built inside the cold
run; the warm run repeats the command on the same cache. Saves each JSON report as
benchmarks/results/compare-<domain>.json and prints one markdown table per domain (the one in
the README) plus the cold and warm wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["base", "method", "test ppl", "general ppl", "tuned knobs", "params added", "MB added", "train s",
           "latency ×"]


def run_compare(domain: str, cache: str, extra: list[str]) -> tuple[dict, float]:
    command = [sys.executable, "-m", "memdec_cli.main", "compare", "--domain", domain, "--format", "json", *extra]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "MEMDEC_CACHE": cache, "MEMDEC_NO_PROGRESS": "1"})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return json.loads(result.stdout), seconds


def markdown_table(report: dict) -> list[str]:
    """The rows as the CLI's markdown format prints them (best test perplexity per base in bold)."""
    from memdec_cli.render import best_rows, comparison_rows

    best = best_rows(report)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for index, row in enumerate(comparison_rows(report)):
        if index in best:
            row = [*row[:2], f"**{row[2]}**", *row[3:]]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", action="append", default=None)
    parser.add_argument("extra", nargs="*", help="more `memdec compare` arguments, after --")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    for domain in args.domain or ["biomed", "finance", "law"]:
        cache = tempfile.mkdtemp(prefix=f"memdec-compare-{domain}-")
        report, cold = run_compare(domain, cache, args.extra)
        warm_report, warm = run_compare(domain, cache, args.extra)
        if [row["test_ppl"] for row in warm_report["results"]] != [row["test_ppl"] for row in report["results"]]:
            raise SystemExit(f"{domain}: the warm run disagrees with the cold one")
        report["meta"]["wall_seconds"] = {"cold": round(cold, 1), "warm": round(warm, 1)}
        (RESULTS / f"compare-{domain}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\n#### {domain} — cold {cold / 60:.1f} min, warm {warm:.0f} s\n")
        print("\n".join(markdown_table(report)), flush=True)


if __name__ == "__main__":
    main()
