"""``generate``: continue prompts with a base, alone or mixed with any memory, at fixed knobs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from memdec_core.inputs.context import memory_context
from memdec_core.interfaces import EvalSettings

if TYPE_CHECKING:
    from memdec_core.inputs.models import LoadedModel
    from memdec_core.interfaces import MemoryModel


def generate(base: "str | LoadedModel", prompt: "str | list[str]", *, memory: "str | MemoryModel | None" = None,
             domain: str | None = None, combiner: Any = "linear",
             component_settings: dict[str, dict[str, Any]] | None = None, settings: EvalSettings | None = None,
             streamer_factory=None, **generation) -> "str | list[str]":
    """Continue ``prompt`` with ``base`` mixed with ``memory`` (a memory model name or folder, a
    MemoryModel object; None: the base alone) through ``combiner``. ``domain`` is needed by
    memories built for one (a kNN datastore from the cache, a memory trained on first use).

    ``base`` may be a loaded model (``memdec_core.inputs.models.load_model``) to keep it between
    calls, and ``prompt`` a list of prompts, generated as one left-padded batch. Returns the new
    text (or a list: one text per prompt, ``num_return_sequences`` texts per prompt in order).

    Knobs are fixed, not tuned: the combiner's single grid point when fixed
    (``component_settings={"linear": {"lam": 0.3}}``), else its defaults; the memory's grid must be one
    setting (``{"knn-datastore": {"temperatures": (10.0,)}}``). ``settings`` are the windows a
    memory built on first use is built with.
    """
    from memdec_core.engine.generation import generate_texts, generation_settings  # torch: only when used

    generation_settings(**generation)  # bad settings fail before anything is loaded
    ctx, memory_component = memory_context(base, memory, domain, combiner, component_settings, settings)
    texts = generate_texts(ctx, memory_component, [prompt] if isinstance(prompt, str) else list(prompt),
                           streamer_factory=streamer_factory, **generation)
    return texts[0] if isinstance(prompt, str) and len(texts) == 1 else texts
