"""``evaluate``: the test perplexity of every base × method on a domain, knobs tuned on validation."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from memdec_core.interfaces import EvalSettings
from memdec_core.runs.meta import call_config, combiner_name, context_entry, run_meta
from memdec_core.runs.prepare import evaluate_one, method_rows, methods_for_base, named_row, prepare_run, with_combiner
from memdec_core.runtime.renames import renamed_keywords
from memdec_core.runtime.timings import recording


@renamed_keywords(method_settings="component_settings")
def evaluate(domain: str, bases: Iterable[str] = (), methods: Iterable[str] = ("base",), *,
             settings: EvalSettings | None = None, combiner: Any = "linear",
             component_settings: dict[str, dict[str, Any]] | None = None,
             domain_settings: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
             command: list[str] | None = None) -> dict:
    """Test perplexity of every base × method on ``domain``, knobs tuned on validation.

    ``settings`` are the windows (EvalSettings); ``component_settings`` maps a component's name to
    settings of its Config, as ``--set NAME.KEY=VALUE`` does, e.g. ``{"knn-lm": {"k": 256}, "faiss":
    {"nprobe": 64}}``; ``domain_settings`` configures a registered domain, e.g. ``{"source": "hub"}``.
    ``combiner`` is one combiner or a list of them (``["linear", "adaptive"]``): every method that
    mixes a memory then gets a row per combiner, the first named as the method, the others
    ``method+combiner``.
    Returns ``{"domain", "results": [...], "settings", "combiner", "meta"}`` (docs/reports.md).
    ``config`` and ``command`` are the CLI's resolved options and command line for ``meta``; from
    Python, ``meta["config"]`` holds the arguments of this call.
    """
    with recording() as timings:
        run = prepare_run(domain, bases, methods, settings=settings, combiner=combiner,
                          component_settings=component_settings, domain_settings=domain_settings,
                          head_to_head=True)
        names = [method.name for method in run.methods]
        results, contexts = [], {}
        for base_name in run.bases:
            ctx = run.context(base_name)
            contexts[ctx.base.model_id] = context_entry(ctx)  # the window each base was actually scored with
            for method in methods_for_base(ctx, run.methods):
                for name, row_combiner in method_rows(run, method):
                    row = evaluate_one(with_combiner(ctx, row_combiner), method)
                    results.append(named_row(row, name, row_combiner))
    if config is None:
        given = {**(component_settings or {}), **({domain: domain_settings} if domain_settings else {})}
        config = call_config(domain=domain, bases=run.bases, methods=names, combiner=run.combiners,
                             settings=run.settings, component_settings=given)
    meta = run_meta(settings=run.settings, bases=run.bases, methods=names, combiner=run.combiners,
                    contexts=contexts, config=config, command=command,
                    extra={"token_caps": run.caps_facts(), "timings": timings})
    return {"domain": run.corpus.name, "results": results,
            "settings": dataclasses.asdict(run.settings), "combiner": combiner_name(run.combiners), "meta": meta}
