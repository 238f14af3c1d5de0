"""Python entry points of the Memory Decoder plugin (what the CLI commands call)::

    from memdec_decoder import api
    folder = api.train("finance", teacher="memdec-demo-l", init="memdec-demo-s", output="finance-memory")
    print(api.generate("memdec-demo-m", folder, "Shares of the bank", lam=0.6))
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from memdec_core.components.plan import Plan, check_requirements
from memdec_core.errors import ConfigError
from memdec_decoder.settings import DecoderSettings


def _context(domain, model: str, settings, plan: Plan):
    from memdec_core.inputs.context import prepare_context
    from memdec_decoder.memory_model import DecoderMemory

    check_requirements(DecoderMemory)
    return prepare_context(domain, model, settings, plan=plan)


def build_targets(domain, teacher: str, *, settings=None, output: Path | None = None, k: int = 1024,
                  temperature: float | str = 16.0, retriever: str = "faiss",
                  component_settings: dict | None = None) -> str:
    """The teacher's kNN targets over ``domain``'s train split (cached unless ``output`` is given).

    ``temperature="auto"`` takes the T that the teacher's kNN-LM picks on the validation split.
    """
    from memdec_decoder import pipeline
    from memdec_decoder.targets import build_targets as write_targets

    tune = temperature == "auto"
    config = DecoderSettings(teacher=teacher, k=k, retriever=retriever, tune_temperature=tune,
                             **({} if tune else {"temperature": temperature}))
    _refuse_existing(output)
    ctx = _context(domain, teacher, settings, Plan(component_settings))
    if output is None:
        return str(pipeline.targets_for(ctx, config).folder)
    store = pipeline.teacher_datastore(ctx, config)
    return str(write_targets(store, Path(output), pipeline.target_settings_for(ctx, store, config)).folder)


def train(domain, *, teacher: str = "", init: str = "", settings=None, output: Path | None = None,
          component_settings: dict | None = None, **decoder_settings) -> str:
    """Train (or reuse from the cache) the domain's Memory Decoder; returns its folder.

    ``teacher`` / ``init`` default to the largest / smallest demo model. With ``output`` the
    memory is written to that folder; an interrupted run resumes when called again the same way,
    and a finished one is returned as it is (a folder made otherwise is refused).
    """
    from memdec_core.store.cache_dir import shared_entry_lock
    from memdec_decoder import pipeline
    from memdec_decoder.train import train_memory

    config = DecoderSettings(teacher=teacher, init=init, **decoder_settings)
    ctx = _context(domain, teacher or _default_teacher(), settings, Plan(component_settings))
    if output is None:
        return str(pipeline.memory_for(ctx, config).folder)
    teacher_name, init_name = pipeline.teacher_and_init(ctx.base, config)
    config = pipeline.with_recipe(ctx, config, init_name)
    pipeline.check_init_layers(ctx.base, init_name, config.init_layers)
    targets = pipeline.targets_for(ctx, config)
    output = Path(output).expanduser()
    with shared_entry_lock(output):  # two runs onto one --output: the second waits, then finds it done
        memory = train_memory(pipeline.recipe_start(init_name, config), ctx.corpus, targets, output,
                              context=ctx.context, stride=ctx.stride, settings=config.train_settings(),
                              teacher=teacher_name, eval_batch_size=ctx.settings.batch_size,
                              teacher_targets=pipeline.teacher_targets_for(ctx) if config.distill else None)
    return str(memory.folder)


def transfer(memory, teacher: str, domain, output, *, fraction: float = 0.1, embeddings: str = "strings",
             embeddings_from: str = "", fresh_blocks: bool = False, k: int = 1024,
             temperature: float | str = "auto", retriever: str = "faiss", settings=None,
             component_settings: dict | None = None, **train_overrides) -> str:
    """Move the memory folder ``memory`` to ``teacher``'s tokenizer; returns the new memory's folder.

    The memory keeps its blocks, gets embedding and output rows for the new tokenizer (see
    ``memdec_decoder.transfer``) and trains on ``teacher``'s kNN targets over ``domain`` for
    ``fraction`` of its original training tokens, with its original recipe unless
    ``train_overrides`` (lr, beta, batch_size, accumulate, vocabulary, seed, ...) say otherwise,
    on the windows it was trained on unless ``settings`` gives a context. An interrupted transfer
    resumes when called again the same way.
    """
    from memdec_core.inputs.models import load_model
    from memdec_core.store.cache_dir import shared_entry_lock
    from memdec_decoder import pipeline
    from memdec_decoder.memory import open_memory
    from memdec_decoder.train import train_memory
    from memdec_decoder.transfer import check_transfer, transfer_settings, transferred_start

    memory = open_memory(memory)
    ctx = _context(domain, teacher, _memory_windows(settings, memory), Plan(component_settings))
    check_transfer(memory, ctx.base, fraction, embeddings, ctx.context)
    train_settings = transfer_settings(memory, fraction, **train_overrides)
    tune = temperature == "auto"
    config = DecoderSettings(teacher=teacher, k=k, retriever=retriever, tune_temperature=tune,
                             **({} if tune else {"temperature": temperature}))
    if embeddings_from and embeddings != "model":
        raise ConfigError(f"embeddings_from names the model whose rows embeddings='model' takes; "
                          f"embeddings is {embeddings!r}")
    rows_model = load_model(embeddings_from) if embeddings_from and embeddings_from != teacher else ctx.base
    start = transferred_start(memory, ctx.base, embeddings=embeddings, rows_model=rows_model,
                              fresh_blocks=fresh_blocks, seed=train_settings.seed)
    targets = pipeline.targets_for(ctx, config)
    output = Path(output).expanduser()
    with shared_entry_lock(output):
        result = train_memory(start, ctx.corpus, targets, output, context=ctx.context, stride=ctx.stride,
                              settings=train_settings, teacher=teacher, eval_batch_size=ctx.settings.batch_size,
                              teacher_targets=pipeline.teacher_targets_for(ctx) if train_settings.distill else None)
    return str(result.folder)


def _memory_windows(settings, memory):
    """``settings``, with the windows the memory was trained on unless a context is given."""
    from memdec_core.interfaces import EvalSettings

    settings = settings or EvalSettings()
    if settings.context is None and memory.manifest.get("context"):
        settings = dataclasses.replace(settings, context=memory.manifest["context"])
    return settings


def _default_teacher() -> str:
    from memdec_core.components.registry import default_bases

    return default_bases()[-1]


def _refuse_existing(output) -> None:
    if output is not None and Path(output).expanduser().exists():
        raise ConfigError(f"output folder already exists: {output}")


def generate(base: str, memory, prompt: str, *, lam: float = 0.6, streamer_factory=None, **generation) -> str:
    """Continue ``prompt`` with ``base`` mixed with the memory folder ``memory`` (None: the base alone)
    by the linear combiner with weight ``lam``."""
    from memdec_core.runs.generate import generate as generate_text

    return generate_text(base, prompt, memory=str(memory) if memory is not None else None,
                         component_settings={"linear": {"lam": lam}}, streamer_factory=streamer_factory,
                         **generation)
