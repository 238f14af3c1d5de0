"""The Python API behind every CLI command: what a notebook user calls.

    from memdec_core import api
    report = api.evaluate("finance", bases=["memdec-demo-s"], methods=["base", "knn-lm"])
    table = api.compare("finance")          # every base × method, with forgetting, cost and latency
    text = api.generate("memdec-demo-m", "The central bank", memory="knn-datastore", domain="finance",
                        settings={"knn-datastore": {"temperatures": (10.0,)}})

``settings`` (``method_settings`` in ``evaluate`` and ``compare``) maps any component's name — a
method, a memory model, a retriever, the combiner, the domain — to overrides of its Config, as
``--set NAME.KEY=VALUE`` does on the command line.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

from memdec_core.components import registry
from memdec_core.components.combiner_files import resolve_combiner, with_fixed_knobs
from memdec_core.components.plan import Plan
from memdec_core.errors import ConfigError
from memdec_core.interfaces import Combiner, Component, EvalContext, EvalSettings, Method
from memdec_core.runtime.progress import log

if TYPE_CHECKING:
    from memdec_core.inputs.models import LoadedModel
    from memdec_core.interfaces import MemoryModel


@dataclass
class Run:
    """What a run of ``evaluate`` or ``compare`` is made of, resolved and checked before any work."""

    corpus: Any  # memdec_core.inputs.data.Corpus
    bases: list[str]
    methods: list[Method]
    combiner: type[Combiner]
    plan: Plan
    settings: EvalSettings


def evaluate(domain: str, bases: Iterable[str] = (), methods: Iterable[str] = ("base",), *,
             settings: EvalSettings | None = None, combiner: Any = "linear",
             method_settings: dict[str, dict[str, Any]] | None = None,
             domain_settings: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
             command: list[str] | None = None) -> dict:
    """Test perplexity of every base × method on ``domain``, knobs tuned on validation.

    ``method_settings`` maps a component name to overrides of its Config, e.g.
    ``{"knn-lm": {"k": 256}, "faiss": {"nprobe": 64}}``; ``domain_settings`` configures a
    registered domain, e.g. ``{"source": "hub"}``. Returns ``{"domain", "results": [...],
    "settings", "combiner", "meta"}`` (docs/reports.md). ``config`` and ``command`` are the CLI's
    resolved options and command line for ``meta``; from Python, ``meta["config"]`` holds the
    arguments of this call.
    """
    from memdec_core.runs.meta import call_config, context_entry, run_meta

    run = prepare_run(domain, bases, methods, settings=settings, combiner=combiner,
                      component_settings=method_settings, domain_settings=domain_settings)
    names = [method.name for method in run.methods]
    results, contexts = [], {}
    for base_name in run.bases:
        ctx = prepare_context(run.corpus, base_name, run.settings, run.combiner, plan=run.plan)
        contexts[ctx.base.model_id] = context_entry(ctx)  # the window each base was actually scored with
        for method in methods_for_base(ctx, run.methods):
            results.append(_evaluate_one(ctx, method))
    if config is None:
        given = {**(method_settings or {}), **({domain: domain_settings} if domain_settings else {})}
        config = call_config(domain=domain, bases=run.bases, methods=names, combiner=run.combiner,
                             settings=run.settings, component_settings=given)
    meta = run_meta(settings=run.settings, bases=run.bases, methods=names, combiner=run.combiner,
                    contexts=contexts, config=config, command=command)
    return {"domain": run.corpus.name, "results": results,
            "settings": dataclasses.asdict(run.settings), "combiner": combiner_label(run.combiner), "meta": meta}


def prepare_run(domain: str, bases: Iterable[str], methods: Iterable[str], *, settings=None,
                combiner: Any = "linear", component_settings=None, domain_settings=None) -> Run:
    """Resolve every name of a run and check every setting, then load the corpus."""
    from memdec_core.inputs.data import load_corpus
    from memdec_core.inputs.models import resolve_model_location

    plan = Plan(component_settings)
    names = list(methods)
    if not names:
        raise ConfigError("give at least one method")
    instances = [plan.create("methods", name) for name in names]
    combiner_class = combiner_with_settings(resolve_combiner(combiner), plan)
    used = [component for _, component in plan.resolve(instances)]
    plan.check_all_used(used, also=[combiner_class.name, domain])
    bases = list(bases) or default_bases()
    for base_name in bases:  # a typo in the last base should not surface after an hour of work
        resolve_model_location(base_name)
    plan.bases = tuple(bases)
    corpus = load_corpus(domain, **_domain_settings(domain, plan, domain_settings))
    return Run(corpus, bases, instances, combiner_class, plan, settings or EvalSettings())


def default_bases() -> list[str]:
    """The registered models marked as defaults (the offline demo family), in registration order."""
    defaults = [name for name, cls in registry.components("models").items() if cls.default]
    if not defaults:
        raise ConfigError("no base model given and no default models are installed; pass --base MODEL")
    return defaults


def default_methods() -> list[str]:
    """The methods that declare a place in the default comparison, in that order."""
    ranked = [(cls.compare_rank, name) for name, cls in registry.components("methods").items()
              if cls.compare_rank is not None]
    return [name for _, name in sorted(ranked)]


def combiner_with_settings(combiner_class: type[Combiner], plan: Plan) -> type[Combiner]:
    """``--set NAME.KNOB=VALUE`` for the combiner fixes that knob; the others are still tuned."""
    values = plan.settings.get(combiner_class.name or "", {})
    return with_fixed_knobs(combiner_class, combiner_class.settings_from_text(values)) if values else combiner_class


def combiner_label(combiner_class: type[Combiner]) -> str:
    return combiner_class.name or combiner_class.__name__


def _domain_settings(domain: str, plan: Plan, given: dict[str, Any] | None) -> dict[str, Any]:
    values = dict(given or {})
    if domain in plan.settings:
        values.update(registry.get("domains", domain).settings_from_text(plan.settings[domain]))
    return values


def prepare_context(corpus, base_name: "str | LoadedModel", settings=None, combiner: Any = "linear", *,
                    plan: Plan | None = None) -> EvalContext:
    """Load ``base_name`` (or take a LoadedModel as it is) and tokenise ``corpus`` (a Corpus,
    domain name, folder or None) for it."""
    from memdec_core.inputs.data import Corpus, load_corpus, tokenize_corpus
    from memdec_core.inputs.models import LoadedModel, load_model

    settings = settings or EvalSettings()
    if corpus is not None and not isinstance(corpus, Corpus):
        corpus = load_corpus(corpus)
    if isinstance(base_name, LoadedModel):
        base = base_name
    else:
        log(f"loading {base_name}")
        base = load_model(base_name)
    context, stride = settings.resolve_window(base)
    tokenized = None if corpus is None else tokenize_corpus(
        corpus, base.tokenizer, base.tokenizer_fingerprint, context=context, max_tokens=settings.max_tokens())
    return EvalContext(base, tokenized, context, stride, settings, resolve_combiner(combiner), plan or Plan())


def methods_for_base(ctx: EvalContext, methods: list[Method]) -> list[Method]:
    """The run's methods for this base, each told the most parameters any method of the run plans
    to add (``Method.with_parameter_target``: LoRA's automatic rank matches the memory's size)."""
    if not any(type(method).with_parameter_target is not Method.with_parameter_target for method in methods):
        return methods  # nobody matches a size: do not load models to count parameters
    planned = [count for method in methods for count in [method.planned_parameters(ctx)] if count]
    if not planned:
        return methods
    return [method.with_parameter_target(max(planned)) for method in methods]


def _evaluate_one(ctx: EvalContext, method: Method) -> dict:
    started = time.perf_counter()
    result = method.evaluate(ctx)
    check_finite(result.test_ppl, f"{method.name} on {ctx.base.model_id}")
    return {"base": ctx.base.model_id, "method": method.name, "test_ppl": result.test_ppl,
            "valid_ppl": result.valid_ppl, **split_bits_per_byte(ctx, result),
            "knobs": result.knobs, "costs": dataclasses.asdict(result.costs),
            "seconds": round(time.perf_counter() - started, 2),
            "test_tokens": len(ctx.corpus.streams["test"]) - 1, "memory": result.memory, "tuning": result.tuning,
            "details": result.details}


def split_bits_per_byte(ctx: EvalContext, result) -> dict:
    """``test_bpb`` and ``valid_bpb`` of a result: its perplexities in bits per byte of the text."""
    from memdec_core.engine.scoring import bits_per_byte

    tokenizer, streams = ctx.base.tokenizer, ctx.corpus.streams
    return {"test_bpb": bits_per_byte(result.test_ppl, tokenizer, streams["test"]),
            "valid_bpb": bits_per_byte(result.valid_ppl, tokenizer, streams["valid"])}


def check_finite(value: float | None, what: str) -> None:
    """A perplexity that is NaN or infinite is a broken component, never a result."""
    import math

    if value is not None and not math.isfinite(value):
        raise ConfigError(f"{what}: the test perplexity is {value} (a component returned NaN or −inf log-probs)")


def compare(domain: str, bases: Iterable[str] = (), methods: Iterable[str] = (), **options) -> dict:
    """Every base × method on ``domain``: see ``memdec_core.runs.compare.compare``."""
    from memdec_core.runs.compare import compare as run_compare

    return run_compare(domain, bases, methods, **options)


def generate(base: "str | LoadedModel", prompt: "str | list[str]", *, memory: "str | MemoryModel | None" = None,
             domain: str | None = None, combiner: Any = "linear", settings: dict[str, dict[str, Any]] | None = None,
             eval_settings: EvalSettings | None = None, streamer_factory=None, **generation) -> "str | list[str]":
    """Continue ``prompt`` with ``base`` mixed with ``memory`` (a memory model name or folder, a
    MemoryModel object; None: the base alone) through ``combiner``. ``domain`` is needed by
    memories built for one (a kNN datastore from the cache, a memory trained on first use).

    ``base`` may be a loaded model (``memdec_core.inputs.models.load_model``) to keep it between calls,
    and ``prompt`` a list of prompts, generated as one left-padded batch. Returns the new text
    (or a list: one text per prompt, ``num_return_sequences`` texts per prompt in order).

    Knobs are fixed, not tuned: the combiner's single grid point when fixed
    (``settings={"linear": {"lam": 0.3}}``), else its defaults; the memory's grid must be one
    setting (``{"knn-datastore": {"temperatures": (10.0,)}}``).
    """
    from memdec_core.engine.generation import generate_texts, generation_settings

    generation_settings(**generation)  # bad settings fail before anything is loaded
    ctx, memory_component = _memory_context(base, memory, domain, combiner, settings, eval_settings)
    texts = generate_texts(ctx, memory_component, [prompt] if isinstance(prompt, str) else list(prompt),
                           streamer_factory=streamer_factory, **generation)
    return texts[0] if isinstance(prompt, str) and len(texts) == 1 else texts


def composite_model(base: "str | LoadedModel", memory: "str | MemoryModel", *, domain: str | None = None,
                    lam: float | None = None, combiner: Any = "linear",
                    settings: dict[str, dict[str, Any]] | None = None, eval_settings: EvalSettings | None = None):
    """Base + memory + combiner as one ``transformers`` causal LM (``MemdecForCausalLM``), ready
    for ``generate()``, ``pipeline("text-generation")`` or lm-evaluation-harness; its
    ``.tokenizer`` is the base's. ``lam`` fixes the linear combiner's λ (else ``settings``, else
    its default). A composite built from names saves as a folder of references
    (``save_pretrained``) that ``from_pretrained`` rebuilds.
    """
    from memdec_core.engine.composite import MemdecForCausalLM
    from memdec_core.engine.generation import fixed_combiner, fixed_knobs, prepare_memory

    settings = {name: dict(values) for name, values in (settings or {}).items()}
    combiner_class = resolve_combiner(combiner)
    if lam is not None:
        if "lam" not in combiner_class.Config.__dataclass_fields__:
            raise ConfigError(f"combiner {combiner_class.name!r} has no λ (lam) to set")
        settings.setdefault(combiner_class.name or "", {})["lam"] = lam  # its Config checks the range
    ctx, memory_component = _memory_context(base, memory, domain, combiner_class, settings, eval_settings)
    if memory_component is None:
        raise ConfigError("a composite model needs a memory (a memory model name or folder)")
    prepare_memory(ctx, memory_component)
    mixing = fixed_combiner(ctx.combiner)
    parts = None
    if isinstance(base, str) and isinstance(memory, str):
        parts = {"base": base, "memory": memory, "domain": domain, "combiner": combiner_class.name,
                 "lam": mixing.knobs().get("lam"), "settings": settings}
    return MemdecForCausalLM.from_parts(ctx.base, memory_component, fixed_knobs(memory_component), mixing, parts=parts)


def _memory_context(base, memory, domain, combiner, settings, eval_settings):
    """The context and the (unprepared) memory component for generating with ``base``."""
    from memdec_core.interfaces import MemoryModel

    plan = Plan(settings)
    memory_component = memory if isinstance(memory, MemoryModel) else open_memory(memory, plan) if memory else None
    combiner_class = combiner_with_settings(resolve_combiner(combiner), plan)
    used: list[Component] = [component for _, component in plan.resolve([memory_component])] \
        if memory_component is not None and not isinstance(memory, MemoryModel) else []
    plan.check_all_used(used, also=[combiner_class.name] + ([domain] if domain else []))
    return prepare_context(domain, base, eval_settings, combiner_class, plan=plan), memory_component


def open_memory(spec: str, plan: Plan):
    """A memory model by name, or the one that opens a folder (its ``memdec.json`` type)."""
    from pathlib import Path

    from memdec_core.store.artifacts import read_manifest_type

    folder = Path(spec).expanduser()
    if spec in registry.components("memory-models") or not (folder.is_dir() or "/" in spec):
        return plan.create("memory-models", spec)
    if not folder.is_dir():
        raise ConfigError(f"memory folder not found: {folder}")
    artifact_type = read_manifest_type(folder)
    for name, cls in registry.components("memory-models").items():
        if cls.artifact_type == artifact_type and cls.artifact_setting:
            return plan.create("memory-models", name, **{cls.artifact_setting: str(folder)})
    raise ConfigError(f"{folder} holds a {artifact_type!r} artifact, which no memory model opens")


__all__ = ["evaluate", "compare", "generate", "composite_model", "prepare_context", "prepare_run", "default_bases",
           "default_methods", "methods_for_base"]
