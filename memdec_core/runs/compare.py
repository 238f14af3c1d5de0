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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from memdec_core.components import registry
from memdec_core.errors import ConfigError, MemdecError
from memdec_core.inputs.data import cut_corpus, load_corpus, text_bytes
from memdec_core.runs.meta import call_config, context_entry, run_meta
from memdec_core.runs.prepare import (
    check_finite,
    evaluate_timed,
    method_rows,
    methods_for_base,
    named_row,
    prepare_run,
    split_bits_per_byte,
    with_combiner,
)
from memdec_core.runs.runconfig import budget_from_fields
from memdec_core.runtime.progress import log
from memdec_core.runtime.renames import renamed_keywords
from memdec_core.runtime.timings import recording, stage
from memdec_core.store.artifacts import cached_artifact, content_key, write_json


@dataclass
class CompareSettings:
    """What ``compare`` measures beyond the test perplexity, and the training budget."""

    general: str = "general"  # the domain whose test split measures forgetting; "" to skip
    general_tokens: int = 1024  # tokens of its test split scored per base × method
    latency_tokens: int = 512  # domain test tokens scored for the (teacher-forced) latency ratio
    generation_tokens: int = 16  # tokens generated for the generation latency ratio (0: not timed)
    latency_seconds: float = 0.5  # time each side is measured for, over at least 5 alternating pairs
    budget_tokens: int = 0  # training tokens for every method that trains (0: each method's default)
    budget_flops: float = 0.0  # or training FLOPs for every method that trains (see training_flops_per_token)
    #: Without a budget: every method that trains gets the FLOPs of the Memory Decoder's own training
    #: (the paper's protocol); False: each method's own schedule.
    equal_compute: bool = True
    reuse_results: bool = True  # a row measured before with identical inputs is read back, not re-measured

    def __post_init__(self):
        if self.general_tokens < 2 or self.latency_tokens < 2 or self.generation_tokens < 0 or self.latency_seconds < 0:
            raise ConfigError("general and latency token counts must be at least 2, generation tokens and "
                              "latency seconds not negative")
        if self.budget_tokens < 0 or self.budget_flops < 0 or (self.budget_tokens and self.budget_flops):
            raise ConfigError("the budget is a non-negative number of tokens or of FLOPs, not both")

    @property
    def protocol(self) -> str:
        """``equal-flops``, ``tokens`` or ``own-schedule``: how the methods that train were given compute."""
        if self.budget_tokens:
            return "tokens"
        return "equal-flops" if self.budget_flops or self.equal_compute else "own-schedule"

    def budget(self) -> dict[str, float]:
        """The settings every method that trains receives (none when each keeps its default)."""
        if self.budget_tokens:
            return {"budget_tokens": self.budget_tokens}
        return {"budget_flops": self.budget_flops} if self.budget_flops else {}


@renamed_keywords(method_settings="component_settings")
def compare(domain: str, bases: Iterable[str] = (), methods: Iterable[str] = (), *, settings=None,
            combiner: Any = "linear", component_settings: dict[str, dict[str, Any]] | None = None,
            domain_settings: dict[str, Any] | None = None, measure: CompareSettings = CompareSettings(),
            config: dict | None = None, command: list[str] | None = None) -> dict:
    """Compare every base × method on ``domain``; returns ``{"domain", "results", "meta"}``.

    ``methods`` defaults to those that declare a place in the default comparison
    (``Method.compare_rank``); ``component_settings`` maps any component's name to its settings
    (``--set NAME.KEY=VALUE``); ``settings`` are the windows (EvalSettings). ``combiner`` is one
    combiner or a list of them (``["linear", "adaptive"]``): then every method that mixes a memory
    gets a row per combiner, the first named as the method, the others ``method+combiner``.
    ``config`` and ``command`` (the CLI's resolved options and command line) go into the meta;
    from Python the call's own arguments are recorded.
    """
    with recording() as timings:
        report = _compare(domain, bases, methods, settings, combiner, component_settings, domain_settings, measure,
                          config, command, timings)
    report["meta"]["timings"] = dict(timings)  # closed: rounded, and the time outside any stage added
    return report


def _compare(domain, bases, methods, settings, combiner, component_settings, domain_settings,
             measure: CompareSettings, config, command, timings: dict) -> dict:
    names = list(methods) or registry.default_methods()
    run = prepare_run(domain, bases, names, settings=settings, combiner=combiner,
                      component_settings=_with_budget(names, dict(component_settings or {}), measure.budget()),
                      domain_settings=domain_settings, head_to_head=True)
    names = [method.name for method in run.methods]  # each once
    general = load_corpus(measure.general) if measure.general else None
    if general is not None and run.tokenizations > 1:  # the general text too is the same for every base
        general = cut_corpus(general, {"test": measure.general_tokens})
    results: list[dict] = []
    protocol = _Protocol(measure, run.methods)
    contexts: dict[str, dict] = {}
    config = config or call_config(domain=domain, bases=run.bases, methods=names, combiner=run.combiners,
                                   settings=run.settings, component_settings=component_settings,
                                   options=_measure_options(measure))

    def report() -> dict:
        meta = run_meta(settings=run.settings, bases=run.bases, methods=names, combiner=run.combiners,
                        contexts=contexts, config=config, command=command,
                        extra={"measure": dataclasses.asdict(measure), **protocol.facts(),
                               "token_caps": _caps_facts(run, general),
                               "timings": {stage: round(seconds, 2) for stage, seconds in timings.items()}})
        return {"domain": run.corpus.name, "results": list(results), "meta": meta}

    try:
        for base_name in run.bases:
            _compare_base(run, base_name, general, measure, protocol, results, contexts)
    except MemdecError as error:  # what was measured is not lost: the caller can print and save it
        error.partial_report = report()
        raise
    return report()


def _caps_facts(run, general) -> dict:
    """``meta["token_caps"]``, with the general test text kept as text (bases of different tokenizers)."""
    facts = run.caps_facts()
    if run.tokenizations > 1 and general is not None:
        facts["general_test"] = {"bytes": text_bytes(general.documents["test"]),
                                 "documents": len(general.documents["test"])}
    return facts


def _measure_options(measure: CompareSettings) -> dict:
    """compare's own options in config-file form, for the meta of a call from Python."""
    fields = {key: value for key, value in dataclasses.asdict(measure).items()
              if key in ("budget_tokens", "budget_flops", "equal_compute")}
    return {"budget": budget_from_fields(fields), "general_tokens": measure.general_tokens,
            "latency_tokens": measure.latency_tokens}


class _Protocol:
    """How the methods that train get their compute, and what they got.

    Under equal compute the reference method (``Method.compute_reference``: the Memory Decoder)
    is measured first on each base; every other method that trains then gets the FLOPs its row
    reports (``Method.with_flops_budget``). Without a reference in the run, each method keeps
    its own schedule, and the report says so.
    """

    def __init__(self, measure: CompareSettings, methods):
        self.reference = next((method for method in methods if method.compute_reference), None)
        self.equal = measure.equal_compute and not measure.budget()
        self.name = measure.protocol if not self.equal or self.reference else "own-schedule"
        if self.equal and self.reference is None:
            log("no method of the run sets the equal-compute budget (the Memory Decoder does): "
                "every method that trains follows its own schedule")
        self.budgets: dict[str, float] = {}  # base → FLOPs given to the methods that train

    def order(self, methods) -> list:
        """The reference first, so that its compute is known before the others train."""
        if not self.equal or self.reference is None:
            return list(methods)
        return sorted(methods, key=lambda method: not method.compute_reference)

    def apply(self, base_name: str, method, reference_row: dict | None):
        if not self.equal or method.compute_reference or reference_row is None:
            return method
        flops = float(reference_row.get("train_flops") or 0.0)
        if flops <= 0:
            return method
        self.budgets[base_name] = flops
        return method.with_flops_budget(flops)

    def facts(self) -> dict:
        facts = {"protocol": self.name}
        if self.name == "equal-flops" and self.equal:
            facts["compute_reference"] = self.reference.name
            facts["budget_flops"] = dict(self.budgets)
        return facts


def _compare_base(run, base_name: str, general, measure: CompareSettings, protocol: _Protocol,
                  results: list[dict], contexts: dict[str, dict]) -> None:
    """Every method's row on one base, appended to ``results`` as soon as it is measured (then
    put back in the run's order)."""
    ctx = run.context(base_name)
    contexts[ctx.base.model_id] = context_entry(ctx)
    methods = methods_for_base(ctx, run.methods)
    _check_budget_fits(ctx, methods, measure)
    probes = _Probes(ctx, general, measure, None if run.tokenizations > 1 else measure.general_tokens)
    first, reference_row = len(results), None
    for method in protocol.order(methods):
        method = protocol.apply(base_name, method, reference_row)
        for name, combiner in method_rows(run, method):
            row_ctx = with_combiner(ctx, combiner)
            cached = _cached_row(row_ctx, method, general, measure)
            row = _read_row(cached) if measure.reuse_results else None
            if row is None:
                log(f"{ctx.base.model_id}: {name}")
                results.append(named_row(_measure(row_ctx, method, probes), name, combiner))
                write_json(cached, results[-1])  # after the append: a row that cannot be saved is still reported
            else:
                log(f"{ctx.base.model_id}: {name}: reusing the row measured in {cached.parent}")
                results.append(named_row(row, name, combiner))
            # The first combiner's row sets the budget: a learned weight's fit is not the memory's training.
            if method.compute_reference and reference_row is None:
                reference_row = results[-1]
    names = [name for method in methods for name, _ in method_rows(run, method)]
    rank = {name: number for number, name in enumerate(names)}
    results[first:] = sorted(results[first:], key=lambda row: rank[row["method"]])


def _check_budget_fits(ctx, methods, measure: CompareSettings) -> None:
    """A token budget smaller than one optimizer step of a method that trains is refused before
    any work (the step is batch × accumulate × context tokens)."""
    if not measure.budget_tokens:
        return
    for method in methods:
        config = method.config
        if not (hasattr(config, "budget_tokens") and hasattr(config, "batch_size")):
            continue
        step = config.batch_size * getattr(config, "accumulate", 1) * ctx.context
        if measure.budget_tokens < step:
            raise ConfigError(f"--budget {measure.budget_tokens:,} tokens is less than one optimizer step of "
                              f"{method.name} on {ctx.base.model_id} ({step:,} tokens: batch {config.batch_size} × "
                              f"accumulate {getattr(config, 'accumulate', 1)} × context {ctx.context}); give at "
                              f"least {step:,}")


def _measure(ctx, method, probes: "_Probes") -> dict:
    started = time.perf_counter()
    with recording() as timings:
        result = evaluate_timed(ctx, method)
        check_finite(result.test_ppl, f"{method.name} on {ctx.base.model_id}")
        seconds = time.perf_counter() - started
        with stage("general"):
            general_ppl = _finite(probes.general_ppl(result), method.name, ctx)
        with stage("latency"):
            latency = probes.latency(method, result)
    costs = result.costs
    return {"base": ctx.base.model_id, "method": method.name, "test_ppl": result.test_ppl,
            "valid_ppl": result.valid_ppl, "general_ppl": general_ppl, **split_bits_per_byte(ctx, result),
            "general_bpb": probes.general_bpb(general_ppl), "knobs": result.knobs,
            "params_added": costs.params_added, "bytes_added": costs.bytes_added,
            "memory_bytes": costs.memory_bytes, "train_seconds": round(costs.train_seconds, 1),
            "train_tokens": costs.train_tokens, "train_flops": costs.train_flops,
            **latency, "seconds": round(seconds, 2),
            **_memory_facts(result), "tuning": result.tuning, "details": result.details, "timings": timings}


#: The memory facts every mixture row carries (None where a memory does not give one).
MEMORY_FACTS = ("memory_alone_ppl", "memory_coverage", "target_agreement", "target_kl")


def _memory_facts(result) -> dict:
    if not result.memory:
        return {}
    return {name: result.memory.get(name) for name in MEMORY_FACTS}


def _finite(value: float | None, method: str, ctx) -> float | None:
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
    version or code hash, settings), the combiner's code and grid (``ctx.combiner``: the row's own,
    one of a head-to-head's), the base, the data, the windows.
    """
    from memdec_core.components.identity import component_identity
    from memdec_core.components.plan import identity

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
    """The general-text stream, the latency slice and prompt for one base, and the base's own
    scorer and generator (the reference every ratio divides by). The general stream is its test
    split's first ``general_cap`` tokens, or (None) the whole split given, already cut as text."""

    def __init__(self, ctx, general, measure: CompareSettings, general_cap: int | None):
        import torch

        from memdec_core.engine.generation import model_generator
        from memdec_core.engine.latency import Timing
        from memdec_core.engine.scoring import model_scorer
        from memdec_core.inputs.data import cached_stream, make_windows

        self.ctx, self.measure = ctx, measure
        self.timing = Timing(min_seconds=measure.latency_seconds, max_seconds=max(30.0, 4 * measure.latency_seconds))
        self.base_scorer = model_scorer(ctx.base.model, ctx.settings.batch_size)
        self.base_generator = model_generator(ctx.base.model, ctx.base.tokenizer)
        self.general = None
        if general is not None:
            stream = cached_stream(ctx.base.tokenizer, general.documents["test"], general.hashes["test"],
                                   "tokenizing general", cap=general_cap)
            self.general = (stream, make_windows(len(stream), ctx.context, ctx.stride))
        latency = ctx.corpus.streams["test"][:measure.latency_tokens]
        self.latency_slice = (latency, make_windows(len(latency), ctx.context, ctx.stride))
        prompt = ctx.corpus.streams["test"][:min(PROMPT_TOKENS, ctx.context - measure.generation_tokens)]
        self.prompt = torch.from_numpy(prompt.astype("int64"))[None]

    def general_ppl(self, result) -> float | None:
        if self.general is None or result.scorer is None:
            return None
        return result.score(*self.general, f"general {self.ctx.base.short_name}").perplexity

    def general_bpb(self, general_ppl: float | None) -> float | None:
        from memdec_core.engine.scoring import bits_per_byte

        return None if self.general is None else bits_per_byte(general_ppl, self.ctx.base.tokenizer, self.general[0])

    def latency(self, method, result) -> dict:
        """``latency_ratio``/``latency_spread`` (teacher-forced scoring of the slice) and
        ``generation_ratio``/``generation_spread``/``generation_ms_per_token`` (greedy generation
        with KV caches), each the method's time over the base's, timed alternately
        (``memdec_core.engine.latency``). The unadapted base is 1 by construction: it is not timed."""
        from memdec_core.engine.latency import generation_latency, scoring_latency
        from memdec_core.runtime.progress import quiet

        facts = dict.fromkeys(LATENCY_FACTS)
        if method.unadapted:
            facts.update(latency_ratio=1.0, latency_spread=0.0, generation_ratio=1.0, generation_spread=0.0)
            return facts
        with quiet():
            if result.scorer is not None:
                ratio, spread = scoring_latency(self.base_scorer, result.scorer, *self.latency_slice,
                                                timing=self.timing)
                facts.update(latency_ratio=round(ratio, 3), latency_spread=round(spread, 3))
            if result.generator is not None and self.measure.generation_tokens:
                ratio, spread, base_ms, method_ms = generation_latency(
                    self.base_generator, result.generator, self.prompt, self.measure.generation_tokens,
                    timing=self.timing)
                facts.update(generation_ratio=round(ratio, 3), generation_spread=round(spread, 3),
                             generation_ms_per_token=round(method_ms, 2), base_ms_per_token=round(base_ms, 2))
        return facts


#: The latency figures of every row (None where a method cannot be timed that way).
LATENCY_FACTS = ("latency_ratio", "latency_spread", "generation_ratio", "generation_spread",
                 "generation_ms_per_token", "base_ms_per_token")
#: Test tokens that prompt the timed generation (fewer when the window is shorter).
PROMPT_TOKENS = 64
