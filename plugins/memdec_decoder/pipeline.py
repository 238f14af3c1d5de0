"""How the domain's memory is made and cached: teacher datastore → kNN targets → training.

The teacher's datastore comes from the kNN-LM plugin's public API (shared with ``knn-lm``), the
targets search it through the configured retriever, and training starts from the init model.
Every step is cached by content hash; the memory's key does not name the base, so one memory
per domain serves every base of the family.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from memdec_core.components import registry
from memdec_core.components.identity import component_identity
from memdec_core.errors import ConfigError, ModelError
from memdec_core.inputs.models import (
    LoadedModel,
    decoder_blocks,
    default_device,
    load_model,
    model_fingerprint,
    model_skeleton,
    tokenizer_fingerprint,
)
from memdec_core.interfaces import EvalContext
from memdec_core.runtime.progress import log
from memdec_core.runtime.timings import timed
from memdec_core.store.artifacts import cached_artifact, content_key
from memdec_core.store.cache_dir import shared_entry_lock
from memdec_decoder.memory import MemoryDecoder, open_memory
from memdec_decoder.settings import DecoderSettings
from memdec_decoder.targets import TargetSet, TargetSettings, build_targets
from memdec_decoder.train import train_memory

#: Memories opened in this process: one memory serves every base of a compare run.
_OPENED: dict[Path, MemoryDecoder] = {}


def memory_for(ctx: EvalContext, config: DecoderSettings) -> MemoryDecoder:
    """The memory at ``config.path``, or the domain's cached one, made on first use."""
    if config.path:
        return open_cached(Path(config.path).expanduser())
    teacher_ctx = teacher_context(ctx, config)
    _, init_name = teacher_and_init(ctx.base, config, run_bases(ctx))
    config = with_recipe(ctx, config, init_name)
    folder = cached_artifact("memories", memory_key(teacher_ctx, init_name, config))
    with shared_entry_lock(folder):  # a second run sharing the cache waits, then reuses it; ranks train together
        if folder.exists():
            log(f"reusing memory {folder}")
            return open_cached(folder)
        check_init_layers(ctx.base, init_name, config.init_layers)  # before the datastore and targets
        targets = targets_for(teacher_ctx, config)
        log(f"training a memory from {init_name} in {folder}")
        memory = train_memory(recipe_start(init_name, config), teacher_ctx.corpus, targets, folder,
                              context=teacher_ctx.context, stride=teacher_ctx.stride, settings=config.train_settings(),
                              teacher=teacher_ctx.base.model_id, eval_batch_size=ctx.settings.batch_size,
                              teacher_targets=teacher_targets_for(teacher_ctx) if config.distill else None)
    _OPENED[folder] = memory
    return memory


def teacher_context(ctx: EvalContext, config: DecoderSettings) -> EvalContext:
    """``ctx`` with the teacher as its base (and the teacher's windows)."""
    ctx.require_corpus("training a memory")
    teacher_name, _ = teacher_and_init(ctx.base, config, run_bases(ctx))
    return context_with_teacher(ctx, teacher_name)


def context_with_teacher(ctx: EvalContext, teacher_name: str) -> EvalContext:
    """``ctx`` with the model ``teacher_name`` (loaded unless it is the base) as its base, and its windows."""
    teacher = ctx.base if teacher_name == ctx.base.model_id else load_model(teacher_name)
    if teacher.tokenizer_fingerprint != ctx.base.tokenizer_fingerprint:
        raise ModelError(f"teacher {teacher_name} has another tokenizer than {ctx.base.model_id}")
    teacher_ctx = dataclasses.replace(ctx, base=teacher)
    teacher_ctx.context, teacher_ctx.stride = ctx.settings.resolve_window(teacher)
    return teacher_ctx


@timed("targets")
def targets_for(teacher_ctx: EvalContext, config: DecoderSettings) -> TargetSet:
    """The teacher's kNN targets over the train split (its datastore is shared with knn-lm)."""
    store = teacher_datastore(teacher_ctx, config)
    settings = target_settings_for(teacher_ctx, store, config)
    folder = cached_artifact("targets", content_key("targets", store.manifest["data_hash"],
                                                     store.manifest["model_fingerprint"], store.folder.name,
                                                     store.index_folder.name, decoder_identity(),
                                                     dataclasses.asdict(settings)))
    with shared_entry_lock(folder):  # the ranks of a run compute the shards together
        if folder.exists():
            log(f"reusing kNN targets {folder}")
            return TargetSet(folder)
        log(f"computing kNN targets in {folder}")
        return build_targets(store, folder, settings)


def teacher_targets_for(teacher_ctx: EvalContext):
    """The teacher's own next-token distributions over the train split (``memdec.distill``), cached."""
    from memdec_decoder.teacher_targets import DEFAULT_TOP, SHARD_SIZE, TeacherTargets, build_teacher_targets

    teacher, corpus = teacher_ctx.base, teacher_ctx.corpus
    folder = cached_artifact("teacher-targets", content_key("teacher-targets", teacher.fingerprint,
                                                             corpus.data_hash("train"), teacher_ctx.context,
                                                             teacher_ctx.stride, DEFAULT_TOP, SHARD_SIZE,
                                                             decoder_identity()))
    with shared_entry_lock(folder):
        if folder.exists():
            log(f"reusing the teacher's distributions {folder}")
            return TeacherTargets(folder)
        log(f"computing the teacher's distributions in {folder}")
        return build_teacher_targets(teacher, corpus.streams["train"], folder, context=teacher_ctx.context,
                                     stride=teacher_ctx.stride, batch_size=teacher_ctx.settings.batch_size,
                                     data_hash=corpus.data_hash("train"), domain=corpus.corpus.name)


def teacher_datastore(teacher_ctx: EvalContext, config: DecoderSettings):
    """The teacher's datastore searched by the configured retriever (the kNN plugin's public API)."""
    from memdec_knn import api as knn

    retriever = teacher_ctx.create("retrievers", config.retriever)
    return knn.datastore_for(teacher_ctx).with_index(retriever)


def target_settings_for(teacher_ctx: EvalContext, store, config: DecoderSettings) -> TargetSettings:
    """k and T of the targets; T tuned on validation when ``tune_temperature`` is set (or the recipe says so)."""
    return config.target_settings(tuned_temperature(teacher_ctx, config) if config.tune_temperature else None)


def with_recipe(ctx: EvalContext, config: DecoderSettings, init_name: str, *, quiet: bool = False) -> DecoderSettings:
    """``config`` with the settings left at auto filled by the recipe for ``init_name``'s size and
    the compute the run allows (its train split, and whether models run on an accelerator)."""
    from memdec_decoder.recipe import AUTO, recipe_for, why_auto

    size, train_tokens = _size_of(ctx.base, init_name), len(ctx.corpus.streams["train"])
    accelerator = default_device().type != "cpu"
    recipe = recipe_for(config.recipe, size, train_tokens, accelerator)
    if not quiet:
        why = f"; auto: {why_auto(size, train_tokens, accelerator)}" if config.recipe == AUTO else ""
        log(f"memory recipe {recipe.describe()} (settings given explicitly win{why})")
    return config.with_recipe(recipe, ctx.context)


def recipe_start(init_name: str, config: DecoderSettings):
    """The init model's start, its manifest naming the recipe that filled the settings."""
    from memdec_decoder.train import init_model_start

    start = init_model_start(load_model(init_name), config.train_settings())
    start.facts["recipe"] = config.recipe
    return start


def check_init_layers(base: LoadedModel, init_name: str, n_blocks: int) -> None:
    """More blocks than the init has is refused before the datastore and targets are built."""
    if not n_blocks:
        return  # every block: nothing to count (and no model to load)
    blocks = len(decoder_blocks(base.model)) if init_name == base.model_id else _skeleton_facts(init_name)[2]
    if blocks is None:
        decoder_blocks(model_skeleton(init_name)[0])  # raises: the architecture's blocks are unknown
    if n_blocks > blocks:
        raise ConfigError(f"init_layers={n_blocks}, but the init model {init_name} has only {blocks} blocks")


def _size_of(base: LoadedModel, model_name: str) -> int:
    return _count(base.model) if model_name == base.model_id else _parameters_of(model_name)


def tuned_temperature(teacher_ctx: EvalContext, config: DecoderSettings) -> float:
    """The temperature with which the teacher's kNN-LM (linear λ) scores best on validation.

    Squared-L2 distances between hidden states differ by orders of magnitude between families
    (T ≈ 10–30 for the demo family, ≈ 300–1000 for Qwen), so a fixed T can make every target
    one-hot or flat.
    """
    from memdec_core.engine.scoring import tune_on_validation
    from memdec_knn import api as knn

    knn_memory = teacher_ctx.create("memory-models", "knn-datastore", k=config.k,
                                    temperatures=knn.TEMPERATURE_GRID, retriever=config.retriever)
    knn_memory.prepare(teacher_ctx)
    ctx = dataclasses.replace(teacher_ctx, combiner=registry.get("combiners", "linear"))
    settings, valid, best = tune_on_validation(ctx, knn_memory)
    temperature = settings[best][0]["temperature"]
    log(f"target temperature: T = {temperature:g} (teacher's kNN-LM on validation, ppl {valid[best].perplexity:.3f})")
    return temperature


def teacher_and_init(base: LoadedModel, config: DecoderSettings, bases: tuple[str, ...] = ()) -> tuple[str, str]:
    """The configured teacher and init, else the largest / smallest model of the base's family:
    the default models and the run's ``bases`` that share its tokenizer (the paper: the largest
    family member teaches, the smallest learns, and one memory serves them all)."""
    family = _family(base, bases)
    teacher = config.teacher or family[-1]
    init = config.init or family[0]
    if len(family) == 1 and not (config.teacher and config.init):
        log(f"no other model of the run or the defaults shares {base.model_id}'s tokenizer: the memory uses "
            f"{teacher} as teacher and {init} as init (set memdec.teacher / memdec.init to choose)")
    return teacher, init


def run_bases(ctx: EvalContext) -> tuple[str, ...]:
    return ctx.plan.bases if ctx.plan is not None else ()


def _family(base: LoadedModel, bases: tuple[str, ...]) -> list[str]:
    """The default models and run bases of ``base``'s tokenizer, smallest first (ties: by name)."""
    fingerprint = base.tokenizer_fingerprint
    members = set(_default_family(fingerprint)) | {base.model_id}
    members |= {name for name in bases if name != base.model_id and _facts_of(name)[0] == fingerprint}
    sizes = {name: _count(base.model) if name == base.model_id else _parameters_of(name) for name in members}
    return sorted(members, key=lambda name: (sizes[name], name))


def decoder_identity() -> dict:
    """The plugin's version (or code) in every key of what it makes: the ``memory-decoder`` memory
    model's identity, looked up by name (that component sits above this module)."""
    return component_identity(registry.get("memory-models", "memory-decoder"))


def memory_key(teacher_ctx: EvalContext, init_name: str, config: DecoderSettings) -> str:
    ignored = {"path", "teacher", "init"}  # named by the other parts of the key
    ignored |= {item.name for item in dataclasses.fields(config) if not item.metadata.get("build", True)}
    settings = {key: value for key, value in dataclasses.asdict(config).items() if key not in ignored}
    retriever = teacher_ctx.create("retrievers", config.retriever)
    teacher = teacher_ctx.base
    return content_key("memory", teacher.fingerprint, model_fingerprint(init_name), teacher.tokenizer_fingerprint,
                       teacher_ctx.corpus.data_hash("train"), teacher_ctx.corpus.data_hash("valid"),
                       teacher_ctx.context, teacher_ctx.stride, settings, decoder_identity(),
                       retriever.name, component_identity(type(retriever)), retriever.build_settings())


def planned_parameters(ctx: EvalContext, config: DecoderSettings) -> int:
    """Parameters of the memory ``memory_for`` gives: the trained one's, else its init model's as the
    recipe cuts it (blocks kept, and the restricted vocabulary's rows, known from the train split)."""
    if config.path:
        return open_cached(Path(config.path).expanduser()).parameters
    _, init = teacher_and_init(ctx.base, config, run_bases(ctx))
    config = with_recipe(ctx, config, init, quiet=True)
    check_init_layers(ctx.base, init, config.init_layers)
    vocabulary = _planned_vocabulary(ctx, config)
    if not config.init_layers and vocabulary is None:
        return _size_of(ctx.base, init)  # no weights loaded for a registered init
    # Counted on the init's skeleton: planning (LoRA's rank, before any method runs) reads no weights.
    model = ctx.base.model if init == ctx.base.model_id else model_skeleton(init)[0]
    return _memory_parameters(model, config.init_layers, vocabulary.size if vocabulary else None)


def _planned_vocabulary(ctx: EvalContext, config: DecoderSettings):
    from memdec_decoder.train import choose_vocabulary

    if ctx.corpus is None:
        return None
    return choose_vocabulary(config.vocabulary, ctx.corpus.streams["train"], ctx.base.vocab_size)


def _memory_parameters(model, n_blocks: int, vocabulary_rows: int | None) -> int:
    """Parameters of the init ``model`` cut to its first ``n_blocks`` (0: all) and to
    ``vocabulary_rows`` rows of its embedding and output layers (None: all; tied layers counted once)."""
    total = _count(model)
    if n_blocks:
        dropped = list(decoder_blocks(model))[n_blocks:]
        total -= sum(parameter.numel() for block in dropped for parameter in block.parameters())
    if vocabulary_rows:
        layers = {id(layer.weight): layer for layer in (model.get_input_embeddings(), model.get_output_embeddings())}
        for layer in layers.values():
            total -= (layer.weight.shape[0] - vocabulary_rows) * layer.weight.shape[1]
            if getattr(layer, "bias", None) is not None:
                total -= layer.bias.shape[0] - vocabulary_rows
    return total


def _parameters_of(model_name: str) -> int:
    return _facts_of(model_name)[1]


@functools.lru_cache(maxsize=None)
def _facts_of(model_name: str) -> tuple[str, int]:
    """A model's tokenizer fingerprint and parameter count: from its registration when it states
    them (no weights loaded), else from the loaded model (once per process)."""
    if model_name in registry.components("models"):
        info = registry.get("models", model_name).info()
        if info.get("tokenizer_fingerprint") and info.get("parameters"):
            return info["tokenizer_fingerprint"], int(info["parameters"])
    return _skeleton_facts(model_name)[:2]


@functools.lru_cache(maxsize=None)
def _skeleton_facts(model_name: str) -> tuple[str, int, int | None]:
    """Tokenizer fingerprint, parameters and blocks (None: an architecture memdec cannot cut) of a
    model, from its config and tokenizer: no weights are read."""
    from memdec_core.inputs.models import BLOCK_PATHS

    model, tokenizer = model_skeleton(model_name)
    blocks = len(decoder_blocks(model)) if model.config.model_type in BLOCK_PATHS else None
    return tokenizer_fingerprint(tokenizer), _count(model), blocks


def _count(model) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def _default_family(tokenizer_fingerprint: str) -> list[str]:
    """Default models (smallest first) whose tokenizer matches."""
    return [name for name, cls in registry.components("models").items()
            if cls.default and _tokenizer_of(name) == tokenizer_fingerprint]


@functools.lru_cache(maxsize=None)
def _tokenizer_of(model_name: str) -> str | None:
    return registry.get("models", model_name).info().get("tokenizer_fingerprint")


def open_cached(folder: Path) -> MemoryDecoder:
    if folder not in _OPENED:
        _OPENED[folder] = open_memory(folder)
    return _OPENED[folder]
