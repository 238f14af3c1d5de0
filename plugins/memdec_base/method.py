"""The unadapted base model."""

from __future__ import annotations

from memdec_core.evaluate import EvalContext, MethodResult, model_scorer
from memdec_core.interfaces import Method


class Base(Method):
    """The base model as it is: no adaptation, nothing to tune."""

    name = "base"

    def evaluate(self, ctx: EvalContext) -> MethodResult:
        scorer = model_scorer(ctx.base.model, ctx.settings.batch_size)
        test = scorer(ctx.corpus.streams["test"], ctx.windows("test"), f"test {ctx.base.short_name}")
        return MethodResult(test.perplexity, scorer=scorer)
