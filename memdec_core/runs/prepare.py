"""A run made ready: every name resolved and every setting checked before any work, then one
base × method measured as ``evaluate`` and ``compare`` both report it."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

from memdec_core.components import registry
from memdec_core.components.combiner_files import combiner_with_settings, resolve_combiner
from memdec_core.components.plan import Plan
from memdec_core.errors import ConfigError, ResultError
from memdec_core.inputs.data import Corpus, load_corpus
from memdec_core.inputs.models import resolve_model_location
from memdec_core.interfaces import Combiner, EvalContext, EvalSettings, Method, MethodResult
from memdec_core.runtime.timings import recording


@dataclass
class Run:
    """What a run of ``evaluate`` or ``compare`` is made of, resolved and checked before any work."""

    corpus: Corpus
    bases: list[str]
    methods: list[Method]
    combiner: type[Combiner]
    plan: Plan
    settings: EvalSettings


def prepare_run(domain: str, bases: Iterable[str], methods: Iterable[str], *, settings: EvalSettings | None = None,
                combiner: Any = "linear", component_settings: dict[str, dict[str, Any]] | None = None,
                domain_settings: dict[str, Any] | None = None) -> Run:
    """Resolve every name of a run and check every setting (``component_settings``: each component's,
    as ``--set NAME.KEY=VALUE`` gives them), then load the corpus."""
    plan = Plan(component_settings)
    names = list(methods)
    if not names:
        raise ConfigError("give at least one method")
    instances = [plan.create("methods", name) for name in names]
    combiner_class = combiner_with_settings(resolve_combiner(combiner), plan)
    used = [component for _, component in plan.resolve(instances)]
    plan.check_all_used(used, also=[combiner_class.name, domain])
    bases = list(bases) or registry.default_bases()
    for base_name in bases:  # a typo in the last base should not surface after an hour of work
        resolve_model_location(base_name)
    plan.bases = tuple(bases)
    corpus = load_corpus(domain, **_domain_settings(domain, plan, domain_settings))
    return Run(corpus, bases, instances, combiner_class, plan, settings or EvalSettings())


def _domain_settings(domain: str, plan: Plan, given: dict[str, Any] | None) -> dict[str, Any]:
    values = dict(given or {})
    if domain in plan.component_settings:
        values.update(registry.get("domains", domain).settings_from_text(plan.component_settings[domain]))
    return values


def methods_for_base(ctx: EvalContext, methods: list[Method]) -> list[Method]:
    """The run's methods for this base, each told the most parameters any method of the run plans
    to add (``Method.with_parameter_target``: LoRA's automatic rank matches the memory's size)."""
    if not any(type(method).with_parameter_target is not Method.with_parameter_target for method in methods):
        return methods  # nobody matches a size: do not load models to count parameters
    planned = [count for method in methods for count in [method.planned_parameters(ctx)] if count]
    if not planned:
        return methods
    return [method.with_parameter_target(max(planned)) for method in methods]


def evaluate_one(ctx: EvalContext, method: Method) -> dict:
    """``method`` on ``ctx``'s base, as ``evaluate`` reports it: perplexities and bits per byte,
    the knobs chosen on validation, costs, the memory's facts, the tuning grid, the wall time."""
    started = time.perf_counter()
    with recording() as timings:
        result = evaluate_timed(ctx, method)
    check_finite(result.test_ppl, f"{method.name} on {ctx.base.model_id}")
    return {"base": ctx.base.model_id, "method": method.name, "test_ppl": result.test_ppl,
            "valid_ppl": result.valid_ppl, **split_bits_per_byte(ctx, result),
            "knobs": result.knobs, "costs": dataclasses.asdict(result.costs),
            "seconds": round(time.perf_counter() - started, 2),
            "test_tokens": len(ctx.corpus.streams["test"]) - 1, "memory": result.memory, "tuning": result.tuning,
            "details": result.details, "timings": timings}


def evaluate_timed(ctx: EvalContext, method: Method) -> MethodResult:
    """``method.evaluate(ctx)``; what its own stages (datastore, train, tune, ...) do not claim
    is scoring, and counts as ``test``."""
    from memdec_core.runtime.timings import stage

    with stage("test"):
        return method.evaluate(ctx)


def split_bits_per_byte(ctx: EvalContext, result: MethodResult) -> dict:
    """``test_bpb`` and ``valid_bpb`` of a result: its perplexities in bits per byte of the text."""
    from memdec_core.engine.scoring import bits_per_byte  # torch: only once a number exists

    tokenizer, streams = ctx.base.tokenizer, ctx.corpus.streams
    return {"test_bpb": bits_per_byte(result.test_ppl, tokenizer, streams["test"]),
            "valid_bpb": bits_per_byte(result.valid_ppl, tokenizer, streams["valid"])}


def check_finite(value: float | None, what: str) -> None:
    """A perplexity that is NaN or infinite is a broken component, never a result."""
    if value is not None and not math.isfinite(value):
        raise ResultError(f"{what}: the test perplexity is {value} (a component returned NaN or −inf log-probs)")


def combiner_label(combiner_class: type[Combiner]) -> str:
    """How reports name a combiner: its registered name, or its class's for one from a file."""
    return combiner_class.name or combiner_class.__name__
