"""The mixture path: base + memory + combiner, every knob tuned on validation.

``MixtureMethod`` is the one method behind every memory: ``mixture`` takes the memory by name
(``--set mixture.memory=NAME``); a plugin's method with its memory fixed (``knn-lm``,
``memdec``) is this path too, and takes its memory's settings under its own name
(``--set knn-lm.k=64`` sets the ``knn-datastore`` memory it mixes). With the same memory and
knobs, both routes give the same numbers.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

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
    (``details["knobs_from"]``). ``memory`` is prepared already; its costs and facts go into the
    result, with the memory on its own: its test perplexity (same pass) and its fidelity to what
    it imitates.
    """
    # Here, not at the top: registration hooks import this module (a base class), and must not load torch.
    from memdec_core.engine.generation import mixture_generator
    from memdec_core.engine.loglikelihood import mixture_loglikelihood
    from memdec_core.engine.scoring import (
        MemoryAlone,
        call_component,
        check_memory_matches,
        format_knobs,
        knob_settings,
        score_stream,
        tune_on_validation,
    )
    from memdec_core.runtime.progress import log
    from memdec_core.runtime.timings import stage

    check_memory_matches(memory, ctx)
    edges: list[str] = []
    settings = knob_settings(ctx, memory)
    if len(settings) == 1:  # every knob given: a validation pass would choose among one setting
        valid, best = None, 0
        knobs = {**settings[0][0], **ctx.combiner(settings[0][1]).knobs()}
        log(f"{ctx.base.model_id}: knobs given, not tuned: {format_knobs(knobs) or 'none'}")
    else:
        settings, valid, best = tune_on_validation(ctx, memory, edges)
        knobs = {**settings[best][0], **ctx.combiner(settings[best][1]).knobs()}
        log(f"{ctx.base.model_id}: best on validation {format_knobs(knobs)} (ppl {valid[best].perplexity:.3f})")
    memory_knobs, combiner_config = settings[best]
    alone = MemoryAlone()
    with stage("test"):
        test = score_stream(ctx, memory, ctx.corpus.streams["test"], ctx.windows("test"), [settings[best]], "test",
                             f"test {ctx.base.short_name}", alone)[0]
    grid_report = [] if valid is None else [{**mem, **ctx.combiner(comb).knobs(), "valid_ppl": valid[i].perplexity}
                                            for i, (mem, comb) in enumerate(settings)]

    def scorer(stream, windows, description):
        return score_stream(ctx, memory, stream, windows, [settings[best]], "other", description)[0]

    details = {"memory": memory.name, **memory.describe_prepared(), "test_tokens": test.count,
               "knobs_from": "given" if valid is None else "validation"}
    if edges:
        details["grid_edges"] = edges
    generator = mixture_generator(ctx.base, memory, memory_knobs, ctx.combiner(combiner_config))
    with stage("fidelity"):
        fidelity = call_component(memory, "memory", memory.fidelity, ctx, memory_knobs)
    return MethodResult(test.perplexity, None if valid is None else valid[best].perplexity, knobs,
                        costs=memory.costs(), tuning=grid_report, details=details, scorer=scorer, generator=generator,
                        loglikelihood=mixture_loglikelihood(ctx, memory, memory_knobs, combiner_config),
                        memory={**alone.facts(), **fidelity})
