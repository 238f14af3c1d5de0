"""Python entry points of the Memory Decoder plugin (what the CLI commands call)::

    from memdec_decoder import api
    folder = api.train("finance", teacher="memdec-demo-l", init="memdec-demo-s", output="finance-memory")
    print(api.generate("memdec-demo-m", folder, "Shares of the bank", lam=0.6))
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from memdec_core.api import prepare_context
from memdec_core.errors import ConfigError
from memdec_core.progress import log
from memdec_decoder.memory import MemoryDecoder, open_memory
from memdec_decoder.method import DecoderSettings, MemoryDecoderMethod
from memdec_decoder.train import train_memory
from memdec_knn.targets import build_targets as build_target_set


def build_targets(domain, teacher: str, *, settings=None, output: Path | None = None, k: int = 1024,
                  temperature: float | str = 16.0) -> str:
    """The teacher's kNN targets over ``domain``'s train split (cached unless ``output`` is given).

    ``temperature="auto"`` takes the T that the teacher's kNN-LM picks on the validation split.
    """
    tune = temperature == "auto"
    method = MemoryDecoderMethod(teacher=teacher, k=k, tune_temperature=tune,
                                 **({} if tune else {"temperature": temperature}))
    _refuse_existing(output)
    ctx = prepare_context(domain, teacher, settings)
    if output is None:
        return str(method.targets_for(ctx).folder)
    from memdec_knn.method import KnnLM

    store = KnnLM(k=k).datastore_for(ctx)
    return str(build_target_set(store, Path(output), method.target_settings_for(ctx, store)).folder)


def train(domain, *, teacher: str = "", init: str = "", settings=None, output: Path | None = None,
          **decoder_settings) -> str:
    """Train (or reuse from the cache) the domain's Memory Decoder; returns its folder.

    ``teacher`` / ``init`` default to the largest / smallest demo model. With ``output`` the
    memory is written to that folder; an interrupted run resumes when called again the same way.
    """
    method = MemoryDecoderMethod(teacher=teacher, init=init, **decoder_settings)
    _refuse_existing(output)
    ctx = prepare_context(domain, teacher or _default_teacher(), settings)
    if output is None:
        return str(method.memory_for(ctx).folder)
    teacher_name, init_name = method.teacher_and_init(ctx.base)
    targets = method.targets_for(ctx)
    memory = train_memory(init_name, ctx.corpus, targets, Path(output).expanduser(), context=ctx.context,
                          stride=ctx.stride, settings=method.config.train_settings(), teacher=teacher_name,
                          eval_batch_size=ctx.settings.batch_size)
    return str(memory.folder)


def _default_teacher() -> str:
    from memdec_core.api import default_bases

    return default_bases()[-1]


def _refuse_existing(output) -> None:
    if output is not None and Path(output).expanduser().exists():
        raise ConfigError(f"output folder already exists: {output}")


def generate(base: str, memory, prompt: str, *, lam: float = 0.6, streamer_factory=None, **generation) -> str:
    """Continue ``prompt`` with ``base`` mixed with ``memory`` (a folder, a loaded memory or None).

    ``streamer_factory(tokenizer)`` may return a transformers streamer to print tokens as they come.
    """
    from memdec_core.models import load_model
    from memdec_decoder.generate import generate_with_memory

    loaded_memory = memory if isinstance(memory, MemoryDecoder) or memory is None else open_memory(memory)
    log(f"loading {base}")
    loaded = load_model(base)
    input_ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
    if input_ids.shape[1] == 0:
        input_ids = torch.tensor([[loaded.tokenizer.eos_token_id]])
    streamer = streamer_factory(loaded.tokenizer) if streamer_factory else None
    output = generate_with_memory(loaded, loaded_memory, input_ids, lam=lam, streamer=streamer, **generation)
    return loaded.tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)


def memory_settings() -> dict:
    """The defaults of ``memdec train`` / ``--method memdec``."""
    return dataclasses.asdict(DecoderSettings())
