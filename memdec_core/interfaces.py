"""The abstract components that plugins provide, and the contracts between them.

Every component class has a lowercase-hyphen ``name``, a ``Config`` dataclass holding its
settings, and ``plugin`` (filled in by the registry: which plugin provided it). Components are
built from their config: ``Linear(Linear.Config(lam=0.3))`` or ``Linear(lam=0.3)``. A setting
documents itself where it is declared: ``k: int = setting(1024, "neighbours per position")``;
``memdec list --json``, ``--help`` and the docs read the help text from there.

Components name the components they use (``uses()``): a method its memory, a memory its
retriever. memdec resolves that tree before a run starts, so an unknown name, a retriever of the
wrong kind or a ``--set`` for a component that takes no part in the run fails at once.

This module imports neither torch nor faiss, so listing components stays fast; neither may
the modules a plugin's registration hooks import.
"""

from __future__ import annotations

import dataclasses
import math
import re
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

from memdec_core.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from memdec_core.components.plan import Plan
    from memdec_core.engine.scoring import NLLTotal, ScoredBatch
    from memdec_core.inputs.data import TokenizedCorpus, Window
    from memdec_core.inputs.models import LoadedModel

NAME_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
SPLITS = ("train", "valid", "test")
#: The settings by which a method that trains is given its compute.
BUDGET_SETTINGS = ("budget_tokens", "budget_flops", "max_steps")
#: The kinds of retriever: what ``build`` indexes and ``search`` takes.
RETRIEVER_KINDS = ("vectors", "text")


def setting(default: Any, help: str, *, build: bool = True) -> Any:
    """A Config field with its help text (peft's pattern): one source for docs, listings and errors.

    ``build=False`` marks a setting that changes how a built artifact is used but not the
    artifact itself (faiss's ``nprobe``), so it stays out of the artifact's cache key.
    """
    metadata = {"help": help, "build": build}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class NoConfig:
    """The config of a component that has no settings."""


@dataclass(frozen=True)
class Use:
    """One component that another one uses, named by one of its settings."""

    kind: str  # a registry kind: "memory-models", "retrievers", ...
    name: str
    setting: str  # where the name came from, for errors: "knn-lm.retriever"
    #: For retrievers: the kinds the user can take ("vectors", "text"); empty: any.
    accepts: tuple[str, ...] = ()
    #: The config to create it with, when the user shares it (a fixed memory takes its method's).
    config: Any = field(default=None, compare=False)


class Component:
    """Base of every pluggable component."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    plugin: ClassVar[str | None] = None
    #: Plugins (entry-point names) this component needs besides its own, e.g. ``("knn",)``:
    #: using it while one of them is disabled or missing is a one-line error.
    requires: ClassVar[tuple[str, ...]] = ()
    #: Other component names whose ``--set`` settings this one also takes (a method whose
    #: memory is fixed takes that memory's); its own name's settings win.
    shares_settings_with: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any = None, **overrides: Any):
        if config is None:
            config = self._build_config(overrides)
        else:  # a config built elsewhere is held to the same numbers
            given = {item.name: getattr(config, item.name) for item in dataclasses.fields(config)}
            self.check_settings({**given, **overrides})
            if overrides:
                config = dataclasses.replace(config, **overrides)
        self.config = config

    @classmethod
    def _build_config(cls, values: dict[str, Any]):
        known = {item.name for item in dataclasses.fields(cls.Config)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{cls.name}: unknown setting(s) {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known)) or 'none'})")
        return cls.Config(**cls.check_settings(values))

    def uses(self) -> list[Use]:
        """The components this one uses, by name (from its settings); resolved before a run."""
        return []

    @classmethod
    def settings_from_text(cls, values: dict[str, Any], given_as: str | None = None) -> dict[str, Any]:
        """Convert ``key=value`` strings from the command line to the types of ``Config``'s fields
        (values that are not strings pass through), checked by ``check_settings``. ``given_as``: the
        name they were given under, for errors (a component whose settings this one shares)."""
        name = given_as or cls.name
        fields = {item.name: item for item in dataclasses.fields(cls.Config)}
        converted = {}
        for key, text in values.items():
            if key not in fields:
                raise ConfigError(f"{name}: unknown setting {key!r} "
                                  f"(known: {', '.join(sorted(fields)) or 'none'})")
            converted[key] = (_from_text(text, _default_of(fields[key]), f"{name}.{key}")
                              if isinstance(text, str) else text)
        return cls.check_settings(converted, given_as)

    @classmethod
    def check_settings(cls, values: dict[str, Any], given_as: str | None = None) -> dict[str, Any]:
        """Refuse a number setting that is NaN or infinite, or outside its ``knob_bounds``, naming it.

        Every setting from the command line or from Python passes here before its component is
        built, so a component's own checks never see NaN (``min(t) <= 0`` is false for it, and a
        NaN knob would surface as NaN log-probs an hour later). Infinity is kept only for a
        setting whose default is infinite. Returns ``values``.
        """
        fields = {item.name: item for item in dataclasses.fields(cls.Config)}
        bounds = getattr(cls, "knob_bounds", {})
        for key, value in values.items():
            if key in fields:
                _check_number(f"{given_as or cls.name}.{key}", value, fields[key], bounds.get(key))
        return values

    @classmethod
    def settings_help(cls) -> dict[str, str]:
        """The help text of every setting (empty where a plugin gave none)."""
        return {item.name: item.metadata.get("help", "") for item in dataclasses.fields(cls.Config)}

    @classmethod
    def info(cls) -> dict[str, Any]:
        """Facts for ``memdec list --json``: settings, their defaults and help (subclasses add more)."""
        return {"settings": dataclasses.asdict(cls.Config()), "help": cls.settings_help(),
                "requires": list(cls.requires)}

    @classmethod
    def describe(cls) -> str:
        """One line for listings: the first line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def build_settings(self) -> dict[str, Any]:
        """The settings that shape what this component builds (those not marked ``build=False``)."""
        return {item.name: getattr(self.config, item.name) for item in dataclasses.fields(self.config)
                if item.metadata.get("build", True)}


# ----------------------------------------------------------------------------------------------
# What a method reports


@dataclass
class Costs:
    """What a method adds to its base and what that took, in typed fields (a compare row reads them)."""

    params_added: int = 0  # parameters beside the base's (a memory, adapters); 0 when weights are replaced
    bytes_added: int = 0  # bytes on disk of what the method adds (a datastore, a memory, an adapter)
    memory_bytes: int = 0  # bytes held in RAM at inference beyond the base (weights, an index, keys)
    train_seconds: float = 0.0  # wall time of building and training (every learning rate tried)
    train_tokens: int = 0  # training tokens seen (the kept run)
    train_flops: float = 0.0  # training FLOPs of every run (see memdec_core.engine.training.training_flops_per_token)


#: ``scorer(stream, windows, description)`` → the NLL of the adapted system, knobs fixed, on any
#: token stream of the base's tokenizer (``memdec compare`` scores general text and times it).
Scorer = Callable[["np.ndarray", "list[Window]", str], "NLLTotal"]
#: generator(prompt_ids [1, length], new_tokens) → the generated ids [1, new_tokens].
Generator = Callable[["torch.Tensor", int], "torch.Tensor"]
#: loglikelihood(requests, knobs=None) → for each ``(context, continuation)`` pair of token-id
#: lists, the summed log-prob of the continuation given the context, as the adapted system
#: scores it. ``knobs`` overrides the chosen knobs (a mixture's ``lam``) for per-task tuning;
#: a method without knobs ignores it. Downstream tasks (``memdec tasks``, lm-eval) read this.
LogLikelihood = Callable[..., "list[float]"]


@dataclass
class MethodResult:
    """What a method reports for one base model."""

    test_ppl: float
    valid_ppl: float | None = None
    knobs: dict[str, Any] = field(default_factory=dict)  # the setting chosen on validation
    costs: Costs = field(default_factory=Costs)
    #: Every knob setting tried on validation with its perplexity: ``[{**knobs, "valid_ppl": x}]``.
    tuning: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # free-form facts for humans and the JSON
    #: A mixture's memory on its own: ``memory_alone_ppl`` (test perplexity over the positions it
    #: names, i.e. gives a finite log-prob), ``memory_coverage`` (their share), and the memory's
    #: ``fidelity()`` (``target_agreement``, ``target_kl``).
    memory: dict[str, Any] = field(default_factory=dict)
    scorer: Scorer | None = field(default=None, repr=False, compare=False)
    #: Generates as the method does at inference, greedy with KV caches: ``generator(prompt_ids, n)``
    #: continues ``prompt_ids`` (``[1, length]``) by ``n`` tokens and returns their ids ``[1, n]``.
    #: ``memdec compare`` times it against the base's for the generation latency column.
    generator: Generator | None = field(default=None, repr=False, compare=False)
    #: Scores continuations as the method does at inference (see ``LogLikelihood``).
    loglikelihood: LogLikelihood | None = field(default=None, repr=False, compare=False)

    def score(self, stream, windows, description: str = "scoring") -> "NLLTotal":
        if self.scorer is None:
            raise ConfigError("this method's result cannot score other text (its plugin gives no scorer)")
        return self.scorer(stream, windows, description)


# ----------------------------------------------------------------------------------------------
# What a method is given


@dataclass
class EvalSettings:
    """How text is windowed and batched. ``None`` picks a default from the model."""

    context: int | None = None  # default: min(1024, the model's maximum positions)
    stride: int | None = None  # default: context // 2 (the paper scores the newest half)
    batch_size: int = 4
    max_train_tokens: int | None = None
    max_eval_tokens: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, got {self.batch_size}")
        for name in ("max_train_tokens", "max_eval_tokens"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ConfigError(f"{name.replace('_', ' ')} must be at least 2, got {value}")

    def resolve_window(self, model: "LoadedModel") -> tuple[int, int]:
        context = self.context or min(PAPER_CONTEXT, model.max_positions or PAPER_CONTEXT)
        if model.max_positions and context > model.max_positions:
            raise ConfigError(f"context {context} is longer than {model.model_id}'s "
                              f"{model.max_positions} positions")
        return context, self.stride or max(1, context // 2)

    def max_tokens(self) -> dict[str, int | None]:
        return {"train": self.max_train_tokens, "valid": self.max_eval_tokens,
                "test": self.max_eval_tokens}


PAPER_CONTEXT = 1024
#: A token cap read as text, where the bases of a run have different tokenizers: this many UTF-8
#: bytes of whole documents per token (``memdec_core.inputs.data.cut_corpus``). The demo family's
#: tokenizer has 4.3 on the finance pack (1,663,213 bytes in 388,704 tokens).
BYTES_PER_TOKEN = 4


@dataclass
class EvalContext:
    """Everything a Method (and the memory it mixes) needs for one base model on one corpus.

    ``corpus`` is None where there is no domain (``memdec generate`` with a memory folder): a
    component that needs one says so. ``plan`` creates the components a run uses with the
    user's settings: ``ctx.create("retrievers", "faiss")``. Contexts are made by
    ``memdec_core.inputs.context.prepare_context``.
    """

    base: "LoadedModel"
    corpus: "TokenizedCorpus | None"
    context: int
    stride: int
    settings: EvalSettings
    combiner: type["Combiner"]
    plan: "Plan"

    def windows(self, split: str) -> "list[Window]":
        return self.require_corpus().windows(split, self.context, self.stride)

    def require_corpus(self, who: str = "this method") -> "TokenizedCorpus":
        if self.corpus is None:
            raise ConfigError(f"{who} needs a domain (--domain)")
        return self.corpus

    def create(self, kind: str, name: str, **extra_settings: Any) -> "Component":
        """The component ``name`` of ``kind`` with the run's settings for it (``--set name.key=...``)."""
        return self.plan.create(kind, name, **extra_settings)


# ----------------------------------------------------------------------------------------------
# The kinds of component


class Method(Component):
    """An adaptation method: given a base model and a domain corpus, it scores the test split.

    ``evaluate`` tunes the method's knobs on the validation split only, then reports the test
    perplexity with the chosen knobs, typed costs and a scorer for other text. Artifacts it
    needs (a datastore, a trained memory, an adapter) are built on first use and cached by
    content hash (``memdec_core.store.artifacts``).
    """

    #: Place in the default comparison (``memdec compare`` without ``--method``), lowest first;
    #: None: compared only when named.
    compare_rank: ClassVar[float | None] = None
    #: In ``memdec compare``'s equal-compute protocol (the paper's), every method that trains gets
    #: the training FLOPs this method reports (the Memory Decoder's); it runs first on each base.
    compute_reference: ClassVar[bool] = False
    #: The base model as it is: the reference of every ratio (its own are 1 by construction).
    unadapted: ClassVar[bool] = False

    @abstractmethod
    def evaluate(self, ctx: EvalContext) -> MethodResult:
        """Score ``ctx.corpus``'s test split with ``ctx.base``; knobs tuned on validation."""

    def planned_parameters(self, ctx: EvalContext) -> int | None:
        """Parameters the method will add to this base, if known before it runs (a memory's size)."""
        return None

    def with_parameter_target(self, parameters: int) -> "Method":
        """This method for a run whose largest planned addition is ``parameters`` (the paper gives
        LoRA a memory's parameter count); most methods ignore it and return themselves."""
        return self

    def with_flops_budget(self, flops: float) -> "Method":
        """This method trained with ``flops`` of compute (the equal-compute protocol), if it trains:
        a Config with a ``budget_flops`` setting takes it, unless the user already gave it a budget
        (``budget_tokens``, ``budget_flops`` or ``max_steps``), which wins. Others return themselves."""
        names = {item.name for item in dataclasses.fields(self.config)} if dataclasses.is_dataclass(self.config) else ()
        if "budget_flops" not in names or any(getattr(self.config, name, 0) for name in BUDGET_SETTINGS):
            return self
        return type(self)(dataclasses.replace(self.config, budget_flops=float(flops)))


class Retriever(Component):
    """A search backend: builds an index over items and returns the nearest ones for queries.

    ``kind`` says what it indexes: ``"vectors"`` (float arrays ``[n, dim]``; ``search`` returns
    squared L2 distances, ascending) or ``"text"`` (a list of strings; ``search`` returns relevance
    scores, descending). Ids are row numbers of the items; a missing neighbour has id −1.
    """

    kind: ClassVar[str] = "vectors"

    @abstractmethod
    def build(self, items: Any, folder: Path) -> None:
        """Index ``items`` and write the index's files under ``folder`` (an empty, new directory)."""

    @abstractmethod
    def load(self, items: Any, folder: Path) -> None:
        """Open the index ``build`` wrote to ``folder`` over the same ``items``."""

    @abstractmethod
    def search(self, queries: Any, k: int) -> tuple[Any, Any]:
        """``(scores, ids)``, each ``[n_queries, k]`` numpy arrays, best first."""

    def search_many(self, queries: Any, k: int) -> tuple[Any, Any]:
        """``search`` for a large batch of queries (kNN targets search every key); a retriever with
        a faster path for many queries at once overrides it. The same results as ``search``."""
        return self.search(queries, k)

    def facts(self) -> dict[str, Any]:
        """Facts about the built or loaded index for its manifest (e.g. a resolved factory string)."""
        return {}

    def index_settings(self, n_items: int, dim: int | None) -> dict[str, Any]:
        """The build settings that decide the index over ``n_items`` items (of ``dim`` numbers each):
        ``build_settings()`` with every value that depends on the items resolved (faiss's
        ``factory="auto"`` is ``"Flat"`` for a small store), so two spellings of one index name,
        and build, one index."""
        return self.build_settings()


class MemoryStepper(Protocol):
    """A memory's next-token distributions as sequences grow, with its own state (a KV cache).

    One stepper follows one batch of sequences (a ``generate()`` call, or one forward pass of the
    composite model): every call brings the tokens appended to every row since the last call
    (the whole prompt on the first), and ``select`` keeps the state in step when beam search
    reorders or duplicates rows.
    """

    def logprobs(self, input_ids: "torch.Tensor", attention_mask: "torch.Tensor", hidden: "torch.Tensor | None",
                 width: int, keep: int) -> "torch.Tensor":
        """``[rows, keep, width]`` log-probs of the token after each of the last ``keep`` new positions.

        ``input_ids`` ``[rows, new]``: the new tokens; ``attention_mask`` ``[rows, seen + new]``:
        0 at padding (left padding in generation, right padding in scoring), so the position of a
        token is the number of real tokens before it; ``hidden`` ``[rows, keep, dim]``: the
        base's ``last_ffn_input`` at those positions, when the memory ``needs_hidden``.
        """

    def select(self, rows: "torch.Tensor") -> None:
        """Keep the state of ``rows`` (indices into the current rows, repeats allowed), in that order."""


class MemoryModel(Component):
    """A next-token distribution mixed with a base by a combiner (a kNN-LM, a Memory Decoder, ...).

    The life of a memory in a run: ``prepare(ctx)`` builds or loads it for the base and domain
    (cached by content), then per batch of scored positions ``score(batch)`` does the work that
    every knob setting shares and ``gold_logprobs`` / ``logprobs`` give the distribution under
    one setting of the memory's own knobs (``grid()``, tuned on validation with the combiner's).
    ``stepper(knobs)`` gives the same distribution incrementally for generation, ``costs()``
    what the memory adds. ``tokenizer_fingerprint`` (set by ``prepare``) must equal the base's.
    """

    #: True when the memory reads the base's ``last_ffn_input`` at each scored position
    #: (``batch.hidden``); a kNN-LM's query.
    needs_hidden: ClassVar[bool] = False
    #: A folder whose ``memdec.json`` has this ``type`` opens as this memory, given to the
    #: setting ``artifact_setting`` (``memdec generate --memory FOLDER``).
    artifact_type: ClassVar[str | None] = None
    artifact_setting: ClassVar[str | None] = None
    #: True when a folder without ``memdec.json`` that holds a transformers model (``config.json``)
    #: opens as this memory too, given to ``artifact_setting``: a memory made by other code.
    opens_plain_models: ClassVar[bool] = False
    #: The range each numeric knob may take, ``{"temperature": (0, inf)}``: when the best value on
    #: validation sits at an edge of the grid, memdec tries values beyond it, inside this range
    #: (a knob not listed is taken to be positive and log-spaced).
    knob_bounds: ClassVar[dict[str, tuple[float, float]]] = {}

    tokenizer_fingerprint: str = ""

    @abstractmethod
    def prepare(self, ctx: EvalContext) -> None:
        """Build or load the memory for ``ctx.base`` and ``ctx.corpus`` (None without a domain)."""

    @classmethod
    def export_portable(cls, folder: Path, output: Path, lam: float | None) -> list[str]:
        """Write the memory of ``folder`` into the empty folder ``output`` as files that code other
        than memdec mixes (``memdec export --memory FOLDER``); returns the model card's lines
        (``lam``: the weight the card suggests, None when it must be tuned). A memory that is no
        model by itself (a datastore) has no portable form: it exports as a composite with a base."""
        raise ConfigError(f"a {cls.name} memory has no portable form of its own; export it with a base: "
                          f"memdec export --base BASE --memory {folder} --output DIR")

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the prepared memory reads (a Memory Decoder is a causal LM with
        positions of its own); generation keeps within it. None: any length."""
        return None

    def grid(self) -> list[dict[str, Any]]:
        """The memory's own knob settings to try on validation (e.g. kNN temperatures)."""
        return [{}]

    @abstractmethod
    def score(self, batch: "ScoredBatch") -> Any:
        """Work shared by every knob setting for one batch (a neighbour search, a forward pass)."""

    @abstractmethod
    def gold_logprobs(self, state: Any, batch: "ScoredBatch", knobs: dict) -> "torch.Tensor":
        """``[N]`` log-probs of the gold tokens ``batch.targets`` under the memory."""

    @abstractmethod
    def logprobs(self, state: Any, batch: "ScoredBatch", knobs: dict) -> "torch.Tensor":
        """``[N, vocab]`` log-probs over the base's vocabulary (``batch.logits.shape[1]`` columns)."""

    @abstractmethod
    def stepper(self, knobs: dict) -> MemoryStepper:
        """A fresh incremental scorer under ``knobs``, for generation and the composite model
        (``memdec_core.engine.composite``); it must give the distributions ``logprobs`` gives."""

    def costs(self) -> Costs:
        """What the prepared memory adds (parameters, bytes, building time)."""
        return Costs()

    def planned_parameters(self, ctx: EvalContext) -> int | None:
        """Parameters the memory will add, if known before ``prepare`` (for LoRA's rank matching)."""
        return None

    def describe_prepared(self) -> dict[str, Any]:
        """Facts about the prepared memory for the results' details (its folder, its size...)."""
        return {}

    #: Names of per-position facts of the memory's own that ``features`` gives (a kNN store: the
    #: nearest neighbour's distance); a combiner that learns reads them beside the generic ones.
    feature_names: ClassVar[tuple[str, ...]] = ()
    #: True when ``score`` works position by position on ``batch.hidden`` alone (a kNN search), so
    #: a gate may skip positions (``Combiner.gate``): ``score`` is then called on
    #: ``batch.select(rows)``, and in generation its stepper's ``logprobs`` gets ``needed=``
    #: ``[rows, keep]`` bool (positions not needed: not searched, any finite or −inf row).
    skippable: ClassVar[bool] = False

    def features(self, state: Any, batch: "ScoredBatch") -> "torch.Tensor | None":
        """``[N, len(feature_names)]`` facts of the memory's own per position (shared by every knob
        setting), or None when it has none. A stepper gives the same from ``features()``."""
        return None

    def support(self, state: Any, batch: "ScoredBatch", knobs: dict) -> "tuple[torch.Tensor, torch.Tensor] | None":
        """The memory's distribution kept sparse, ``(token_ids, logprobs)`` each ``[N, S]`` (padding:
        id −1, log-prob −inf), for a memory that names few tokens per position (a kNN-LM: at most
        k); None: read ``logprobs`` (whole rows). Features are computed from it without a
        full-vocabulary row."""
        return None

    def fidelity(self, ctx: EvalContext, knobs: dict) -> dict[str, Any]:
        """How well the prepared memory imitates what it was trained on, for the report: a trained
        memory gives ``target_agreement`` (top-1 agreement with its kNN teacher on validation) and
        ``target_kl`` (KL(p_kNN ‖ p_memory), nats per position). Empty when that does not apply."""
        return {}


class Combiner(Component):
    """Mixes a base model's next-token distribution with a memory's.

    ``combine`` takes log-probs of shape ``[..., vocab]`` (or ``[..., 1]`` gathered at the gold
    token when ``elementwise`` is true) and returns log-probs of the same shape. Knobs live in
    ``Config``; ``grid()`` lists the configs tried on validation. ``context`` holds
    ``"positions"`` (the global position of each row, a tensor, or None in generation) and
    ``"split"`` (``"valid"``, ``"test"``, ``"other"`` or ``"generate"``).
    """

    #: True when output[v] depends only on base[v] and memory[v] and needs no renormalisation
    #: (a mixture of two distributions). Then the evaluator only gathers the gold token's
    #: log-prob instead of materialising full-vocabulary rows.
    elementwise: ClassVar[bool] = False
    #: The range of each numeric knob (as ``MemoryModel.knob_bounds``): ``{"lam": (0.0, 1.0)}``.
    knob_bounds: ClassVar[dict[str, tuple[float, float]]] = {}

    #: True for a combiner that learns from validation: ``fit`` is called once per memory setting
    #: before it scores, and ``combine`` then reads ``context["features"]`` (``[N, F]``, named by
    #: ``context["feature_names"]``: the features of ``memdec_core.engine.features`` and the
    #: memory's own). Its learned state is saved with ``state_dict`` and cached.
    learns: ClassVar[bool] = False

    @abstractmethod
    def combine(self, base_logprobs: "torch.Tensor", memory_logprobs: "torch.Tensor",
                context: dict[str, Any]) -> "torch.Tensor":
        """Mixed log-probs, same shape as the inputs."""

    def fit(self, data: "FitData") -> dict[str, Any]:
        """Learn from validation positions (a combiner with ``learns = True``); returns facts for
        the report (``{"heldout_nll": ..., "flops": ...}``). ``heldout_nll`` (nats per position
        on the part of ``data`` it did not train on) chooses among memory settings."""
        raise ConfigError(f"combiner {self.name!r} does not learn (learns = False)")

    def weights(self, context: dict[str, Any]) -> "torch.Tensor | None":
        """``[N]`` the memory's weight at each position as ``combine`` would use it (for reports
        and for a retrieval gate), or None when the combiner has no such weight."""
        return None

    def gate(self, base_features: "torch.Tensor") -> "torch.Tensor | None":
        """Adaptive retrieval: ``[N]`` bool, True where the memory is needed, from base-only
        features ``[N, 2 (+ dim)]`` (``memdec_core.engine.features.gate_features``: the base's
        entropy and top log-prob, then its hidden state where the memory reads one; all known
        before the memory runs); None: every position. Where it is False and the memory is
        ``skippable``, the memory is not run and the mixture is the base's log-probs exactly."""
        return None

    def state_dict(self) -> dict[str, "torch.Tensor"]:
        """The learned tensors (empty for a combiner that does not learn)."""
        return {}

    def load_state_dict(self, state: dict[str, "torch.Tensor"]) -> None:
        """Restore what ``fit`` learned from ``state_dict()``'s tensors."""
        if state:
            raise ConfigError(f"combiner {self.name!r} has no learned state to load")

    @classmethod
    def grid(cls) -> list[Any]:
        """Configs to try on validation; the default config alone when there is nothing to tune."""
        return [cls.Config()]

    def knobs(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)


@dataclass
class FitData:
    """Validation positions for a combiner that learns, under one setting of the memory's knobs.

    Row ``i`` is one scored position: its features, the gold token's log-prob under the base and
    under the memory, its global position, and whether a fitter may train on it (``train``) or
    must keep it for early stopping (the rest; split in blocks of consecutive positions, so
    neighbouring tokens fall on one side). The test split is never in it.
    """

    features: "torch.Tensor"  # [N, F] float32
    feature_names: tuple[str, ...]
    base_gold: "torch.Tensor"  # [N] log p_base(gold)
    memory_gold: "torch.Tensor"  # [N] log p_memory(gold), −inf where the memory names no gold
    positions: "torch.Tensor"  # [N] global positions in the validation stream
    train: "torch.Tensor"  # [N] bool: may be trained on; the rest is held out
    seed: int = 0
    #: The memory may be skipped position by position (``MemoryModel.skippable``): a combiner may
    #: learn a ``gate`` from the base-only columns of ``features`` (``GATE_FEATURES``).
    skippable: bool = False
    #: ``[N, dim]`` the base's hidden state at each position where the memory reads it (the kNN
    #: query), else None: the last columns of ``gate_features``.
    hidden: "torch.Tensor | None" = None

    def __len__(self) -> int:
        return len(self.base_gold)


def combiner(name: str, *, elementwise: bool = False, grid: list[dict] | None = None):
    """Turn a function ``f(base_logprobs, memory_logprobs, context, **knobs)`` into a Combiner.

    Knobs are the keyword arguments in ``grid`` (a list of dicts tried on validation)::

        @combiner("geometric", grid=[{"alpha": a} for a in (0.1, 0.3)])
        def geometric(base, memory, context, alpha=0.2):
            mixed = (1 - alpha) * base + alpha * memory
            return mixed - mixed.logsumexp(-1, keepdim=True)
    """
    check_name(name)
    grid = grid or [{}]
    knob_names = sorted({key for point in grid for key in point})
    config_class = dataclasses.make_dataclass(
        f"{name}-config", [(key, Any, setting(grid[0].get(key), f"a knob of {name}, tuned on validation"))
                           for key in knob_names])

    def decorate(function):
        def combine(self, base_logprobs, memory_logprobs, context):
            return function(base_logprobs, memory_logprobs, context, **dataclasses.asdict(self.config))

        namespace = {
            "name": name, "Config": config_class, "elementwise": elementwise,
            "combine": combine, "__doc__": function.__doc__ or f"Combiner {name}.",
            "grid": classmethod(lambda cls: [cls.Config(**point) for point in grid]),
            "__module__": function.__module__,
        }
        return type(function.__name__, (Combiner,), namespace)

    return decorate


class Domain(Component):
    """A named corpus with ``train``, ``valid`` and ``test`` splits of documents."""

    #: Where the text comes from, for listings (package, dataset id, ...).
    source: ClassVar[str] = ""

    @abstractmethod
    def documents(self, split: str) -> list[str]:
        """The documents of one split, in a fixed order."""


class ModelSource(Component):
    """A named model that resolves wherever a model is taken (``--base NAME``)."""

    #: Part of the default set of base models, used when no ``--base`` is given.
    default: ClassVar[bool] = False

    @abstractmethod
    def path(self) -> str:
        """A local directory that ``AutoModelForCausalLM.from_pretrained`` loads."""


def _default_of(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return ""


def _from_text(text: str, default: Any, label: str) -> Any:
    """Parse ``text`` as the type of ``default`` (bool, int, float, tuple of numbers or str)."""
    try:
        if isinstance(default, bool):
            if text.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(text)
            return text.lower() in {"true", "1", "yes"}
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        kind = "a comma-separated list of numbers" if isinstance(default, tuple) else type(default).__name__
        raise ConfigError(f"{label} must be {kind}, got {text!r}") from None
    return text


def _check_number(label: str, value: Any, item: dataclasses.Field, bounds: tuple[float, float] | None) -> None:
    """ConfigError when ``value`` (a number, a tuple of numbers, or text for a setting declared a
    float, such as ``lr: float | str = "auto"``) holds a number that is not finite or not in ``bounds``."""
    default = _default_of(item)
    infinite_allowed = _is_number(default) and math.isinf(default)
    for part in value if isinstance(value, (tuple, list)) else (value,):
        number = _number_in(part, declares_float="float" in str(item.type))
        if number is None:
            continue
        if isinstance(number, float) and (math.isnan(number) or (math.isinf(number) and not infinite_allowed)):
            raise ConfigError(f"{label} must be a finite number, got {value!r}")
        if bounds is not None and not bounds[0] <= number <= bounds[1]:
            raise ConfigError(f"{label} must be in [{bounds[0]:g}, {bounds[1]:g}], got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number_in(value: Any, declares_float: bool) -> float | int | None:
    """``value`` when it is a number (an int stays one: it is finite, and may be too large for a
    float), or text that a float setting parses later, as a float; else None."""
    if _is_number(value):
        return value
    if isinstance(value, str) and declares_float:
        try:
            return float(value)
        except ValueError:
            return None  # "auto" and the like: the component's own parser judges them
    return None


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise ConfigError(f"component name {name!r} must be lowercase words joined by hyphens")
    return name
