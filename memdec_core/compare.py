"""``memdec compare``: every base × method on one domain, as a table a researcher can publish.

For each base model and method: the domain test perplexity (knobs tuned on validation only),
the perplexity on the ``general`` test split with the method still applied (forgetting: DAPT
changes the weights for good; a memory or a datastore can also be unplugged, which gives the
base's number), what the method adds (parameters, bytes on disk, training time) and its
inference time per token relative to the base, timed back to back in the same run.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from memdec_core import registry
from memdec_core.artifacts import cached_artifact, content_key, write_json
from memdec_core.errors import ConfigError, MemdecError
from memdec_core.progress import log

#: What ``memdec compare`` uses unless told otherwise: sized so that the embedded default (three
#: demo bases × six methods on finance) runs cold in under 10 minutes on 2 CPU cores. ``0`` for the
#: token caps means the whole split; the library's ``compare`` applies no cap unless given one.
QUICK_TRAIN_TOKENS = 65_536
QUICK_EVAL_TOKENS = 4_096
QUICK_BUDGET_TOKENS = 24_576
#: A latency ratio above this is measured once instead of as the median of repeats.
SLOW_RATIO = 5.0


@dataclass
class CompareSettings:
    """What ``compare`` measures beyond the test perplexity, and the training budget."""

    general: str = "general"  # the domain whose test split measures forgetting; "" to skip
    general_tokens: int = 2048  # tokens of its test split scored per base × method
    latency_tokens: int = 512  # domain test tokens timed for the latency ratio
    latency_repeats: int = 3  # base and method timed alternately this many times; the median ratio is kept
    budget_tokens: int = 0  # training tokens for every method that trains (0: each method's default)
    budget_flops: float = 0.0  # or training FLOPs for every method that trains (see training_flops_per_token)
    reuse_results: bool = True  # a row measured before with identical inputs is read back, not re-measured

    def __post_init__(self):
        if self.general_tokens < 2 or self.latency_tokens < 2 or self.latency_repeats < 1:
            raise ConfigError("general and latency token counts must be at least 2, latency repeats at least 1")
        if self.budget_tokens < 0 or self.budget_flops < 0 or (self.budget_tokens and self.budget_flops):
            raise ConfigError("the budget is a non-negative number of tokens or of FLOPs, not both")

    def budget(self) -> dict[str, float]:
        """The settings every method that trains receives (none when each keeps its default)."""
        if self.budget_tokens:
            return {"budget_tokens": self.budget_tokens}
        return {"budget_flops": self.budget_flops} if self.budget_flops else {}


def parse_budget(text: str) -> dict[str, float]:
    """``65536``, ``64k``, ``2M`` (training tokens) or ``3e12flops``, ``2.5TFLOPs`` (FLOPs) → settings."""
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgtp]?)\s*(flops?|tokens?)?\s*", text.lower())
    if not match:
        raise ConfigError(f"budget {text!r} is not a number of tokens (65536, 64k, 2M) or FLOPs (3e12flops, 2TFLOPs)")
    number, prefix, unit = match.groups()
    value = float(number) * 1000 ** "_kmgtp".index(prefix or "_")
    if unit and unit.startswith("flop"):
        return {"budget_flops": value}
    if value != int(value):
        raise ConfigError(f"a budget in tokens must be a whole number, got {text!r}")
    return {"budget_tokens": int(value)}


def compare(domain: str, bases: Iterable[str] = (), methods: Iterable[str] = (), *, settings=None,
            combiner: Any = "linear", method_settings: dict[str, dict[str, Any]] | None = None,
            domain_settings: dict[str, Any] | None = None, measure: CompareSettings = CompareSettings()) -> dict:
    """Compare every base × method on ``domain``; returns ``{"domain", "results", "meta"}``.

    ``methods`` defaults to those that declare a place in the default comparison
    (``Method.compare_rank``); ``method_settings`` maps any component's name to its settings.
    """
    from memdec_core.api import default_methods, prepare_run
    from memdec_core.data import load_corpus

    names = list(methods) or default_methods()
    component_settings = _with_budget(names, dict(method_settings or {}), measure.budget())
    run = prepare_run(domain, bases, names, settings=settings, combiner=combiner,
                      component_settings=component_settings, domain_settings=domain_settings)
    general = load_corpus(measure.general) if measure.general else None
    results: list[dict] = []
    try:
        for base_name in run.bases:
            _compare_base(run, base_name, general, measure, results)
    except MemdecError as error:  # what was measured is not lost: the caller can print and save it
        error.partial_report = _report(run, results, measure, names)
        raise
    return _report(run, results, measure, names)


def _report(run, results: list[dict], measure: CompareSettings, names: list[str]) -> dict:
    return {"domain": run.corpus.name, "results": list(results),
            "meta": _meta(run.settings, measure, run.combiner, run.bases, names)}


def _compare_base(run, base_name: str, general, measure: CompareSettings, results: list[dict]) -> None:
    """Every method's row on one base, appended to ``results`` as soon as it is measured."""
    from memdec_core.api import methods_for_base, prepare_context

    ctx = prepare_context(run.corpus, base_name, run.settings, run.combiner, plan=run.plan)
    probes = _Probes(ctx, general, measure)
    for method in methods_for_base(ctx, run.methods):
        cached = _cached_row(ctx, method, general, measure)
        row = _read_row(cached) if measure.reuse_results else None
        if row is not None:
            log(f"{base_name}: {method.name}: reusing the row measured in {cached.parent}")
            results.append(row)
            continue
        log(f"{base_name}: {method.name}")
        results.append(_measure(ctx, method, probes))
        write_json(cached, results[-1])


def _measure(ctx, method, probes: "_Probes") -> dict:
    from memdec_core.api import check_finite

    started = time.perf_counter()
    result = method.evaluate(ctx)
    check_finite(result.test_ppl, f"{method.name} on {ctx.base.model_id}")
    seconds = time.perf_counter() - started
    costs = result.costs
    return {"base": ctx.base.model_id, "method": method.name, "test_ppl": result.test_ppl,
            "valid_ppl": result.valid_ppl, "general_ppl": _finite(probes.general_ppl(result), method.name, ctx),
            "knobs": result.knobs,
            "params_added": costs.params_added, "bytes_added": costs.bytes_added,
            "memory_bytes": costs.memory_bytes, "train_seconds": round(costs.train_seconds, 1),
            "train_tokens": costs.train_tokens, "train_flops": costs.train_flops,
            "latency_ratio": probes.latency_ratio(result), "seconds": round(seconds, 2),
            "tuning": result.tuning, "details": result.details}


def _finite(value: float | None, method: str, ctx) -> float | None:
    from memdec_core.api import check_finite

    check_finite(value, f"{method} on {ctx.base.model_id} (general text)")
    return value


def _read_row(path: Path) -> dict | None:
    """A row measured before, or None (never measured, or unreadable: then it is measured again)."""
    if not path.exists():
        return None
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        log(f"ignoring the unreadable row {path} ({error}); measuring again")
        return None
    return row if isinstance(row, dict) and "test_ppl" in row and "tuning" in row else None


def _cached_row(ctx, method, general, measure: CompareSettings) -> Path:
    """Where the row of ``method`` on this base, data and settings is kept (a rerun reads it back).

    The key holds everything that made the row: every component the method uses (plugin,
    version or code hash, settings), the combiner's code and grid, the base, the data, the windows.
    """
    from memdec_core.identity import component_identity
    from memdec_core.plan import identity

    combiner = ctx.combiner
    key = content_key("compare-row", identity(ctx.plan.resolve([method])), ctx.base.fingerprint,
                      ctx.corpus.hashes, ctx.context, ctx.stride, dataclasses.asdict(ctx.settings),
                      f"{combiner.__module__}.{combiner.__qualname__}", component_identity(combiner),
                      repr(combiner.grid()), general.hashes if general else None,
                      # the budget is already part of the method's settings (a method that trains none ignores it)
                      {k: v for k, v in dataclasses.asdict(measure).items()
                       if k not in ("reuse_results", "budget_tokens", "budget_flops")})
    return cached_artifact("results", key) / "row.json"


def _with_budget(names: list[str], overrides: dict, budget: dict) -> dict:
    """Give the same budget to every method that trains (those with ``budget_tokens``/``budget_flops`` settings)."""
    if not budget:
        return overrides
    for name in names:
        fields = {item.name for item in dataclasses.fields(registry.get("methods", name).Config)}
        if set(budget) <= fields:
            overrides[name] = {**overrides.get(name, {}), **budget}
    return overrides


class _Probes:
    """The general-text stream and the latency slice for one base, and the base's own timing."""

    def __init__(self, ctx, general, measure: CompareSettings):
        from memdec_core.data import make_windows, tokenize_documents
        from memdec_core.evaluate import model_scorer

        self.ctx, self.repeats = ctx, measure.latency_repeats
        self.base_scorer = model_scorer(ctx.base.model, ctx.settings.batch_size)
        self.general = None
        if general is not None:
            stream = tokenize_documents(ctx.base.tokenizer, general.documents["test"])[:measure.general_tokens]
            self.general = (stream, make_windows(len(stream), ctx.context, ctx.stride))
        latency = ctx.corpus.streams["test"][:measure.latency_tokens]
        self.latency = (latency, make_windows(len(latency), ctx.context, ctx.stride))

    def general_ppl(self, result) -> float | None:
        if self.general is None or result.scorer is None:
            return None
        return result.score(*self.general, f"general {self.ctx.base.short_name}").perplexity

    def latency_ratio(self, result) -> float | None:
        """Scoring time of the method over the base's on the same slice, timed back to back (this
        machine may be busy: the median of alternating repeats). Teacher-forced scoring, not
        generation: a method that re-reads its context every few tokens (rag) pays far more here.
        A method more than ``SLOW_RATIO`` times slower is timed once: noise cannot change that."""
        if result.scorer is None:
            return None
        ratios = []
        for _ in range(self.repeats):
            base = self._seconds(self.base_scorer)
            ratios.append(self._seconds(result.scorer) / max(base, 1e-9))
            if ratios[0] > SLOW_RATIO:
                break
        return round(statistics.median(ratios), 3)

    def _seconds(self, scorer) -> float:
        started = time.perf_counter()
        scorer(*self.latency, "latency")
        return time.perf_counter() - started


def _meta(settings, measure: CompareSettings, combiner_class, bases: list[str], methods: list[str]) -> dict:
    import torch

    from memdec_core import __version__

    versions = {"memdec": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "peft", "faiss", "bm25s"):
        try:
            versions[package] = __import__(package).__version__
        except (ImportError, AttributeError):
            versions[package] = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"versions": versions, "seeds": {"eval": settings.seed}, "git": _git_hash(), "device": device,
            "settings": dataclasses.asdict(settings), "measure": dataclasses.asdict(measure),
            "combiner": combiner_class.name or combiner_class.__name__, "bases": bases, "methods": methods}


def _git_hash() -> str | None:
    try:
        output = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return output.stdout.strip() or None if output.returncode == 0 else None
