"""Data-parallel training's gradient sum: memdec's own all-reduce against PyTorch's DDP.

    torchrun --standalone --nproc_per_node 2 benchmarks/allreduce_bench.py            # gloo on the CPU
    torchrun --standalone --nproc_per_node 2 benchmarks/allreduce_bench.py --rounds 4 --steps 30

Both train memdec-demo-s (every weight, the chunked next-token loss every method's continued
training uses) on the finance pack's train split, from the same weights, on the same batches:

- ``memdec``: ``memdec_core.engine.training.Trainer`` as it is: each rank runs every N-th window
  of each micro-batch and ``distributed.sum_gradients`` sums every gradient in one flat fp32
  all-reduce after the last backward pass;
- ``ddp``: the same Trainer with its step run through ``DistributedDataParallel`` wrapping a
  module whose forward computes that loss (so DDP sees the decoder's and the output layer's
  passes): DDP's buckets are all-reduced while the backward pass still runs, with ``no_sync``
  on every micro-batch but the last.

The two run alternately (round 1 memdec then ddp, round 2 ddp then memdec, ...), each from a
fresh copy of the weights; the first step of each run is a warm-up and is not timed. Rank 0
prints seconds per optimizer step for each, their ratio per round, the median and spread, and the
largest difference between the two runs' weights after the same steps (fp32: they agree up to
the order of float sums).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import tempfile
import time

import numpy as np
import torch

from memdec_core.api import prepare_context
from memdec_core.engine.training import LoopSettings, Trainer, next_token_cross_entropy
from memdec_core.inputs.models import autocast, model_device
from memdec_core.interfaces import EvalSettings
from memdec_core.runtime import distributed
from memdec_core.runtime.distributed import barrier, sharding, sum_across


class LossOfBatch(torch.nn.Module):
    """A model and its loss as one module: DDP's forward then covers every pass the loss makes."""

    def __init__(self, model, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch):
        return self.loss(self.model, batch)


class DdpTrainer(Trainer):
    """memdec's Trainer whose step sums the gradients through DDP instead of ``sum_gradients``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from torch.nn.parallel import DistributedDataParallel

        # Rotary tables are buffers computed alike on every rank: nothing to broadcast each pass.
        self.wrapped = DistributedDataParallel(LossOfBatch(self.model, self.loss), forward_sync_buffers=False)

    def _step(self, starts: np.ndarray) -> tuple[float, int]:
        n_total = int(sum(min(start + self.context, len(self.stream) - 1) - start for start in starts))
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, device, ranks = 0.0, model_device(self.model), sharding()
        firsts = range(0, len(starts), self.settings.batch_size)
        for first in firsts:
            micro_batch = starts[first:first + self.settings.batch_size]
            mine, counts = micro_batch[ranks.rank::ranks.size], 1.0
            last = first == firsts[-1]
            if not len(mine):
                if not last:
                    continue
                mine, counts = micro_batch[:1], 0.0  # the synchronising pass needs every rank; this one adds nothing
            batch = self._batch(mine).to(device)
            share = counts * len(batch.positions) / n_total
            with contextlib.nullcontext() if last else self.wrapped.no_sync(), autocast(self.dtype):
                loss = self.wrapped(batch)
            (loss * share * ranks.size).backward()  # DDP averages over the ranks; memdec's shares sum to 1
            total_loss += float(loss.detach()) * share
        total_loss = sum_across([total_loss])[0]
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.clip)
        self.optimizer.step()
        self.scheduler.step()
        return total_loss, n_total


def train(kind: str, ctx, settings: LoopSettings, steps: int) -> tuple[float, dict, float]:
    """``steps`` timed optimizer steps after one warm-up, on a fresh copy of the base (no DDP hooks
    left from an earlier run); returns (seconds per step, weights, last loss)."""
    model = copy.deepcopy(ctx.base.model).train()
    stream = ctx.corpus.streams["train"]
    with tempfile.TemporaryDirectory() as work:
        trainer = (DdpTrainer if kind == "ddp" else Trainer)(
            model, stream, ctx.context, settings, work, loss=next_token_cross_entropy,
            validate=lambda trained: (1.0, {}))
        order = np.random.default_rng(settings.seed).permutation(len(trainer.chunk_starts))
        per_step = trainer.chunks_per_step

        def step(number: int) -> float:
            chunks = order[number * per_step:(number + 1) * per_step]
            return trainer._step(trainer.chunk_starts[chunks])[0]

        with torch.random.fork_rng():
            torch.manual_seed(settings.seed)
            step(0)  # warm-up: allocations, DDP's first bucket layout
            barrier()
            started = time.perf_counter()
            for number in range(1, steps + 1):
                loss = step(number)
            barrier()
            seconds = (time.perf_counter() - started) / steps
    return seconds, {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}, loss


def time_sum_gradients(model, repeats: int = 10) -> float:
    """Median seconds of one ``sum_gradients`` over every weight of ``model`` (the communication
    and the flat copies, without any forward or backward pass)."""
    parameters = list(model.parameters())
    for parameter in parameters:
        parameter.grad = torch.ones_like(parameter)
    seconds = []
    for _ in range(repeats):
        barrier()
        started = time.perf_counter()
        distributed.sum_gradients(parameters, [0.0])
        seconds.append(time.perf_counter() - started)
    for parameter in parameters:
        parameter.grad = None
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="memdec-demo-s")
    parser.add_argument("--domain", default="finance")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24, help="timed optimizer steps per run")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--json", help="also write the timings here (rank 0)")
    args = parser.parse_args()
    world = distributed.join()
    torch.set_num_threads(1)
    ctx = prepare_context(args.domain, args.model, EvalSettings(context=args.context, stride=args.context // 2))
    settings = LoopSettings(lr=1e-3, batch_size=args.batch_size, accumulate=args.accumulate, max_steps=10**6)
    parameters = sum(parameter.numel() for parameter in ctx.base.model.parameters())
    rounds = []
    for number in range(args.rounds):
        kinds = ("memdec", "ddp") if number % 2 == 0 else ("ddp", "memdec")
        runs = {kind: train(kind, ctx, settings, args.steps) for kind in kinds}
        difference = max(float((runs["memdec"][1][name] - weights).abs().max())
                         for name, weights in runs["ddp"][1].items())
        moved = max(float((ctx.base.model.state_dict()[name] - weights).abs().max())
                    for name, weights in runs["ddp"][1].items())  # the runs did train
        rounds.append({"order": list(kinds), "memdec_s": runs["memdec"][0], "ddp_s": runs["ddp"][0],
                       "ratio_ddp_over_memdec": runs["ddp"][0] / runs["memdec"][0],
                       "max_weight_difference": difference, "max_weight_change": moved,
                       "loss": {kind: run[2] for kind, run in runs.items()}})
        if world.main:
            row = rounds[-1]
            print(f"round {number + 1} ({' then '.join(kinds)}): memdec {row['memdec_s']:.4f} s/step  "
                  f"ddp {row['ddp_s']:.4f} s/step  ddp/memdec {row['ratio_ddp_over_memdec']:.3f}  "
                  f"max |Δweight| between them {difference:.2e} (each moved up to {moved:.2e})", flush=True)
    reduce_s = time_sum_gradients(ctx.base.model)
    if not world.main:
        return
    summary = {kind: {"median_s": statistics.median(row[f"{kind}_s"] for row in rounds),
                      "min_s": min(row[f"{kind}_s"] for row in rounds),
                      "max_s": max(row[f"{kind}_s"] for row in rounds)} for kind in ("memdec", "ddp")}
    ratios = [row["ratio_ddp_over_memdec"] for row in rounds]
    print(f"{args.model}, {parameters:,} parameters, {world.size} ranks ({torch.distributed.get_backend()}), "
          f"{args.steps} steps of {args.batch_size}×{args.accumulate} windows of {args.context} per run:")
    for kind, numbers in summary.items():
        print(f"  {kind:6s} median {numbers['median_s']:.4f} s/step (range {numbers['min_s']:.4f}–"
              f"{numbers['max_s']:.4f})")
    print(f"  ddp/memdec per round: {', '.join(f'{ratio:.3f}' for ratio in ratios)} "
          f"(median {statistics.median(ratios):.3f})")
    print(f"  memdec's all-reduce alone (sum_gradients, median of 10): {reduce_s:.4f} s, "
          f"{reduce_s / summary['memdec']['median_s']:.1%} of memdec's median step: the most DDP's overlap could hide")
    print(f"  largest weight difference between the two after the same steps: "
          f"{max(row['max_weight_difference'] for row in rounds):.2e}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"model": args.model, "parameters": parameters, "ranks": world.size, "steps": args.steps,
                       "rounds": rounds, "summary": summary, "sum_gradients_s": reduce_s}, handle, indent=2)


if __name__ == "__main__":
    main()
