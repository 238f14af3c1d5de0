"""How much slower a method is than its base, timed so that the number means something.

The base and the method are timed alternately, pair after pair, so that whatever else loads the
machine hits both; a ratio is computed per pair and the median kept, with its spread (half the
interquartile range of the ratios, relative to the median). Timing goes on for at least
``min_pairs`` pairs and until each side has run ``min_seconds``, within a cap; a method more than
``SLOW_RATIO`` times slower stops after two pairs once its own side has run ``min_seconds``. A call too short
to time alone is repeated within a sample. Each side of a generation is called once before timing
starts (caches, lazy initialisation); a scorer has just scored the test split, so it is timed at once.

Two things are timed: teacher-forced scoring of a token stream (``scoring_latency``) and greedy
generation with KV caches (``generation_latency``), which is where the paper's latency claim
lives: a kNN-LM searches its datastore for every generated token, RAG retrieves every few
tokens and re-reads its prefix whenever the passage changes. The base's own row is 1.0 by
construction; nobody times the base against itself.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

from memdec_core.errors import ConfigError, ResultError

#: A method at least this many times slower than the base needs only its own side timed long
#: enough: the base's side is then a fraction of it, and noise cannot change the verdict.
SLOW_RATIO = 5.0


@dataclass(frozen=True)
class Timing:
    """How long to time: the pairs and seconds of measured time per side, and the caps."""

    min_pairs: int = 5
    max_pairs: int = 50
    min_seconds: float = 2.0  # measured time each side should reach
    max_seconds: float = 30.0  # measured time of both sides together, at most (about)
    sample_seconds: float = 0.05  # a call shorter than this is repeated within one sample

    def __post_init__(self):
        if not 2 <= self.min_pairs <= self.max_pairs:
            raise ConfigError(f"need 2 ≤ min_pairs ≤ max_pairs, got {self.min_pairs} and {self.max_pairs}")
        if self.min_seconds < 0 or self.max_seconds < 0 or self.sample_seconds < 0:
            raise ConfigError("timing seconds must not be negative")


def ratio_statistics(base_seconds: list[float], method_seconds: list[float]) -> tuple[float, float]:
    """``(median ratio, spread)`` of paired times: the ratio of each pair, their median, and half
    their interquartile range over the median (0.05: the middle half of the pairs lies within
    about ±5 % of the median)."""
    if len(base_seconds) != len(method_seconds) or len(base_seconds) < 2:
        raise ConfigError("the statistics need at least two pairs of times")
    ratios = [method / max(base, 1e-12) for base, method in zip(base_seconds, method_seconds)]
    median = statistics.median(ratios)
    lower, _, upper = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, (upper - lower) / 2 / max(median, 1e-12)


def time_pairs(base_call: Callable[[], object], method_call: Callable[[], object], timing: Timing = Timing(),
               clock: Callable[[], float] = time.perf_counter, *,
               warm_up: bool = True) -> tuple[list[float], list[float]]:
    """Seconds per call of the base and of the method, sample by sample, timed alternately.

    ``warm_up=False`` for calls that have just run (a method's scorer right after it scored the
    test split): no warm-up call, one call per sample (for a slow method the warm-up call would be
    the costliest part of the timing)."""
    from memdec_core.runtime.distributed import from_main

    # Under several processes every rank times, and a scorer's passes are collective: rank 0
    # decides how many calls every rank makes, so that the ranks stay in step.
    if warm_up:
        base_repeats = from_main(_repeats(base_call, timing.sample_seconds, clock))  # also the warm-up calls
        method_repeats = from_main(_repeats(method_call, timing.sample_seconds, clock))
    else:
        base_repeats = method_repeats = 1
    base_times, method_times = [], []
    while len(base_times) < timing.max_pairs:
        base_times.append(_sample(base_call, base_repeats, clock))
        method_times.append(_sample(method_call, method_repeats, clock))
        if from_main(_timed_enough(base_times, method_times, base_repeats, method_repeats, timing)):
            break
    return base_times, method_times


def _repeats(call: Callable[[], object], sample_seconds: float, clock: Callable[[], float]) -> int:
    """Calls per sample, from one warm-up call (slower than later ones, so it errs towards fewer)."""
    seconds = _sample(call, 1, clock)
    return max(1, min(100, math.ceil(sample_seconds / max(seconds, 1e-9))))


def _sample(call: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    """Seconds per call over ``repeats`` calls in a row."""
    started = clock()
    for _ in range(repeats):
        call()
    return (clock() - started) / repeats


def _timed_enough(base_times: list[float], method_times: list[float], base_repeats: int, method_repeats: int,
                  timing: Timing) -> bool:
    base_total, method_total = sum(base_times) * base_repeats, sum(method_times) * method_repeats
    if len(base_times) >= 2 and method_total >= timing.min_seconds and statistics.median(
            method / max(base, 1e-12) for base, method in zip(base_times, method_times)) > SLOW_RATIO:
        return True  # a very slow method: two pairs tell it (the base's side is the small part of each)
    if len(base_times) < timing.min_pairs:
        return False
    if base_total + method_total >= timing.max_seconds:
        return True
    return base_total >= timing.min_seconds and method_total >= timing.min_seconds


def scoring_latency(base_scorer, method_scorer, stream, windows, *, timing: Timing = Timing(),
                    clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """``(ratio, spread)``: the method's teacher-forced scoring time of ``stream`` over the base's
    (both scorers have just scored the test split: no warm-up)."""
    base_times, method_times = time_pairs(lambda: base_scorer(stream, windows, "latency"),
                                          lambda: method_scorer(stream, windows, "latency"), timing, clock,
                                          warm_up=False)
    return ratio_statistics(base_times, method_times)


def generation_latency(base_generator, method_generator, prompt_ids, new_tokens: int = 32, *,
                       timing: Timing = Timing(), clock: Callable[[], float] = time.perf_counter,
                       ) -> tuple[float, float, float, float]:
    """``(ratio, spread, base_ms_per_token, method_ms_per_token)`` of greedy generation of
    ``new_tokens`` tokens after ``prompt_ids`` ([1, length]); a call's time, prompt included,
    over the tokens it generates (the medians of the samples)."""
    if new_tokens < 1:
        raise ConfigError(f"new_tokens must be at least 1, got {new_tokens}")
    for who, generator in (("the base", base_generator), ("the method", method_generator)):
        _check_generates(who, generator, prompt_ids, new_tokens)
    base_times, method_times = time_pairs(lambda: base_generator(prompt_ids, new_tokens),
                                          lambda: method_generator(prompt_ids, new_tokens), timing, clock)
    ratio, spread = ratio_statistics(base_times, method_times)
    per_token = 1000.0 / new_tokens
    return ratio, spread, statistics.median(base_times) * per_token, statistics.median(method_times) * per_token


def _check_generates(who: str, generator, prompt_ids, new_tokens: int) -> None:
    """A generator that returns another number of tokens would be timed for other work."""
    shape = tuple(generator(prompt_ids, new_tokens).shape)
    if shape != (1, new_tokens):
        raise ResultError(f"{who}'s generator returned ids of shape {shape} for {new_tokens} new tokens; "
                          f"it must return [1, {new_tokens}]")
