"""The Python API behind every CLI command: what a notebook user calls.

    from memdec_core import api
    report = api.evaluate("finance", bases=["memdec-demo-s"], methods=["base", "knn-lm"])
    table = api.compare("finance")          # every base × method, with forgetting, cost and latency
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable

from memdec_core import registry
from memdec_core.combiner_files import resolve_combiner
from memdec_core.errors import ConfigError
from memdec_core.progress import log


def evaluate(domain: str, bases: Iterable[str] = (), methods: Iterable[str] = ("base",), *,
             settings=None, combiner: Any = "linear",
             method_settings: dict[str, dict[str, Any]] | None = None,
             domain_settings: dict[str, Any] | None = None) -> dict:
    """Test perplexity of every base × method on ``domain``, knobs tuned on validation.

    ``method_settings`` maps a method name to overrides of its Config, e.g.
    ``{"knn-lm": {"k": 256}}``; ``domain_settings`` configures a registered domain, e.g.
    ``{"source": "hub"}``. Returns ``{"domain", "results": [...], "settings"}``.
    """
    from memdec_core.data import load_corpus
    from memdec_core.evaluate import EvalSettings
    from memdec_core.models import resolve_model_location

    settings = settings or EvalSettings()
    bases, methods = list(bases) or default_bases(), _method_instances(methods, method_settings or {})
    combiner_class = resolve_combiner(combiner)
    for base_name in bases:  # a typo in the last base should not surface after an hour of work
        resolve_model_location(base_name)
    corpus = load_corpus(domain, **(domain_settings or {}))
    results = []
    for base_name in bases:
        results.extend(_evaluate_base(base_name, corpus, methods, settings, combiner_class))
    return {"domain": corpus.name, "results": results,
            "settings": dataclasses.asdict(settings), "combiner": combiner_class.name or combiner_class.__name__}


def default_bases() -> list[str]:
    """The registered models marked as defaults (the offline demo family), in registration order."""
    defaults = [name for name, cls in registry.components("models").items() if cls.default]
    if not defaults:
        raise ConfigError("no base model given and no default models are installed; pass --base MODEL")
    return defaults


def _method_instances(names: Iterable[str], overrides: dict[str, dict[str, Any]]) -> list:
    names = list(names)
    if not names:
        raise ConfigError("give at least one method")
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ConfigError(f"settings given for method(s) not being run: {', '.join(unknown)}")
    return [registry.get("methods", name)(**overrides.get(name, {})) for name in names]


def prepare_context(corpus, base_name: str, settings=None, combiner: Any = "linear"):
    """Load ``base_name`` and tokenise ``corpus`` (a Corpus, domain name or folder) for it."""
    from memdec_core.data import Corpus, load_corpus, tokenize_corpus
    from memdec_core.evaluate import EvalContext, EvalSettings
    from memdec_core.models import load_model

    settings = settings or EvalSettings()
    corpus = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    log(f"loading {base_name}")
    base = load_model(base_name)
    context, stride = settings.resolve_window(base)
    tokenized = tokenize_corpus(corpus, base.tokenizer, base.tokenizer_fingerprint,
                                context=context, max_tokens=settings.max_tokens())
    return EvalContext(base, tokenized, context, stride, settings, resolve_combiner(combiner))


def _evaluate_base(base_name: str, corpus, methods: list, settings, combiner_class) -> list[dict]:
    ctx = prepare_context(corpus, base_name, settings, combiner_class)
    rows = []
    for method in methods:
        started = time.perf_counter()
        result = method.evaluate(ctx)
        rows.append({"base": base_name, "method": method.name, "test_ppl": result.test_ppl,
                     "valid_ppl": result.valid_ppl, "knobs": result.knobs,
                     "seconds": round(time.perf_counter() - started, 2),
                     "test_tokens": len(ctx.corpus.streams["test"]) - 1, "details": result.details})
    return rows


def compare(domain: str, bases: Iterable[str] = (), methods: Iterable[str] = (), **options) -> dict:
    """Every base × method on ``domain``: see ``memdec_core.compare.compare``."""
    from memdec_core.compare import compare as run_compare

    return run_compare(domain, bases, methods, **options)
