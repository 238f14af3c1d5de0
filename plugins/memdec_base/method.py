"""The unadapted base model."""

from __future__ import annotations

from memdec_core.interfaces import EvalContext, Method, MethodResult


class Base(Method):
    """The base model as it is: no adaptation, nothing to tune."""

    name = "base"
    compare_rank = 0
    unadapted = True

    def evaluate(self, ctx: EvalContext) -> MethodResult:
        from memdec_core.engine.generation import model_generator
        from memdec_core.engine.loglikelihood import base_loglikelihood
        from memdec_core.engine.scoring import model_scorer

        scorer = model_scorer(ctx.base.model, ctx.settings.batch_size)
        test = scorer(ctx.corpus.streams["test"], ctx.windows("test"), f"test {ctx.base.short_name}")
        return MethodResult(test.perplexity, scorer=scorer,
                            generator=model_generator(ctx.base.model, ctx.base.tokenizer),
                            loglikelihood=base_loglikelihood(ctx.base, ctx.settings.batch_size))
