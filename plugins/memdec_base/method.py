"""The unadapted base model."""

from __future__ import annotations

from memdec_core.evaluate import EvalContext, MethodResult, perplexity
from memdec_core.interfaces import Method


class Base(Method):
    """The base model as it is: no adaptation, nothing to tune."""

    name = "base"

    def evaluate(self, ctx: EvalContext) -> MethodResult:
        test_ppl = perplexity(ctx.base.model, ctx.corpus.streams["test"], ctx.windows("test"),
                              batch_size=ctx.settings.batch_size, description=f"test {ctx.base.short_name}")
        return MethodResult(test_ppl)
