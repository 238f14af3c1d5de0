"""Evaluate the demo family on every domain pack with base and kNN-LM, and time it.

    python benchmarks/domain_evals.py                      # all packs, results in benchmarks/results/
    python benchmarks/domain_evals.py --domain finance --method base,knn-lm

Runs `memdec eval` as a user would (a subprocess, fresh cache unless --cache is given), saves
each JSON report and prints one markdown table: test perplexity per base × method per domain,
plus the base's perplexity on the general test split (the demo models' own domain) and the
wall time of each evaluation.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run_eval(domain: str, methods: str, cache: str, extra: list[str]) -> tuple[dict, float]:
    command = [sys.executable, "-m", "memdec_cli.main", "eval", "--domain", domain, "--method", methods,
               "--format", "json", *extra]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**_env(), "MEMDEC_CACHE": cache})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return json.loads(result.stdout), seconds


def _env() -> dict:
    import os

    return {**os.environ, "MEMDEC_NO_PROGRESS": "1"}


def main() -> None:
    from memdec_core.engine.scoring import format_knobs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", action="append", default=None)
    parser.add_argument("--method", default="base,knn-lm")
    parser.add_argument("--cache", default=None, help="artifact cache (default: a fresh temporary one)")
    parser.add_argument("extra", nargs="*", help="more `memdec eval` arguments, after --")
    args = parser.parse_args()
    domains = args.domain or ["general", "biomed", "finance", "law"]
    cache = args.cache or tempfile.mkdtemp(prefix="memdec-bench-")
    RESULTS.mkdir(exist_ok=True)
    rows = []
    for domain in domains:
        methods = "base" if domain == "general" else args.method
        report, seconds = run_eval(domain, methods, cache, args.extra)
        (RESULTS / f"eval-{domain}.json").write_text(json.dumps(report, indent=2) + "\n")
        for row in report["results"]:
            rows.append((domain, row["base"], row["method"], row["test_ppl"], row["knobs"], seconds))
    print("| domain | base | method | test ppl | tuned knobs | eval wall s (whole domain) |")
    print("|---|---|---|---|---|---|")
    for domain, base, method, ppl, knobs, seconds in rows:
        knob_text = format_knobs(knobs) or "-"
        print(f"| {domain} | {base} | {method} | {ppl:.2f} | {knob_text} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
