"""The mixture path: base + memory + combiner, every knob tuned on validation.

``MixtureMethod`` is the one method behind every memory: ``mixture`` takes the memory by name
(``--set mixture.memory=NAME``); a plugin's method with its memory fixed (``knn-lm``,
``memdec``) is this path too, and takes its memory's settings under its own name
(``--set knn-lm.k=64`` sets the ``knn-datastore`` memory it mixes). With the same memory and
knobs, both routes give the same numbers.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

from memdec_core.errors import ConfigError
from memdec_core.interfaces import Method, MethodResult, Use, setting

if TYPE_CHECKING:
    from memdec_core.interfaces import EvalContext, MemoryModel

MEMORY_KIND = "memory-models"


class MixtureMethod(Method):
    """Mix a registered memory with the base through the combiner; memory and combiner knobs tuned."""

    #: The memory of a method that fixes it (its Config is then that memory's Config).
    memory: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.memory:
            cls.shares_settings_with = (cls.memory,)

    def memory_name(self) -> str:
        if self.memory:
            return self.memory
        name = self.config.memory
        if not name:
            from memdec_core.components import registry

            raise ConfigError(f"{self.name} needs a memory: --set {self.name}.memory=NAME "
                              f"(memory models: {', '.join(registry.names(MEMORY_KIND)) or 'none installed'})")
        return name

    def uses(self) -> list[Use]:
        shared = self.config if self.memory else None  # a fixed memory takes this method's settings
        return [Use(MEMORY_KIND, self.memory_name(), f"{self.name}.memory" if not self.memory else self.name,
                    config=shared)]

    def create_memory(self, ctx: "EvalContext") -> "MemoryModel":
        use = self.uses()[0]
        return ctx.create(MEMORY_KIND, use.name, config=use.config)

    def evaluate(self, ctx: "EvalContext") -> MethodResult:
        memory = self.create_memory(ctx)
        memory.prepare(ctx)
        return evaluate_mixture(ctx, memory)

    def planned_parameters(self, ctx: "EvalContext") -> int | None:
        return self.create_memory(ctx).planned_parameters(ctx)


@dataclasses.dataclass
class MixtureConfig:
    memory: str = setting("", "the memory model to mix (memdec list memory-models); its settings: --set NAME.KEY=...")


class Mixture(MixtureMethod):
    """Any registered memory model mixed with the base by the combiner; knobs tuned on validation."""

    name = "mixture"
    Config = MixtureConfig


def evaluate_mixture(ctx: "EvalContext", memory: "MemoryModel") -> MethodResult:
    """Tune memory × combiner knobs on validation in one pass, then score test with the best.

    With every knob given (one setting: ``--lam`` and one temperature, say) nothing is left to
    tune: validation is not scored, and the result says the knobs were given
    (``details["knobs_from"]``). A combiner that learns (``Combiner.learns``) is fitted on
    validation instead, once per memory setting (``engine.learning``). ``memory`` is prepared
    already; its costs and facts go into the result, with the memory on its own: its test
    perplexity (same pass) and its fidelity to what it imitates.
    """
    # Here, not at the top: registration hooks import this module (a base class), and must not load torch.
    from memdec_core.engine.scoring import (
        GateStats,
        MemoryAlone,
        WeightStats,
        call_component,
        check_memory_matches,
        score_stream,
    )
    from memdec_core.runtime.timings import stage

    check_memory_matches(memory, ctx)
    chosen = _learn(ctx, memory) if ctx.combiner.learns else _tune(ctx, memory)
    setting, combiner = chosen.setting, chosen.combiner
    alone, weights, gate = MemoryAlone(), WeightStats(), GateStats()
    with stage("test"):
        test = score_stream(ctx, memory, ctx.corpus.streams["test"], ctx.windows("test"), [setting], "test",
                            f"test {ctx.base.short_name}", alone, combiners=[combiner], weights=weights, gate=gate)[0]

    def scorer(stream, windows, description):
        return score_stream(ctx, memory, stream, windows, [setting], "other", description, combiners=[combiner])[0]

    details = {"memory": memory.name, **memory.describe_prepared(), "test_tokens": test.count,
               "knobs_from": chosen.knobs_from, **chosen.details}
    weight_facts = weights.facts()
    if weight_facts:
        details["weights"] = weight_facts
    gate_fit = chosen.details.get("fit", {}).get("gate")
    if gate_fit:  # adaptive retrieval: what the gate skipped on test, beside what it chose on validation
        details["gate"] = {**gate_fit, "test_skipped_share": gate.facts()["skipped_share"]}
    with stage("fidelity"):
        fidelity = call_component(memory, "memory", memory.fidelity, ctx, setting[0])
    return MethodResult(test.perplexity, chosen.valid_ppl, chosen.knobs, costs=chosen.costs(memory),
                        tuning=chosen.tuning, details=details, scorer=scorer,
                        generator=_generator(ctx, memory, setting[0], combiner),
                        loglikelihood=_loglikelihood(ctx, memory, setting, combiner),
                        memory={**alone.facts(), **fidelity})


@dataclasses.dataclass
class Chosen:
    """The setting a mixture scores test with, and how it was chosen."""

    setting: tuple  # (memory knobs, combiner config)
    combiner: Any  # the Combiner that scores (a fitted one, for a combiner that learns)
    knobs: dict
    knobs_from: str  # "given", "validation" or "fit"
    valid_ppl: float | None = None
    tuning: list = dataclasses.field(default_factory=list)
    details: dict = dataclasses.field(default_factory=dict)
    fit_seconds: float = 0.0
    fit_flops: float = 0.0

    def costs(self, memory: "MemoryModel"):
        costs = memory.costs()
        return dataclasses.replace(costs, train_seconds=costs.train_seconds + self.fit_seconds,
                                   train_flops=costs.train_flops + self.fit_flops)


def _tune(ctx: "EvalContext", memory: "MemoryModel") -> Chosen:
    """Every knob given: that setting. Else the grid scored on validation, the best chosen."""
    from memdec_core.engine.scoring import format_knobs, knob_settings, tune_on_validation
    from memdec_core.runtime.progress import log

    settings = knob_settings(ctx, memory)
    if len(settings) == 1:  # every knob given: a validation pass would choose among one setting
        combiner = ctx.combiner(settings[0][1])
        knobs = {**settings[0][0], **combiner.knobs()}
        log(f"{ctx.base.model_id}: knobs given, not tuned: {format_knobs(knobs) or 'none'}")
        return Chosen(settings[0], combiner, knobs, "given")
    edges: list[str] = []
    settings, valid, best = tune_on_validation(ctx, memory, edges)
    combiner = ctx.combiner(settings[best][1])
    knobs = {**settings[best][0], **combiner.knobs()}
    log(f"{ctx.base.model_id}: best on validation {format_knobs(knobs)} (ppl {valid[best].perplexity:.3f})")
    tuning = [{**mem, **ctx.combiner(comb).knobs(), "valid_ppl": valid[i].perplexity}
              for i, (mem, comb) in enumerate(settings)]
    return Chosen(settings[best], combiner, knobs, "validation", valid[best].perplexity, tuning,
                  {"grid_edges": edges} if edges else {})


def _learn(ctx: "EvalContext", memory: "MemoryModel") -> Chosen:
    """A combiner that learns, fitted on validation for every memory setting; the setting whose fit
    does best on its held-out positions scores test."""
    import math

    from memdec_core.engine.learning import fit_combiners
    from memdec_core.engine.scoring import format_knobs, knob_settings
    from memdec_core.runtime.progress import log
    from memdec_core.runtime.timings import stage

    settings = knob_settings(ctx, memory)
    with stage("fit"):
        fitted = fit_combiners(ctx, memory, settings)
    best, combiner = fitted.best, fitted.combiners[fitted.best]
    knobs = {**settings[best][0], **combiner.knobs()}
    facts = fitted.facts[best]
    heldout_ppl = math.exp(facts["heldout_nll"])
    log(f"{ctx.base.model_id}: {ctx.combiner.name} fitted{' (cached)' if fitted.cached else ''}, best "
        f"{format_knobs(settings[best][0]) or 'the memory as it is'} (held-out validation ppl {heldout_ppl:.3f})")
    tuning = [{**mem, **fitted.combiners[i].knobs(), "valid_ppl": _ppl(fitted.facts[i]["heldout_nll"])}
              for i, (mem, _) in enumerate(settings)]
    return Chosen(settings[best], combiner, knobs, "fit", heldout_ppl, tuning,
                  {"fit": {**facts, "cached": fitted.cached}},
                  fit_seconds=fitted.seconds, fit_flops=float(facts.get("flops") or 0.0))


def _ppl(nll: float | None) -> float | None:
    """The perplexity of a held-out NLL; None for a setting that was not fitted."""
    import math

    return None if nll is None else math.exp(nll)


def _generator(ctx: "EvalContext", memory: "MemoryModel", memory_knobs: dict, combiner):
    """The mixture's generator, its composite built on the first call (as ``_loglikelihood``'s):
    a run that only scores pays nothing for it, and never loads the base's tokenizer."""
    from memdec_core.engine.generation import mixture_generator

    built: list = []

    def generate(prompt_ids, new_tokens: int):
        if not built:
            built.append(mixture_generator(ctx.base, memory, memory_knobs, combiner))
        return built[0](prompt_ids, new_tokens)

    return generate


def _loglikelihood(ctx: "EvalContext", memory: "MemoryModel", setting: tuple, combiner):
    from memdec_core.engine.loglikelihood import mixture_loglikelihood

    return mixture_loglikelihood(ctx, memory, setting[0], setting[1], fitted=combiner if combiner.learns else None)
