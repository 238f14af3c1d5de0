"""The EvalContext a method is given: a base model loaded, the corpus tokenised for it, the
window, the combiner and the run's plan; and the memory a context mixes, opened by name or folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from memdec_core.components import registry
from memdec_core.components.combiner_files import combiner_with_settings, resolve_combiner
from memdec_core.components.plan import Plan
from memdec_core.errors import ConfigError
from memdec_core.inputs.data import Corpus, TokenizerRef, load_corpus, tokenize_corpus
from memdec_core.inputs.models import LoadedModel, load_model
from memdec_core.interfaces import Component, EvalContext, EvalSettings, MemoryModel
from memdec_core.runtime.progress import log
from memdec_core.store.artifacts import MANIFEST, read_manifest_type

if TYPE_CHECKING:
    from memdec_core.interfaces import Combiner


def prepare_context(corpus, base_name: "str | LoadedModel", settings: EvalSettings | None = None,
                    combiner: Any = "linear", *, plan: Plan | None = None, lazy: bool = False) -> EvalContext:
    """Load ``base_name`` (or take a LoadedModel as it is) and tokenise ``corpus`` (a Corpus,
    domain name, folder or None) for it. ``lazy``: the base's weights are read on the first use
    of ``ctx.base.model`` (``load_model``), for a run that may find all it needs built."""
    settings = settings or EvalSettings()
    if corpus is not None and not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus)
    if isinstance(base_name, LoadedModel):
        base = base_name
    else:
        log(f"loading {base_name}")
        base = load_model(base_name, lazy=lazy)
    context, stride = settings.resolve_window(base)
    tokenized = None if corpus is None else tokenize_corpus(
        corpus, tokenizer_ref(base), base.tokenizer_fingerprint, context=context, max_tokens=settings.max_tokens())
    return EvalContext(base, tokenized, context, stride, settings, resolve_combiner(combiner), plan or Plan())


def tokenizer_ref(base: LoadedModel) -> TokenizerRef:
    """``base``'s tokenizer as a TokenizerRef: named by its remembered key, loaded only if used."""
    if base.tokenization_key is None:
        return TokenizerRef.of(base.tokenizer)
    return TokenizerRef(base.tokenization_key, lambda: base.tokenizer)


def memory_context(base: "str | LoadedModel", memory: "str | MemoryModel | None", domain: str | None,
                   combiner: Any, component_settings: dict[str, dict[str, Any]] | None,
                   settings: EvalSettings | None, *, fitted: bool = False) -> "tuple[EvalContext, MemoryModel | None]":
    """The context for mixing ``base`` with ``memory`` at fixed knobs (generation, a composite), and
    the memory component, not yet prepared. Every name and setting is checked first; a combiner
    that learns needs ``domain`` to fit on, unless its fitted state is given (``fitted``)."""
    if isinstance(settings, dict):  # what generate() and composite_model() called settings= before
        raise ConfigError("settings= are the windows (an EvalSettings); per-component settings are "
                          "component_settings={'NAME': {'KEY': value}}")
    plan = Plan(component_settings)
    memory_component = memory if isinstance(memory, MemoryModel) else open_memory(memory, plan) if memory else None
    combiner_class: type[Combiner] = combiner_with_settings(resolve_combiner(combiner), plan)
    used: list[Component] = [component for _, component in plan.resolve([memory_component])] \
        if memory_component is not None and not isinstance(memory, MemoryModel) else []
    plan.check_all_used(used, also=[combiner_class.name] + ([domain] if domain else []))
    if combiner_class.learns and memory_component is not None and not fitted and domain is None:
        raise ConfigError(f"combiner {combiner_class.name!r} learns its weights on a domain's validation split; "
                          f"give the domain to fit it on (--domain DOMAIN)")
    return prepare_context(domain, base, settings, combiner_class, plan=plan), memory_component


def open_memory(spec: str, plan: Plan) -> MemoryModel:
    """A memory model by name, or the one that opens a folder (its ``memdec.json`` type)."""
    name, values = memory_opener(spec)
    return plan.create("memory-models", name, **values)


def memory_opener(spec: str) -> tuple[str, dict[str, str]]:
    """``(memory model, its settings)`` that a memory name or folder stands for: ``("knn-datastore", {})``
    for a name, ``("memory-decoder", {"path": "/abs/folder"})`` for a folder (by its ``memdec.json``
    type; a plain transformers folder opens with a memory that ``opens_plain_models``)."""
    folder = Path(spec).expanduser()
    memories = registry.components("memory-models")
    if spec in memories:
        return spec, {}
    if not (folder.is_dir() or "/" in spec):
        registry.get("memory-models", spec)  # an unknown name: the error names the closest ones
    if not folder.is_dir():
        raise ConfigError(f"memory folder not found: {folder}")
    if not (folder / MANIFEST).is_file() and (folder / "config.json").is_file():
        openers = [(name, cls) for name, cls in memories.items() if cls.opens_plain_models and cls.artifact_setting]
        if openers:
            name, cls = openers[0]
            return name, {cls.artifact_setting: str(folder.resolve())}
    artifact_type = read_manifest_type(folder)
    for name, cls in memories.items():
        if cls.artifact_type == artifact_type and cls.artifact_setting:
            return name, {cls.artifact_setting: str(folder.resolve())}
    raise ConfigError(f"{folder} holds a {artifact_type!r} artifact, which no memory model opens")
