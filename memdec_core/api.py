"""The Python API behind every CLI command: what a notebook user calls.

    from memdec_core import api
    report = api.evaluate("finance", bases=["memdec-demo-s"], methods=["base", "knn-lm"])
    table = api.compare("finance")          # every base × method, with forgetting, cost and latency
    text = api.generate("memdec-demo-m", "The central bank", memory="knn-datastore", domain="finance",
                        component_settings={"knn-datastore": {"temperatures": (10.0,)}})

Two words, one meaning each, everywhere: ``settings`` are the windows (an ``EvalSettings``:
context, stride, batch size, token caps); ``component_settings`` maps any component's name — a
method, a memory model, a retriever, the combiner, the domain — to settings of its Config, as
``--set NAME.KEY=VALUE`` does on the command line (``method_settings=`` is its former name).

This module is a facade: each function lives in the layer that does the work (``runs`` for
whole runs, ``inputs`` for contexts, ``engine`` for the composite model; docs/architecture.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memdec_core.components.registry import default_bases, default_methods
from memdec_core.inputs.context import prepare_context
from memdec_core.runs.compare import compare
from memdec_core.runs.evaluate import evaluate
from memdec_core.runs.generate import generate
from memdec_core.runs.prepare import methods_for_base, prepare_run, with_memory

if TYPE_CHECKING:
    from memdec_core.engine.composite import MemdecForCausalLM


def composite_model(base, memory, **options) -> "MemdecForCausalLM":
    """Base + memory + combiner as one ``transformers`` causal LM, ready for ``generate()``,
    ``pipeline("text-generation")`` or lm-evaluation-harness; its arguments are
    ``memdec_core.engine.composite.composite_model``'s (imported here, with torch, on first use)."""
    from memdec_core.engine.composite import composite_model as build

    return build(base, memory, **options)


__all__ = ["evaluate", "compare", "generate", "composite_model", "prepare_context", "prepare_run", "default_bases",
           "default_methods", "methods_for_base", "with_memory"]
