"""The abstract components that plugins provide.

Every component class has a lowercase-hyphen ``name``, a ``Config`` dataclass holding its
settings, and ``plugin`` (filled in by the registry: which plugin provided it). Components are
built from their config: ``Linear(Linear.Config(lam=0.3))`` or ``Linear(lam=0.3)``.

This module imports neither torch nor faiss, so listing components stays fast.
"""

from __future__ import annotations

import dataclasses
import re
from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from memdec_core.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from memdec_core.evaluate import EvalContext, MethodResult

NAME_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


@dataclass
class NoConfig:
    """The config of a component that has no settings."""


class Component:
    """Base of every pluggable component."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = NoConfig
    plugin: ClassVar[str | None] = None

    def __init__(self, config: Any = None, **overrides: Any):
        if config is None:
            config = self._build_config(overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config

    @classmethod
    def _build_config(cls, values: dict[str, Any]):
        known = {field.name for field in dataclasses.fields(cls.Config)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{cls.name}: unknown setting(s) {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known)) or 'none'})")
        return cls.Config(**values)

    @classmethod
    def settings_from_text(cls, values: dict[str, str]) -> dict[str, Any]:
        """Convert ``key=value`` strings from the command line to the types of ``Config``'s fields."""
        fields = {field.name: field for field in dataclasses.fields(cls.Config)}
        converted = {}
        for key, text in values.items():
            if key not in fields:
                raise ConfigError(f"{cls.name}: unknown setting {key!r} "
                                  f"(known: {', '.join(sorted(fields)) or 'none'})")
            converted[key] = _from_text(text, _default_of(fields[key]), f"{cls.name}.{key}")
        return converted

    @classmethod
    def info(cls) -> dict[str, Any]:
        """Facts for ``memdec list --json``: the settings and their defaults (subclasses add more)."""
        return {"settings": dataclasses.asdict(cls.Config())}

    @classmethod
    def describe(cls) -> str:
        """One line for listings: the first line of the class docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""


class Method(Component):
    """An adaptation method: given a base model and a domain corpus, it scores the test split.

    ``evaluate`` tunes the method's knobs on the validation split only, then reports the test
    perplexity with the chosen knobs. Artifacts it needs (a datastore, a trained memory, an
    adapter) are built on first use and cached by content hash through ``ctx.cache``.
    """

    @abstractmethod
    def evaluate(self, ctx: EvalContext) -> MethodResult:
        """Score ``ctx.corpus``'s test split with ``ctx.base``; knobs tuned on validation."""


class Retriever(Component):
    """A search backend: builds an index over items and returns the nearest ones for queries."""

    @abstractmethod
    def build(self, items: Any, path: str) -> None:
        """Index ``items`` and write the index under ``path``."""

    @abstractmethod
    def load(self, path: str) -> None:
        """Open an index written by ``build``."""

    @abstractmethod
    def search(self, queries: Any, k: int) -> tuple[Any, Any]:
        """Return ``(scores, ids)`` of the ``k`` best items per query, best first."""


class MemoryModel(Component):
    """A model that gives next-token log-probs for windows of tokens, mixed beside a base model.

    It declares the tokenizer it was trained with (``tokenizer_fingerprint``) so that mixing it
    with a base of another tokenizer fails loudly instead of producing nonsense.
    """

    tokenizer_fingerprint: str

    @abstractmethod
    def logprobs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``[batch, length, vocab]`` of the next token at every position."""


class Combiner(Component):
    """Mixes a base model's next-token distribution with a memory's.

    ``combine`` takes log-probs of shape ``[..., vocab]`` (or ``[..., 1]`` gathered at the gold
    token when ``elementwise`` is true) and returns log-probs of the same shape. Knobs live in
    ``Config``; ``grid()`` lists the configs tried on the validation split.
    """

    #: True when output[v] depends only on base[v] and memory[v] and needs no renormalisation
    #: (a mixture of two distributions). Then the evaluator only gathers the gold token's
    #: log-prob instead of materialising full-vocabulary rows.
    elementwise: ClassVar[bool] = False

    @abstractmethod
    def combine(self, base_logprobs: torch.Tensor, memory_logprobs: torch.Tensor,
                context: dict[str, Any]) -> torch.Tensor:
        """Mixed log-probs, same shape as the inputs."""

    @classmethod
    def grid(cls) -> list[Any]:
        """Configs to try on validation; the default config alone when there is nothing to tune."""
        return [cls.Config()]

    def knobs(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)


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
        f"{name}-config", [(key, Any, dataclasses.field(default=grid[0].get(key))) for key in knob_names])

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


SPLITS = ("train", "valid", "test")


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
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


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise ConfigError(f"component name {name!r} must be lowercase words joined by hyphens")
    return name
