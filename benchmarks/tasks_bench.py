"""DCPMI scoring: requests after one prompt sharing its forward pass (memdec's scorer) against one
row per (prompt, word) request (the scorer before), side by side in one run on the same requests.

    python benchmarks/tasks_bench.py --tasks-dir ../shared/tasks --task mr --examples 20

Prints both timings, their ratio, and the largest difference between the two sets of scores
(they must agree to float precision).
"""

from __future__ import annotations

import argparse
import time

import torch

from memdec_core.engine.loglikelihood import score_requests
from memdec_core.inputs.models import load_model
from memdec_core.runs.tasks import load_task, plan_scoring


def one_pass_per_request(model, requests, *, batch_size, pad_id, start_id, max_length):
    """The scoring before: every request is its own row (prompt and word), right-padded batches."""
    values = []
    with torch.inference_mode():
        for first in range(0, len(requests), batch_size):
            rows = [((list(context) or [start_id]) + list(word))[-(max_length + 1):] for context, word in
                    requests[first:first + batch_size]]
            length = max(map(len, rows)) - 1
            input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, tokens in enumerate(rows):
                input_ids[row, :len(tokens) - 1], mask[row, :len(tokens) - 1] = torch.tensor(tokens[:-1]), 1
            logprobs = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), -1)
            for row, (tokens, (_, word)) in enumerate(zip(rows, requests[first:first + batch_size])):
                end = len(tokens) - 1
                columns = logprobs[row, end - len(word):end]
                values.append(float(columns.gather(1, torch.tensor(word)[:, None]).double().sum()))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks-dir", required=True)
    parser.add_argument("--task", default="mr")
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--base", default="memdec-demo-m")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    base = load_model(args.base)
    task = load_task(args.task, args.tasks_dir, max_examples=args.examples)
    plan = plan_scoring(task.spec, task.test, base.tokenizer)
    requests = [(list(context), list(word)) for context, word in plan.requests]
    eos = base.tokenizer.eos_token_id
    options = dict(batch_size=args.batch_size, pad_id=eos, start_id=eos, max_length=base.max_positions or 2048)
    timings, scores = {}, {}
    for name, scorer in (("one pass per request", one_pass_per_request), ("shared passes", score_requests)):
        started = time.perf_counter()
        scores[name] = scorer(base.model, requests, **options)
        timings[name] = time.perf_counter() - started
    difference = max(abs(a - b) for a, b in zip(*scores.values()))
    print(f"{args.task}: {len(task.test)} examples, {len(requests)} requests, base {args.base}")
    for name, seconds in timings.items():
        print(f"  {name:22s} {seconds:8.2f} s")
    print(f"  speed-up {timings['one pass per request'] / timings['shared passes']:.1f}x, "
          f"largest score difference {difference:.2e}")


if __name__ == "__main__":
    main()
