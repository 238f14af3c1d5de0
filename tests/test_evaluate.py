"""Sliding-window perplexity against brute-force references."""

import math

import numpy as np
import pytest
import torch

from memdec_core.engine.scoring import iter_scored_batches, perplexity
from memdec_core.errors import ConfigError, DataError
from memdec_core.inputs.data import load_corpus, make_windows, tokenize_corpus
from memdec_core.inputs.models import load_model
from memdec_core.interfaces import EvalSettings


def full_context_nll(model, tokens: np.ndarray) -> float:
    """Mean NLL of tokens[1:] given everything before, in one forward pass."""
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens[None].astype(np.int64))).logits[0, :-1]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return float(-logprobs.gather(1, torch.from_numpy(tokens[1:, None].astype(np.int64))).mean())


@pytest.fixture(scope="module")
def base(tiny_gpt2):
    return load_model(str(tiny_gpt2))


@pytest.fixture(scope="module")
def stream(base, corpus_dir):
    return tokenize_corpus(load_corpus(str(corpus_dir)), base.tokenizer, base.tokenizer_fingerprint,
                           context=64).streams["valid"]


def test_one_window_equals_full_context(base, stream):
    tokens = stream[:100]
    windows = make_windows(len(tokens), context=128, stride=64)
    assert len(windows) == 1
    ppl = perplexity(base.model, tokens, windows, batch_size=2)
    assert ppl == pytest.approx(math.exp(full_context_nll(base.model, tokens)), rel=1e-5)


def test_sliding_windows_equal_brute_force_per_window(base, stream):
    tokens = stream[:300]
    context, stride = 64, 24
    expected = {}
    for window in make_windows(len(tokens), context, stride):  # one forward per window, no batching
        with torch.no_grad():
            logits = base.model(torch.from_numpy(tokens[None, window.start:window.end].astype(np.int64))).logits[0]
        logprobs = torch.log_softmax(logits, dim=-1)
        for position in range(window.score_from, window.end - 1):
            expected[position] = float(logprobs[position - window.start, tokens[position + 1]])
    got = {}
    for batch in iter_scored_batches(base.model, tokens, make_windows(len(tokens), context, stride), batch_size=3):
        for position, value in zip(batch.positions.tolist(), batch.gold_logprobs().tolist()):
            assert position not in got
            got[position] = value
    assert sorted(got) == list(range(len(tokens) - 1))
    assert np.allclose([got[p] for p in sorted(got)], [expected[p] for p in sorted(got)], atol=1e-5)


def test_corpus_shorter_than_one_window(base, corpus_dir):
    with pytest.raises(DataError, match="shorter than one window of 100000"):
        tokenize_corpus(load_corpus(str(corpus_dir)), base.tokenizer, base.tokenizer_fingerprint, context=100000)


def test_context_longer_than_model(base):
    with pytest.raises(ConfigError, match="longer than"):
        EvalSettings(context=4096).resolve_window(base)
    assert EvalSettings().resolve_window(base) == (256, 128)  # min(1024, model max), stride half


def test_bits_per_byte_is_the_total_nll_in_bits_over_the_bytes_of_the_scored_text(base, corpus_dir):
    """Brute force: the NLL of every scored token in bits, over the UTF-8 bytes of the text those
    tokens spell (byte-level BPE: the bytes of each token, summed)."""
    from memdec_core import api
    from memdec_core.engine.scoring import bits_per_byte, scored_bytes

    report = api.evaluate(str(corpus_dir), [base.model_id], ["base"], settings=EvalSettings(context=64, stride=32))
    row = report["results"][0]
    stream = api.prepare_context(str(corpus_dir), base.model_id, EvalSettings(context=64, stride=32)).corpus.streams[
        "test"]
    special = set(base.tokenizer.all_special_ids)
    by_token = sum(len(base.tokenizer.decode([int(token)]).encode("utf-8")) for token in stream[1:]
                   if int(token) not in special)
    assert scored_bytes(base.tokenizer, stream) == by_token
    nll_bits = math.log2(row["test_ppl"]) * (len(stream) - 1)
    assert row["test_bpb"] == pytest.approx(nll_bits / by_token, rel=1e-12)
    assert row["test_bpb"] == pytest.approx(bits_per_byte(row["test_ppl"], base.tokenizer, stream), rel=1e-12)
    assert row["valid_bpb"] is None  # the base has no validation perplexity
    assert bits_per_byte(None, base.tokenizer, stream) is None and bits_per_byte(float("nan"), base.tokenizer,
                                                                                  stream) is None


def test_the_scored_bytes_are_the_text_whatever_the_tokenizer(tmp_path):
    """Two tokenizers of different vocabularies cut the same documents differently; the bytes they
    score are the text's (less the first token's), so bits per byte put them on one scale."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from memdec_core.engine.scoring import scored_bytes
    from memdec_core.inputs.data import tokenize_documents
    from memdec_core.testing import synthetic_documents

    documents = synthetic_documents(20, seed=3) + ["naïve café — ünïcode ✓"]
    total = sum(len(document.encode("utf-8")) for document in documents)
    for vocab_size in (270, 600):
        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        raw.train_from_iterator(synthetic_documents(100, seed=1), trainer)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>")
        stream = tokenize_documents(tokenizer, documents)
        first = len(tokenizer.decode([int(stream[0])], skip_special_tokens=True).encode("utf-8"))
        assert scored_bytes(tokenizer, stream) == total - first, vocab_size
