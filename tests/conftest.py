"""Shared fixtures: a tiny tokenizer, tiny models of several families and a tiny corpus.

Everything is built in-process from configs and generated text: no downloads.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("MEMDEC_NO_PROGRESS", "1")
# Tiny models gain nothing from threads, and OpenMP threads spin badly when the machine is busy.
os.environ.setdefault("OMP_NUM_THREADS", "1")

WORDS = ("the bank raised rates market shares fell investors sold bonds inflation rose "
         "quarterly earnings beat revenue growth slowed central policy tax credit loans").split()


def synthetic_documents(n_documents: int, seed: int) -> list[str]:
    """Repetitive finance-flavoured sentences: enough structure that retrieval helps."""
    rng = random.Random(seed)
    phrases = [" ".join(rng.choice(WORDS) for _ in range(5)) for _ in range(12)]
    documents = []
    for _ in range(n_documents):
        sentences = [rng.choice(phrases).capitalize() + "." for _ in range(rng.randint(4, 9))]
        documents.append(" ".join(sentences))
    return documents


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained on the synthetic text, saved as a HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(synthetic_documents(200, seed=1), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                      bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    folder = tmp_path_factory.mktemp("tokenizer")
    wrapped.save_pretrained(folder)
    return folder


def _config(family: str, vocab_size: int):
    from transformers import AutoConfig

    if family == "gpt2":
        return AutoConfig.for_model("gpt2", vocab_size=vocab_size, n_positions=256, n_embd=32,
                                    n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=0, eos_token_id=0)
    if family == "gemma3_text":
        return AutoConfig.for_model("gemma3_text", head_dim=16, sliding_window=64, **common)
    return AutoConfig.for_model(family, **common)


def save_tiny_model(folder: Path, tokenizer_dir: Path, family: str = "gpt2", seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, len(tokenizer)))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tokenizer_dir) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("gpt2"), tokenizer_dir, "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), tokenizer_dir, "llama", seed=1)


def write_corpus(folder: Path, sizes=(60, 8, 8), fmt: str = "txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n, seed in zip(("train", "valid", "test"), sizes, (10, 11, 12)):
        documents = synthetic_documents(n, seed)
        if fmt == "jsonl":
            text = "".join(json.dumps({"text": doc}) + "\n" for doc in documents)
        else:
            text = "\n\n".join(documents) + "\n"
        (folder / f"{split}.{fmt}").write_text(text)
    return folder


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "tiny-finance")


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """One artifact cache for the whole run (reuse across tests is part of what is tested).

    Session-scoped, so that module- and session-scoped fixtures never write to ~/.cache/memdec.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEMDEC_CACHE", str(tmp_path_factory.getbasetemp() / "memdec-cache"))
        yield


@pytest.fixture
def fresh_plugins():
    """Reset the plugin manager before and after a test that changes plugins or the environment."""
    from memdec_core.plugins import reset_plugin_manager

    reset_plugin_manager()
    yield
    reset_plugin_manager()


#: Windows and Memory Decoder settings small enough for the tiny corpus.
QUICK_MEMORY = dict(epochs=2, batch_size=4, k=16, temperature=1.0, lr=3e-3)
SMALL_WINDOWS = dict(context=64, stride=32, batch_size=4)


@pytest.fixture(scope="session")
def trained_memory(tmp_path_factory, corpus_dir, tiny_llama):
    """A Memory Decoder trained on the tiny corpus with the tiny Llama as teacher and init."""
    from memdec_core.evaluate import EvalSettings
    from memdec_decoder import api

    folder = tmp_path_factory.mktemp("memories") / "tiny-memory"
    return api.train(str(corpus_dir), teacher=str(tiny_llama), init=str(tiny_llama), output=folder,
                     settings=EvalSettings(**SMALL_WINDOWS), **QUICK_MEMORY)
