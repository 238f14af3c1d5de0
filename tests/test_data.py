"""Corpora, token streams and sliding windows."""

import gzip
import json

import pytest
from conftest import write_corpus

from memdec_core.errors import ConfigError, DataError, UnknownComponentError
from memdec_core.inputs.data import load_corpus, make_windows, read_documents


@pytest.mark.parametrize("n_tokens,context,stride", [(10, 4, 2), (100, 16, 8), (17, 16, 3), (5, 8, 4), (64, 8, 8)])
def test_windows_score_every_position_exactly_once(n_tokens, context, stride):
    windows = make_windows(n_tokens, context, stride)
    scored = [p for w in windows for p in range(w.score_from, w.end - 1)]
    assert scored == list(range(n_tokens - 1))
    for window in windows:
        assert window.end - window.start <= context
        assert window.start <= window.score_from
    for window in windows[1:]:  # after the first, each scored token sees at least context - stride tokens
        assert window.score_from - window.start >= min(context - stride, context - 1) - 1 or window.start == 0


def test_bad_window_settings():
    with pytest.raises(ConfigError, match="stride"):
        make_windows(100, 8, 9)
    with pytest.raises(ConfigError, match="stride"):
        make_windows(100, 8, 0)
    with pytest.raises(ConfigError, match="context"):
        make_windows(100, 1, 1)


def test_corpus_folder_formats(tmp_path):
    txt = load_corpus(str(write_corpus(tmp_path / "a", fmt="txt")))
    jsonl = load_corpus(str(write_corpus(tmp_path / "b", fmt="jsonl")))
    assert txt.documents == jsonl.documents
    assert txt.hashes == jsonl.hashes
    gz = tmp_path / "doc.jsonl.gz"
    with gzip.open(gz, "wt") as handle:
        handle.write(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert read_documents(gz) == ["one", "two"]
    odd = tmp_path / "odd.jsonl"  # raw separators inside a JSON string are not line breaks
    odd.write_text(json.dumps({"text": "a\u2028b\x1cc"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_documents(odd) == ["a\u2028b\x1cc"]


def test_missing_split_is_a_clear_error(tmp_path):
    folder = write_corpus(tmp_path / "c")
    (folder / "valid.txt").unlink()
    with pytest.raises(DataError, match="no valid split"):
        load_corpus(str(folder))


def test_empty_split_and_bad_jsonl(tmp_path):
    folder = write_corpus(tmp_path / "d")
    (folder / "test.txt").write_text("\n\n")
    with pytest.raises(DataError, match="test split is empty"):
        load_corpus(str(folder))
    (folder / "test.txt").unlink()
    (folder / "test.jsonl").write_text('{"text": "fine"}\n{"txt": 3}\n')
    with pytest.raises(DataError, match="test.jsonl:2"):
        load_corpus(str(folder))


def test_missing_folder_and_unknown_domain(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_corpus(str(tmp_path / "nope"))
    with pytest.raises(UnknownComponentError, match="unknown domain 'fnance'"):
        load_corpus("fnance")


def test_token_streams_are_tokenised_once_and_memory_mapped(corpus_dir, tiny_gpt2, tmp_path, monkeypatch):
    import numpy as np

    from memdec_core.inputs import data
    from memdec_core.inputs.models import load_model

    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "cache"))
    base, corpus = load_model(str(tiny_gpt2)), load_corpus(str(corpus_dir))
    expected = {split: data.tokenize_documents(base.tokenizer, corpus.documents[split]) for split in corpus.documents}
    monkeypatch.setattr(data, "TOKENIZE_CHUNK", 7)  # many chunks: the same stream as one call
    first = data.tokenize_corpus(corpus, base.tokenizer, base.tokenizer_fingerprint, context=64)
    for split, stream in first.streams.items():
        assert np.array_equal(stream, expected[split]) and stream.dtype == np.int32
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 3

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(data, "tokenize_documents", no_tokenizing)
    second = data.tokenize_corpus(corpus, base.tokenizer, base.tokenizer_fingerprint, context=64,
                                  max_tokens={"train": 500})
    assert isinstance(second.streams["test"], np.memmap)
    assert np.array_equal(second.streams["train"], expected["train"][:500])
    assert second.data_hash("test") == first.data_hash("test")

    monkeypatch.undo()
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "cache"))
    damaged = sorted((tmp_path / "cache" / "tokens").glob("*.npy"))[0]
    damaged.write_bytes(damaged.read_bytes()[:40])  # a cut-off file: rebuilt from the text, not misread
    third = data.tokenize_corpus(corpus, base.tokenizer, base.tokenizer_fingerprint, context=64)
    for split, stream in third.streams.items():
        assert np.array_equal(stream, expected[split])


def test_a_tokenizer_with_the_same_vocabulary_but_another_pre_tokenizer_gets_other_tokens(tiny_gpt2):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    from memdec_core.inputs.data import tokenization_key
    from memdec_core.inputs.models import tokenizer_fingerprint

    plain, spaced = AutoTokenizer.from_pretrained(tiny_gpt2), AutoTokenizer.from_pretrained(tiny_gpt2)
    spaced.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert plain("bank")["input_ids"] != spaced("bank")["input_ids"]
    assert tokenizer_fingerprint(plain) == tokenizer_fingerprint(spaced)  # what the vocabulary check sees
    assert tokenization_key(plain) != tokenization_key(spaced)  # what the token cache keys on
