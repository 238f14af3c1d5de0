"""Token caps: the first N tokens of a split, tokenising only what they need (issue 32), and caps
read as the same text for every tokenizer when a run's bases differ in tokenizer (issue 31)."""

import numpy as np
import pytest

from memdec_core.inputs.data import (
    LONG_DOCUMENT_CHARS,
    Corpus,
    cached_stream,
    load_corpus,
    tokenize_corpus,
    tokenize_documents,
    tokenize_head,
)


@pytest.fixture(scope="module")
def demo_tokenizer():
    from transformers import AutoTokenizer

    from memdec_core.inputs.models import resolve_model_location

    return AutoTokenizer.from_pretrained(resolve_model_location("memdec-demo-s")[0])


@pytest.fixture(scope="module")
def finance():
    return load_corpus("finance")


def reference(tokenizer, documents, cap):
    """The brute force the caps replaced: tokenise the whole split, then keep its first ``cap`` tokens."""
    return tokenize_documents(tokenizer, documents)[:cap] if cap else tokenize_documents(tokenizer, documents)


class Spy:
    """A tokenizer that records the texts it is given (everything else is the real one's)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.texts.extend([texts] if isinstance(texts, str) else texts)
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    @property
    def longest(self) -> int:
        return max(map(len, self.texts), default=0)


def one_line(documents, n_chars):
    """The documents as one line of at least ``n_chars`` characters (repeated as needed)."""
    line = " ".join(document.replace("\n", " ") for document in documents)
    return ((line + " ") * (n_chars // len(line) + 1))[:n_chars]


def test_caps_give_the_ids_of_tokenising_everything(demo_tokenizer, finance, monkeypatch, tmp_path):
    """Guards the early stop: on the finance pack, every cap (one inside a document, the defaults,
    the whole split and past it) gives exactly the ids of tokenising the split whole then cutting,
    whether tokenised now, read back from the cache, or tokenised in memory."""
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "cache"))
    documents, text_hash = finance.documents["train"], finance.hashes["train"]
    whole = reference(demo_tokenizer, documents, None)
    first_length = len(tokenize_documents(demo_tokenizer, documents[:1]))
    caps = [2, first_length + 7, 4_096, 32_768, len(whole) - 1, len(whole), len(whole) + 5]
    for cap in caps:
        head, _ = tokenize_head(demo_tokenizer, documents, cap)
        assert np.array_equal(head[:cap], whole[:cap]), cap
        for _ in range(2):  # tokenised and cached, then read back
            assert np.array_equal(cached_stream(demo_tokenizer, documents, text_hash, cap=cap), whole[:cap]), cap


def test_a_cap_tokenises_only_the_documents_it_needs(demo_tokenizer, finance, monkeypatch, tmp_path):
    """Guards issue 32: the default train cap (32,768 of 388,704 tokens) must not tokenise the
    whole train split first."""
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "cache"))
    spy = Spy(demo_tokenizer)
    tokenized = tokenize_corpus(finance, spy, "fingerprint", context=64,
                                max_tokens={"train": 32_768, "valid": 4_096, "test": 4_096})
    assert np.array_equal(tokenized.streams["train"], reference(demo_tokenizer, finance.documents["train"], 32_768))
    train = set(finance.documents["train"])
    tokenised_chars = sum(len(text) for text in spy.texts if text in train)
    assert tokenised_chars < sum(map(len, train)) / 3


def test_a_huge_one_line_document_is_not_tokenised_whole(demo_tokenizer, finance, monkeypatch, tmp_path):
    """Guards issue 31's rough edge: a 5 MB single-line document under a 4,096-token cap has only
    its head tokenised."""
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "cache"))
    huge = one_line(finance.documents["train"], 5_000_000)
    corpus = Corpus("huge", {"train": [huge] + finance.documents["train"][:3], "valid": finance.documents["valid"],
                             "test": finance.documents["test"]})
    spy = Spy(demo_tokenizer)
    tokenized = tokenize_corpus(corpus, spy, "fingerprint", context=64,
                                max_tokens={"train": 4_096, "valid": 4_096, "test": 4_096})
    assert len(tokenized.streams["train"]) == 4_096
    assert spy.longest < len(huge) / 10


@pytest.mark.parametrize("cap", [3, 1_000, 20_000])
def test_the_head_of_a_long_document_has_the_whole_documents_ids(demo_tokenizer, finance, cap):
    """Guards the cut inside a long document: its head's ids are the prefix of the ids of the
    document tokenised whole (a cut falls inside a word, and a tokenizer may merge across it)."""
    long = one_line(finance.documents["train"], 8 * LONG_DOCUMENT_CHARS)
    documents = [long] + finance.documents["test"][:2]
    spy = Spy(demo_tokenizer)
    head, whole = tokenize_head(spy, documents, cap)
    assert not whole
    assert np.array_equal(head, reference(demo_tokenizer, documents, cap))
    assert spy.longest < len(long)


def test_caps_and_whole_splits_share_no_cache_entry(demo_tokenizer, finance, monkeypatch, tmp_path):
    """Guards the cache keys: a capped stream never stands for the whole split, in either order."""
    documents, text_hash = finance.documents["test"], finance.hashes["test"]
    whole = reference(demo_tokenizer, documents, None)
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "capped-first"))
    assert len(cached_stream(demo_tokenizer, documents, text_hash, cap=1_000)) == 1_000
    assert np.array_equal(cached_stream(demo_tokenizer, documents, text_hash), whole)
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "whole-first"))
    assert np.array_equal(cached_stream(demo_tokenizer, documents, text_hash), whole)
    assert np.array_equal(cached_stream(demo_tokenizer, documents, text_hash, cap=1_000), whole[:1_000])
