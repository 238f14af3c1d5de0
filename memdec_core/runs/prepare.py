"""A run made ready: every name resolved and every setting checked before any work, then one
base × method measured as ``evaluate`` and ``compare`` both report it."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from memdec_core.components import registry
from memdec_core.components.combiner_files import combiner_with_settings, resolve_combiner
from memdec_core.components.plan import Plan
from memdec_core.errors import ConfigError, ResultError
from memdec_core.inputs.context import prepare_context, tokenizer_ref
from memdec_core.inputs.data import Corpus, cut_corpus, load_corpus, text_bytes
from memdec_core.inputs.models import resolve_model_location, tokenizer_facts
from memdec_core.interfaces import BYTES_PER_TOKEN, SPLITS, Combiner, EvalContext, EvalSettings, Method, MethodResult
from memdec_core.runtime.progress import log
from memdec_core.runtime.timings import recording, stage

#: How a run applies its token caps (``Run.caps``): each base's first N tokens (its bases share one
#: tokenizer), the same whole documents for every base (bases of different tokenizers), or none.
TOKEN_CAPS, TEXT_CAPS, NO_CAPS = "tokens", "text", "none"


@dataclass
class Run:
    """What a run of ``evaluate`` or ``compare`` is made of, resolved and checked before any work.

    Under ``caps == TEXT_CAPS`` the corpus is already cut to the caps' text (``cut_corpus``), and
    the bases' streams are not cut again by tokens (``context``). ``tokenizations``: how many
    different tokenizers the bases have (text that a command caps itself is cut as text when
    that is more than one, as ``compare`` does with its general text). ``combiners``: every
    combiner of a head-to-head (``--combiner linear,adaptive``), ``combiner`` first; a method that
    mixes a memory gets a row per combiner (``method_rows``).
    """

    corpus: Corpus
    bases: list[str]
    methods: list[Method]
    combiner: type[Combiner]
    plan: Plan
    settings: EvalSettings
    caps: str = TOKEN_CAPS
    tokenizations: int = 1
    combiners: list[type[Combiner]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.combiners = self.combiners or [self.combiner]

    def context(self, base_name: str) -> EvalContext:
        """The EvalContext of one base of the run: the base loaded, the corpus tokenised for it."""
        settings = self.settings
        if self.caps == TEXT_CAPS:
            settings = dataclasses.replace(settings, max_train_tokens=None, max_eval_tokens=None)
        return prepare_context(self.corpus, base_name, settings, self.combiner, plan=self.plan)

    def caps_facts(self) -> dict[str, Any]:
        """``meta["token_caps"]``: how the caps were applied, and under text caps the text they kept."""
        facts: dict[str, Any] = {"applied_as": self.caps}
        if self.caps == TEXT_CAPS:
            facts.update(why="the bases have different tokenizers", bytes_per_token=BYTES_PER_TOKEN,
                         bytes={split: text_bytes(self.corpus.documents[split]) for split in SPLITS},
                         documents={split: len(self.corpus.documents[split]) for split in SPLITS})
        return facts


def prepare_run(domain: str, bases: Iterable[str], methods: Iterable[str], *, settings: EvalSettings | None = None,
                combiner: Any = "linear", component_settings: dict[str, dict[str, Any]] | None = None,
                domain_settings: dict[str, Any] | None = None, head_to_head: bool = False) -> Run:
    """Resolve every name of a run and check every setting (``component_settings``: each component's,
    as ``--set NAME.KEY=VALUE`` gives them), then load the corpus.

    ``combiner`` is one combiner (a name, ``file.py:Name``, a class or an instance) or, where the
    command measures a head-to-head (``head_to_head``: evaluate and compare), a list of them."""
    plan = Plan(component_settings)
    names = once_each(methods, "method")
    if not names:
        raise ConfigError("give at least one method")
    instances = [plan.create("methods", name) for name in names]
    combiners = _combiners(combiner, plan, head_to_head)
    used = [component for _, component in plan.resolve(instances)]
    plan.check_all_used(used, also=[*(cls.name for cls in combiners), domain])
    bases = list(bases) or registry.default_bases()
    # Every base is resolved now: a typo in the last base should not surface after an hour of work.
    locations = {base_name: _where(base_name) for base_name in bases}
    bases = once_each(bases, "base", same=locations.get)
    plan.bases = tuple(bases)
    corpus = load_corpus(domain, **_domain_settings(domain, plan, domain_settings))
    settings = settings or EvalSettings()
    tokenizations = count_tokenizations(bases)
    caps = caps_for(tokenizations, settings)
    if caps == TEXT_CAPS:
        corpus = cut_corpus(corpus, settings.max_tokens())
        log(f"the bases have different tokenizers: the token caps are read as text, the same whole documents "
            f"for every base ({_budget_text(corpus)})")
    return Run(corpus, bases, instances, combiners[0], plan, settings, caps, tokenizations, combiners)


def _combiners(combiner: Any, plan: Plan, head_to_head: bool) -> list[type[Combiner]]:
    """The run's combiner classes, each with its ``--set`` knobs; one unless the run is a head-to-head."""
    specs = list(combiner) if isinstance(combiner, (list, tuple)) else [combiner]
    if not specs:
        raise ConfigError("give at least one combiner")
    classes = [combiner_with_settings(resolve_combiner(spec), plan) for spec in specs]
    labels = once_each([combiner_label(cls) for cls in classes], "combiner")
    classes = [next(cls for cls in classes if combiner_label(cls) == label) for label in labels]
    if len(classes) > 1 and not head_to_head:
        raise ConfigError(f"this command mixes with one combiner, given {len(classes)} ({', '.join(labels)}); "
                          f"a row per combiner is for memdec eval and memdec compare")
    return classes


def caps_for(tokenizations: int, settings: EvalSettings) -> str:
    """How a run's token caps apply: as tokens where its bases share one tokenizer (the numbers
    of a run of one base), as the same text where they do not (a cap of N tokens is then whole
    documents within N × BYTES_PER_TOKEN bytes), so that bits per byte compare one text."""
    if not any(settings.max_tokens().values()):
        return NO_CAPS
    return TEXT_CAPS if tokenizations > 1 else TOKEN_CAPS


def count_tokenizations(bases: list[str]) -> int:
    """How many different tokenizations the bases' tokenizers make (their tokenizers are loaded,
    not their weights): bases that share one tokenize every text alike."""
    if len(set(bases)) < 2:
        return 1
    return len({tokenizer_facts(name).tokenization_key for name in dict.fromkeys(bases)})


def _budget_text(corpus: Corpus) -> str:
    return ", ".join(f"{split} {len(corpus.documents[split])} documents, {text_bytes(corpus.documents[split]):,} bytes"
                     for split in SPLITS)


def once_each(names: Iterable[str], what: str, same: Callable[[str], Any] = lambda name: name) -> list[str]:
    """``names`` in the order given, each once (``same(name)``: what makes two names one, such as a
    model's folder); the repeats dropped are said in one line.

    A repeated base or method would be measured again for the same numbers (from the same cache
    entries) in a second row, at the cost of a second run: given twice, it is meant once (a long
    ``--method`` list, a base named by its folder and by its registered name), so the repeat is
    dropped with a note rather than failing a run that is otherwise right.
    """
    kept, seen, dropped = [], set(), []
    for name in names:
        if same(name) in seen:
            dropped.append(name)
            continue
        seen.add(same(name))
        kept.append(name)
    if dropped:
        log(f"{what}s given more than once are measured once: {', '.join(dict.fromkeys(dropped))}")
    return kept


def _where(base_name: str) -> tuple[str, str | None]:
    """What a base name points at: a folder (its absolute path) or hub id, and a GGUF file's name."""
    location, gguf_file = resolve_model_location(base_name)
    folder = Path(location)
    return (str(folder.resolve()) if folder.is_dir() else location), gguf_file


def _domain_settings(domain: str, plan: Plan, given: dict[str, Any] | None) -> dict[str, Any]:
    values = dict(given or {})
    if domain in plan.component_settings:
        values.update(registry.get("domains", domain).settings_from_text(plan.component_settings[domain]))
    return values


def methods_for_base(ctx: EvalContext, methods: list[Method]) -> list[Method]:
    """The run's methods for this base, each told the most parameters any method of the run plans
    to add (``Method.with_parameter_target``: LoRA's automatic rank matches the memory's size)."""
    if not any(type(method).with_parameter_target is not Method.with_parameter_target for method in methods):
        return methods  # nobody matches a size: do not load models to count parameters
    planned = [count for method in methods for count in [method.planned_parameters(ctx)] if count]
    if not planned:
        return methods
    return [method.with_parameter_target(max(planned)) for method in methods]


def evaluate_one(ctx: EvalContext, method: Method) -> dict:
    """``method`` on ``ctx``'s base, as ``evaluate`` reports it: perplexities and bits per byte,
    the knobs chosen on validation, costs, the memory's facts, the tuning grid, the wall time."""
    started = time.perf_counter()
    with recording() as timings:
        result = evaluate_timed(ctx, method)
    check_finite(result.test_ppl, f"{method.name} on {ctx.base.model_id}")
    return {"base": ctx.base.model_id, "method": method.name, "test_ppl": result.test_ppl,
            "valid_ppl": result.valid_ppl, **split_bits_per_byte(ctx, result),
            "knobs": result.knobs, "costs": dataclasses.asdict(result.costs),
            "seconds": round(time.perf_counter() - started, 2),
            "test_tokens": len(ctx.corpus.streams["test"]) - 1, "memory": result.memory, "tuning": result.tuning,
            "details": result.details, "timings": timings}


def evaluate_timed(ctx: EvalContext, method: Method) -> MethodResult:
    """``method.evaluate(ctx)``; what its own stages (datastore, train, tune, ...) do not claim
    is scoring, and counts as ``test``."""
    with stage("test"):
        return method.evaluate(ctx)


def split_bits_per_byte(ctx: EvalContext, result: MethodResult) -> dict:
    """``test_bpb`` and ``valid_bpb`` of a result: its perplexities in bits per byte of the text."""
    from memdec_core.engine.scoring import bits_per_byte  # torch: only once a number exists

    tokenizer, streams = tokenizer_ref(ctx.base), ctx.corpus.streams  # the tokenizer only if a count is new
    return {"test_bpb": bits_per_byte(result.test_ppl, tokenizer, streams["test"]),
            "valid_bpb": bits_per_byte(result.valid_ppl, tokenizer, streams["valid"])}


def check_finite(value: float | None, what: str) -> None:
    """A perplexity that is NaN or infinite is a broken component, never a result."""
    if value is not None and not math.isfinite(value):
        raise ResultError(f"{what}: the test perplexity is {value} (a component returned NaN or −inf log-probs)")


def combiner_label(combiner_class: type[Combiner]) -> str:
    """How reports name a combiner: its registered name, or its class's for one from a file."""
    return combiner_class.name or combiner_class.__name__


def method_rows(run: Run, method: Method) -> list[tuple[str, type[Combiner] | None]]:
    """The rows ``method`` gets in ``run``, as (row name, combiner): a method that mixes a memory one
    per combiner of the run, the first named as the method (``knn-lm``), each other one after its
    combiner (``knn-lm+adaptive``); any other method one row, with no combiner (it mixes nothing)."""
    from memdec_core.engine.mixture import MixtureMethod

    if not isinstance(method, MixtureMethod):
        return [(method.name, None)]
    return [(method.name if index == 0 else f"{method.name}+{combiner_label(combiner)}", combiner)
            for index, combiner in enumerate(run.combiners)]


def with_combiner(ctx: EvalContext, combiner: type[Combiner] | None) -> EvalContext:
    """``ctx`` mixing through ``combiner`` (None, or the context's own: ``ctx`` itself)."""
    return ctx if combiner is None or combiner is ctx.combiner else dataclasses.replace(ctx, combiner=combiner)


def named_row(row: dict, name: str, combiner: type[Combiner] | None) -> dict:
    """``row`` under its row name, with the ``combiner`` it mixed through (None: it mixes nothing)."""
    rest = {key: value for key, value in row.items() if key not in ("base", "method", "combiner")}
    return {"base": row["base"], "method": name, "combiner": combiner and combiner_label(combiner), **rest}


def with_memory(memory: str | None, methods: Iterable[str],
                component_settings: dict[str, dict[str, Any]] | None) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """``(methods, component_settings)`` of a run given ``--memory NAME_OR_FOLDER``: the settings
    that hand the memory to every method of the run that mixes it (``memdec.path=DIR`` for a memory
    folder, ``mixture.memory=NAME``), the memory's own method added when the run's only method is
    ``base``. Naming the memory here and in a setting as well is refused: which one wins would be a guess."""
    from memdec_core.inputs.context import memory_opener

    methods, settings = list(methods), {name: dict(values) for name, values in (component_settings or {}).items()}
    if not memory:
        return methods, settings
    methods = methods or registry.default_methods()  # compare's default comparison
    name, opened = memory_opener(memory)
    takers = [method for method in methods if _mixes(method, name)]
    if not takers:
        if methods != ["base"]:
            raise ConfigError(f"--memory {memory} (a {name}): none of the methods {', '.join(methods)} mixes it; "
                              f"add {_method_for(name)}")
        takers = [_method_for(name)]
        methods = methods + takers
    for method in takers:
        if registry.get("methods", method).memory:  # a fixed memory takes its settings under the method's name
            _assign(settings, method, opened, memory)
        else:
            _assign(settings, method, {"memory": name}, memory)
            _assign(settings, name, opened, memory)
    return methods, settings


def _mixes(method: str, memory: str) -> bool:
    from memdec_core.engine.mixture import MixtureMethod

    cls = registry.get("methods", method)
    return issubclass(cls, MixtureMethod) and cls.memory in (None, memory)


def _method_for(memory: str) -> str:
    """The method that mixes ``memory``: the one that fixes it (``memdec`` for ``memory-decoder``), else ``mixture``."""
    from memdec_core.engine.mixture import MixtureMethod

    classes = registry.components("methods")
    fixed = [name for name, cls in classes.items() if issubclass(cls, MixtureMethod) and cls.memory == memory]
    general = [name for name, cls in classes.items() if issubclass(cls, MixtureMethod) and not cls.memory]
    if not (fixed or general):
        raise ConfigError(f"no installed method mixes the memory {memory}")
    return (fixed or general)[0]


def _assign(settings: dict[str, dict[str, Any]], name: str, values: dict[str, Any], memory: str) -> None:
    for key, value in values.items():
        given = settings.get(name, {}).get(key)
        if given is not None:
            raise ConfigError(f"the memory is named twice: --memory {memory} and --set {name}.{key}={given}; "
                              f"give one of them")
        settings.setdefault(name, {})[key] = value
