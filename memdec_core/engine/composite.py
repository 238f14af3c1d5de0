"""Base + memory + combiner as one ``transformers`` causal LM: ``MemdecForCausalLM``.

The composite's ``forward`` returns the mixed next-token log-probs as ``logits``, so anything
that takes a ``PreTrainedModel`` takes it: ``generate()`` with greedy decoding, sampling or beam
search (its warpers act on the mixture), ``pipeline("text-generation")``, lm-evaluation-harness.

Batches may be padded (left for generation, right for scoring): the attention mask and the
position ids it implies reach the base *and* the memory, so a padded row gets the numbers it
gets alone. The memory keeps its own state (a Memory Decoder's KV cache) in a ``MixtureCache``,
the base's ``DynamicCache`` that also carries the memory's stepper: when beam search reorders
or duplicates rows, both follow.

A composite built by ``composite_model`` (names of a base and a memory) knows where its parts come from (a base
name, a memory folder or name, a domain, the combiner's knobs): ``save_pretrained`` writes a
folder of references only, and ``from_pretrained`` of that folder rebuilds it. A combiner that
learns is fitted on the domain's validation split when the composite is built; the folder keeps
its fitted tensors (``combiner.safetensors``), which ``from_pretrained`` loads instead of fitting again.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from memdec_core.components.combiner_files import resolve_combiner
from memdec_core.components.plan import set_by_shorthand
from memdec_core.engine.features import feature_names, gate_features, token_features
from memdec_core.engine.scoring import check_memory_matches
from memdec_core.errors import ArtifactError, ConfigError
from memdec_core.inputs.context import memory_context
from memdec_core.inputs.models import LoadedModel, capture_last_ffn_input
from memdec_core.interfaces import Combiner, EvalContext, EvalSettings, MemoryModel, MemoryStepper

MODEL_TYPE = "memdec"
ARTIFACT_TYPE = "memdec-composite"
#: What a composite folder records of its parts (``composite_model``'s arguments).
REFERENCE_KEYS = ("base", "memory", "domain", "combiner", "lam", "component_settings")
#: Folders written before the per-component settings took one name call them this.
LEGACY_KEYS = {"settings": "component_settings"}
#: The fitted state of a combiner that learns, in a composite's folder.
COMBINER_STATE = "combiner.safetensors"


class MemdecConfig(PretrainedConfig):
    """A composite's config: where its parts come from, and the base's config as ``text_config``
    (generate builds the base's KV cache from it)."""

    model_type = MODEL_TYPE

    def __init__(self, parts: dict[str, Any] | None = None, text_config=None, **kwargs):
        if isinstance(text_config, dict):
            from transformers import AutoConfig

            text_config = AutoConfig.for_model(**text_config)
        self.parts = dict(parts or {})
        self.text_config = text_config
        super().__init__(**kwargs)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding: 0 at the first real token of every row."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def position_limit(base: LoadedModel, memory: MemoryModel | None = None) -> tuple[int, str] | None:
    """The positions a sequence may fill, and whose limit that is: the base's, or the memory's when
    it reads fewer (a Memory Decoder is a causal LM with positions of its own). None: no limit."""
    limits = [(base.max_positions, base.short_name)]
    if memory is not None:
        limits.append((getattr(memory, "max_positions", None), memory.name))
    known = [(positions, owner) for positions, owner in limits if positions]
    return min(known) if known else None


class MixtureCache(DynamicCache):
    """The base's KV cache, plus the memory's stepper, reordered together."""

    def __init__(self, stepper: MemoryStepper, config=None):
        super().__init__(config=config)
        self.stepper = stepper
        self.rows = 0  # sequences the cache holds (DynamicCache does not say before its layers fill)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self.stepper.select(beam_idx.cpu())

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self.stepper.select(torch.as_tensor(indices).cpu())
        self.rows = len(indices)

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.rows:  # an empty cache: the stepper has seen nothing either
            self.stepper.select(torch.arange(self.rows).repeat_interleave(repeats))
            self.rows *= repeats

    def crop(self, max_length: int):
        raise ConfigError("memdec's composite model cannot rewind its memory's cache (assisted or "
                          "speculative decoding); generate without an assistant model")


class MemdecForCausalLM(PreTrainedModel, GenerationMixin):
    """A base model mixed with a memory through a combiner, as one causal LM."""

    config_class = MemdecConfig
    base_model_prefix = "base_lm"
    main_input_name = "input_ids"

    def __init__(self, config: MemdecConfig, base: LoadedModel | None = None, memory: MemoryModel | None = None,
                 knobs: dict[str, Any] | None = None, combiner: Combiner | None = None):
        if base is None or memory is None or combiner is None:
            raise ConfigError("a memdec composite model is built from its parts: MemdecForCausalLM.from_parts(...) "
                              "or memdec_core.api.composite_model(...), or loaded with from_pretrained(folder)")
        super().__init__(config)
        self.base_lm = base.model
        self.loaded_base, self.memory, self.knobs, self.combiner = base, memory, dict(knobs or {}), combiner
        self.tokenizer = base.tokenizer
        self.generation_config = copy.deepcopy(base.model.generation_config)
        self._cache_argument = "cache" if "cache" in inspect.signature(base.model.forward).parameters \
            else "past_key_values"

    @classmethod
    def from_parts(cls, base: LoadedModel, memory: MemoryModel, knobs: dict[str, Any], combiner: Combiner,
                   parts: dict[str, Any] | None = None) -> "MemdecForCausalLM":
        """The composite of a loaded base, a prepared memory under its own ``knobs``, and a combiner.

        ``parts`` (``api.composite_model`` fills it in) records where the parts come from, so
        that the composite can be saved as a folder of references.
        """
        if getattr(memory, "tokenizer_fingerprint", None) != base.tokenizer_fingerprint:
            raise ConfigError(f"memory {memory.name!r} uses another tokenizer than {base.model_id}; "
                              f"a composite mixes a memory only with a base of its own tokenizer")
        stepper = memory.stepper(knobs)
        if not all(callable(getattr(stepper, method, None)) for method in ("logprobs", "select")):
            raise ConfigError(f"memory {memory.name!r}: its stepper has no logprobs()/select(); a stepper's "
                              f"next_logprobs() is the old protocol (docs/plugins.md, memory model: stepper)")
        config = MemdecConfig(parts=parts, text_config=base.model.config.get_text_config(decoder=True))
        model = cls(config, base, memory, knobs, combiner)
        model.eval()
        return model

    def with_combiner(self, combiner: Combiner) -> "MemdecForCausalLM":
        """The same base and memory mixed by another combiner (another λ)."""
        other = copy.copy(self)
        other._modules = dict(self._modules)
        other.combiner = combiner
        return other

    def get_input_embeddings(self):
        return self.base_lm.get_input_embeddings()

    @property
    def max_positions(self) -> int | None:
        """The longest sequence both parts read (None: no limit)."""
        limit = position_limit(self.loaded_base, self.memory)
        return limit[0] if limit else None

    def _check_positions(self, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> None:
        """Refuse a position past the base's or the memory's: the base would fail with an IndexError
        deep inside, or a memory read positions it never learnt."""
        limit = position_limit(self.loaded_base, self.memory)
        if limit is None or attention_mask.shape[1] <= limit[0]:  # no position can be past it: no GPU sync
            return
        last = int(position_ids.max())
        if last >= limit[0]:
            raise ConfigError(f"position {last} is past {limit[1]}'s {limit[0]} positions; cut the prompt or "
                              f"generate fewer tokens (memdec_core.api.generate does both)")

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: DynamicCache | None = None,
                past_key_values: DynamicCache | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, labels: torch.LongTensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Mixed log-probs ``[batch, kept positions, vocab]`` as ``logits`` (and the mean NLL of
        ``labels``, shifted as transformers shifts them, as ``loss``)."""
        if input_ids is None:
            raise ConfigError("memdec's composite model takes input_ids (the memory reads tokens, not embeddings)")
        cache = cache if cache is not None else past_key_values
        cache = self._mixture_cache(cache, use_cache)
        seen = cache.get_seq_length() if cache is not None else 0
        new = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape[0], seen + new, dtype=torch.long, device=input_ids.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, -new:]
        self._check_positions(attention_mask, position_ids)
        keep = new if not logits_to_keep or logits_to_keep > new else int(logits_to_keep)
        base_logprobs, hidden = self._base_logprobs(input_ids, attention_mask, position_ids, cache, keep)
        if cache is not None:
            cache.rows = input_ids.shape[0]
        stepper = cache.stepper if cache is not None else self.memory.stepper(self.knobs)
        needed = self._needed(base_logprobs, hidden)
        gated = {} if needed is None else {"needed": needed}
        memory_logprobs = stepper.logprobs(input_ids, attention_mask, hidden, base_logprobs.shape[-1], keep, **gated)
        memory_logprobs = memory_logprobs.to(base_logprobs.device)
        context = {"positions": None, "split": "generate"}
        if self.combiner.learns:
            context.update(step_features(base_logprobs, memory_logprobs, stepper, self.memory))
        mixed = self.combiner.combine(base_logprobs, memory_logprobs, context)
        if needed is not None:  # where the memory was skipped, the base's log-probs exactly
            mixed = torch.where(needed.to(mixed.device)[..., None], mixed, base_logprobs)
        return CausalLMOutputWithPast(loss=_shifted_nll(mixed, labels) if labels is not None else None,
                                      logits=mixed, cache=cache)

    def _needed(self, base_logprobs: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor | None:
        """``[rows, keep]`` bool: where the combiner's retrieval gate needs a ``skippable`` memory
        (from base-only features, before the memory runs); None: everywhere."""
        if not self.memory.skippable or type(self.combiner).gate is Combiner.gate:
            return None
        rows, keep, width = base_logprobs.shape
        queries = None if hidden is None else hidden.reshape(rows * keep, -1)
        needed = self.combiner.gate(gate_features(base_logprobs.reshape(-1, width), queries).cpu())  # on the CPU
        return None if needed is None else needed.bool().reshape(rows, keep)

    def _mixture_cache(self, cache, use_cache: bool | None) -> MixtureCache | None:
        """The cache to run with: generate's fresh DynamicCache becomes a MixtureCache (generate
        takes the cache back from the output); a base-only cache with tokens cannot continue."""
        if isinstance(cache, MixtureCache):
            return cache
        if cache is None and not use_cache:
            return None
        if cache is not None and cache.get_seq_length() > 0:
            raise ConfigError("this cache holds tokens the memory has not seen; continue from the cache the "
                              "composite model returned")
        return MixtureCache(self.memory.stepper(self.knobs), config=self.config.text_config)

    def _base_logprobs(self, input_ids, attention_mask, position_ids, cache, keep: int):
        """The base's log-probs at the last ``keep`` positions, and its ``last_ffn_input`` there
        when the memory reads it."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      logits_to_keep=keep, use_cache=cache is not None)
        if cache is not None:
            inputs[self._cache_argument] = cache
        if not self.memory.needs_hidden:
            return torch.log_softmax(self.base_lm(**inputs).logits.float(), dim=-1), None
        with capture_last_ffn_input(self.base_lm) as captured:
            logits = self.base_lm(**inputs).logits
        return torch.log_softmax(logits.float(), dim=-1), captured["hidden"][:, -keep:]

    # ------------------------------------------------------------------------------------------
    # A folder of references

    def save_pretrained(self, save_directory, **kwargs) -> None:
        """Write a folder that names the parts (no weights): ``from_pretrained`` rebuilds it."""
        from memdec_core.store.artifacts import replacing_directory, write_manifest

        if not self.config.parts.get("base"):
            raise ConfigError("this composite was built from loaded parts, so it cannot name them; build it with "
                              "memdec_core.api.composite_model(...) to save it")
        folder = Path(save_directory).expanduser()
        with replacing_directory(folder) as tmp:  # save_pretrained overwrites, as transformers does
            config = copy.copy(self.config)
            config.text_config = None  # the base brings its own config when it is loaded again
            config.save_pretrained(tmp)
            write_manifest(tmp, ARTIFACT_TYPE, parts=self.config.parts)
            if self.combiner.learns:
                write_combiner_state(tmp / COMBINER_STATE, self.combiner, feature_names(self.memory))
            write_model_card(tmp, self.config.parts, learned=self.combiner.learns)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> "MemdecForCausalLM":
        """Rebuild a composite from a folder ``save_pretrained`` wrote (its parts load from their
        references; a memory or datastore in the cache is reused).

        A combiner file named in its config runs only with ``trust_remote_code=True``, which
        ``AutoModelForCausalLM.from_pretrained`` passes on here (``check_parts``). A combiner that
        learns gets its fitted state from the folder's ``combiner.safetensors`` (tensors only)."""
        folder = Path(pretrained_model_name_or_path).expanduser()
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ArtifactError(f"not a memdec composite folder: {folder} ({error})") from error
        if config.get("model_type") != MODEL_TYPE:
            raise ArtifactError(f"{folder} holds a {config.get('model_type')!r} model, not a memdec composite")
        parts = {LEGACY_KEYS.get(key, key): value for key, value in (config.get("parts") or {}).items()}
        check_parts(parts, folder, trusted=kwargs.get("trust_remote_code") is True)
        state, names = read_combiner_state(folder, parts.get("combiner", "linear"))
        model = composite_model(**{key: parts[key] for key in REFERENCE_KEYS if key in parts},
                                settings=saved_windows(folder, parts.get("windows")), combiner_state=state)
        if names is not None and names != feature_names(model.memory):
            raise ArtifactError(f"{folder / COMBINER_STATE} was fitted on the features {', '.join(names)}; the memory "
                                f"gives {', '.join(feature_names(model.memory))}: export the composite again")
        return model


def composite_model(base: "str | LoadedModel", memory: "str | MemoryModel", *, domain: str | None = None,
                    lam: float | None = None, combiner: Any = "linear",
                    component_settings: dict[str, dict[str, Any]] | None = None,
                    settings: EvalSettings | None = None,
                    combiner_state: dict[str, torch.Tensor] | None = None) -> MemdecForCausalLM:
    """Base + memory + combiner as one ``transformers`` causal LM (``MemdecForCausalLM``), ready
    for ``generate()``, ``pipeline("text-generation")`` or lm-evaluation-harness; its
    ``.tokenizer`` is the base's. ``lam`` fixes the linear combiner's λ (else ``component_settings``,
    else its default; ``component_settings`` maps a component's name to its settings, as ``--set``).
    ``settings`` are the windows a memory built on first use is built with. A composite built
    from names saves as a folder of references (``save_pretrained``) that ``from_pretrained`` rebuilds.
    A combiner that learns (``adaptive``) is fitted on ``domain``'s validation split under the
    memory's knobs (cached: the same fit as ``memdec generate``'s), unless its fitted
    ``combiner_state`` is given (what ``from_pretrained`` reads from the folder).
    """
    component_settings = {name: dict(values) for name, values in (component_settings or {}).items()}
    combiner_class = resolve_combiner(combiner)
    if lam is not None:
        if "lam" not in combiner_class.Config.__dataclass_fields__:
            raise ConfigError(f"combiner {combiner_class.name!r} has no λ (lam) to set")
        component_settings = set_by_shorthand(component_settings, combiner_class, "lam", lam, "lam")
    ctx, memory_component = memory_context(base, memory, domain, combiner_class, component_settings, settings,
                                           fitted=combiner_state is not None)
    if memory_component is None:
        raise ConfigError("a composite model needs a memory (a memory model name or folder)")
    prepare_memory(ctx, memory_component)
    knobs = fixed_knobs(memory_component)
    mixing = mixing_combiner(ctx, memory_component, knobs, combiner_state)
    parts = None
    if isinstance(base, str) and isinstance(memory, str):
        parts = {"base": base, "memory": memory, "domain": domain, "combiner": combiner_class.name,
                 "lam": mixing.knobs().get("lam"), "component_settings": component_settings}
        if settings is not None:  # a memory built from the domain (a kNN datastore) depends on its windows
            parts["windows"] = dataclasses.asdict(settings)
    return MemdecForCausalLM.from_parts(ctx.base, memory_component, knobs, mixing, parts=parts)


def prepare_memory(ctx: EvalContext, memory: MemoryModel) -> None:
    """Build or load ``memory`` for ``ctx``'s base (a memory object may come prepared already),
    and check that it reads the base's tokens."""
    if not getattr(memory, "tokenizer_fingerprint", None):
        memory.prepare(ctx)
    check_memory_matches(memory, ctx)


def fixed_knobs(memory: MemoryModel) -> dict[str, Any]:
    """The memory's own knobs where nothing is tuned (generation, a composite): its grid must be a
    single setting."""
    grid = memory.grid()
    if len(grid) != 1:
        names = ", ".join(sorted({key for point in grid for key in point}))
        raise ConfigError(f"{memory.name} tunes {names} over {len(grid)} settings; generation needs one: "
                          f"fix it with --set {memory.name}.KEY=VALUE (memdec list memory-models)")
    return grid[0]


def step_features(base_logprobs: torch.Tensor, memory_logprobs: torch.Tensor, stepper,
                  memory: MemoryModel) -> dict[str, Any]:
    """The features of every position of a step (``[rows·kept, F]``, as evaluation computes them
    from the memory's support): from whole rows, and the stepper's own ``features()`` when the
    memory has features of its own."""
    width = base_logprobs.shape[-1]
    own = None
    if memory.feature_names:
        own_features = getattr(stepper, "features", None)
        own = own_features() if callable(own_features) else None
        if own is None:
            raise ConfigError(f"memory {memory.name!r} declares features {memory.feature_names} but its "
                              f"stepper gives none (a stepper's features())")
    features = token_features(base_logprobs.reshape(-1, width), memory_logprobs.reshape(-1, width), own=own)
    return {"features": features, "feature_names": feature_names(memory)}


def fixed_combiner(combiner_class: type[Combiner]) -> Combiner:
    """The combiner where nothing is tuned: its single grid point when fixed, else its default settings."""
    grid = combiner_class.grid()
    return combiner_class(grid[0] if len(grid) == 1 else combiner_class.Config())


def mixing_combiner(ctx: EvalContext, memory: MemoryModel, knobs: dict[str, Any],
                    state: dict[str, torch.Tensor] | None = None) -> Combiner:
    """The combiner that mixes where nothing is tuned (generation, a composite): ``fixed_combiner``;
    one that learns is fitted on ``ctx``'s validation split under the memory's ``knobs``
    (``engine.learning``: cached, so a second run reads the fit back), or given its fitted ``state``."""
    from memdec_core.engine.learning import fitted_combiner

    combiner = fixed_combiner(ctx.combiner)
    if not combiner.learns:
        return combiner
    if state is None:
        return fitted_combiner(ctx, memory, knobs, combiner)
    combiner.load_state_dict(state)
    return combiner


def saved_windows(folder: Path, windows: Any) -> EvalSettings | None:
    """The windows a composite folder records (``parts["windows"]``: a memory built on first use
    is built with them again); None where it records none (the defaults)."""
    if windows is None:
        return None
    try:
        return EvalSettings(**windows)
    except (TypeError, ConfigError) as error:
        raise ArtifactError(f"{folder}/config.json records windows memdec cannot read ({error})") from error


def write_combiner_state(path: Path, combiner: Combiner, names: tuple[str, ...]) -> None:
    """A fitted combiner's tensors, with its name and the features it reads (safetensors: loading
    it runs no code), written atomically."""
    from safetensors.torch import save_file

    from memdec_core.store.artifacts import atomic_file

    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in combiner.state_dict().items()}
    with atomic_file(path) as temporary:
        save_file(tensors, str(temporary), metadata={"combiner": combiner.name, "feature_names": json.dumps(names)})


def read_combiner_state(folder: Path, combiner: Any) -> tuple[dict[str, torch.Tensor] | None, tuple[str, ...] | None]:
    """The fitted state a composite folder keeps for its ``combiner`` and the features it was fitted
    on; ``(None, None)`` for a combiner that does not learn. A missing or unreadable file, or
    tensors the combiner cannot load, is one ArtifactError."""
    from safetensors import safe_open

    combiner_class = resolve_combiner(combiner)
    if not combiner_class.learns:
        return None, None
    path = folder / COMBINER_STATE
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {COMBINER_STATE}, the fitted state of its combiner "
                            f"{combiner_class.name!r}: export the composite again")
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
        names = tuple(json.loads(metadata["feature_names"]))
        if metadata.get("combiner") != combiner_class.name:
            raise ValueError(f"it holds the state of combiner {metadata.get('combiner')!r}")
        fixed_combiner(combiner_class).load_state_dict(state)
    except Exception as error:  # safetensors' own errors, a bad header, tensors the combiner refuses
        raise ArtifactError(f"{path} is not a fitted state of combiner {combiner_class.name!r} ({error}); "
                            f"export the composite again") from error
    return state, names


def check_parts(parts: dict[str, Any], folder: Path, trusted: bool) -> None:
    """Refuse what a composite folder from elsewhere (the hub, a colleague) must not make memdec do
    unasked: run a combiner file its config names (transformers' rule for code that comes with a
    model: only with ``trust_remote_code=True``), or reach files through ``..`` in a reference.
    Registered combiners are installed code, allowed as transformers allows its own classes."""
    from memdec_core.components.combiner_files import combiner_file
    from memdec_core.store.artifacts import refuse_climbing

    code = combiner_file(parts.get("combiner"))
    if code and not trusted:
        raise ArtifactError(f"{folder}/config.json names the combiner file {code}, whose code would run on "
                            f"loading; refused: pass trust_remote_code=True to from_pretrained if you trust it")
    settings = parts.get("component_settings")
    values = [value for knobs in (settings.values() if isinstance(settings, dict) else ())
              if isinstance(knobs, dict) for value in knobs.values()]
    for reference in (parts.get("base"), parts.get("memory"), code, *values):
        if isinstance(reference, str):
            refuse_climbing(reference, f"what the composite {folder} may name")


def _shifted_nll(logprobs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of ``labels`` (−100: ignored) under next-token log-probs, shifted by one."""
    predicted, gold = logprobs[:, :-1].reshape(-1, logprobs.shape[-1]), labels[:, 1:].reshape(-1).to(logprobs.device)
    return torch.nn.functional.nll_loss(predicted, gold, ignore_index=-100)


def write_model_card(folder: Path, parts: dict[str, Any], learned: bool = False) -> None:
    """The folder's README: model-card front matter and how to load it."""
    from memdec_core.inputs.model_cards import write_readme

    memory = parts.get("memory") or "none"
    weight = f"a weight per token learned on {parts.get('domain')}'s validation split ({COMBINER_STATE})" \
        if learned else f"λ = {parts.get('lam')}"
    write_readme(folder, f"memdec composite: {parts.get('base')} + {memory}", [
        f"A base model mixed with a memory ({memory}, domain {parts.get('domain') or '-'}) by the "
        f"`{parts.get('combiner', 'linear')}` combiner ({weight}). This folder holds references, "
        f"not weights: its parts load from the memdec cache or their folders.", "",
        "```python", "import memdec_core.composite  # registers the model type",
        "from transformers import AutoModelForCausalLM", "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
        'ids = model.tokenizer("The central bank", return_tensors="pt")',
        "print(model.tokenizer.decode(model.generate(**ids, max_new_tokens=20)[0]))", "```"],
        tags=("composite", "memory-decoder", "domain-adaptation"), base=parts.get("base"), domain=parts.get("domain"))


def _register() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` know the ``memdec`` model type."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register(MODEL_TYPE, MemdecConfig)
        AutoModelForCausalLM.register(MemdecConfig, MemdecForCausalLM)
    except ValueError:  # registered already (a module reloaded)
        pass


_register()
