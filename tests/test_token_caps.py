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
from memdec_core.interfaces import EvalSettings


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


# ----------------------------------------------------------------------------------------------
# Bases of different tokenizers: the caps are read as the same text for every base (issue 31)


@pytest.fixture(scope="module")
def other_tokenizer_model(tmp_path_factory):
    """A tiny GPT-2 with another tokenizer (a 500-token BPE where the shared fixture's has 300)."""
    from memdec_core.testing import save_tiny_model, save_tokenizer

    tokenizer = save_tokenizer(tmp_path_factory.mktemp("other-tokenizer"), vocab_size=500)
    return save_tiny_model(tmp_path_factory.mktemp("other-gpt2"), tokenizer, "gpt2")


CAPS = dict(context=64, stride=32, max_train_tokens=2_000, max_eval_tokens=300)


def test_bases_of_one_tokenizer_keep_the_token_caps(corpus_dir, tiny_gpt2, tiny_llama):
    """Guards the runs of one tokenizer: two bases sharing it still get their first N tokens,
    the ids of tokenising each split whole and cutting it, and the report says so."""
    from memdec_core.runs.prepare import TOKEN_CAPS, prepare_run

    run = prepare_run(str(corpus_dir), [str(tiny_gpt2), str(tiny_llama)], ["base"], settings=EvalSettings(**CAPS))
    assert run.caps == TOKEN_CAPS and run.caps_facts() == {"applied_as": TOKEN_CAPS}
    corpus = load_corpus(str(corpus_dir))
    for base in run.bases:
        ctx = run.context(base)
        for split, cap in (("train", 2_000), ("valid", 300), ("test", 300)):
            assert np.array_equal(ctx.corpus.streams[split],
                                  reference(ctx.base.tokenizer, corpus.documents[split], cap)), (base, split)


def test_bases_of_different_tokenizers_score_the_same_text(corpus_dir, tiny_gpt2, other_tokenizer_model):
    """Guards issue 31: with the default kind of caps, two tokenizers were scored on different
    text, so their bits per byte did not compare; now every base scores the same whole documents."""
    from memdec_core import api
    from memdec_core.engine.scoring import scored_bytes

    report = api.evaluate(str(corpus_dir), [str(tiny_gpt2), str(other_tokenizer_model)], ["base"],
                          settings=EvalSettings(**CAPS))
    caps = report["meta"].get("token_caps", {})
    assert caps.get("applied_as") == "text"
    corpus = load_corpus(str(corpus_dir))
    kept = corpus.documents["test"][:caps["documents"]["test"]]
    assert caps["bytes"]["test"] == sum(len(document.encode()) for document in kept) <= 300 * caps["bytes_per_token"]

    from memdec_core.runs.prepare import prepare_run

    run = prepare_run(str(corpus_dir), [str(tiny_gpt2), str(other_tokenizer_model)], ["base"],
                      settings=EvalSettings(**CAPS))
    texts, lengths = [], []
    for base in run.bases:
        ctx = run.context(base)
        tokenizer, stream = ctx.base.tokenizer, ctx.corpus.streams["test"]
        texts.append(tokenizer.decode(stream.tolist()).split(tokenizer.eos_token)[1:])
        lengths.append(scored_bytes(tokenizer, stream))
    assert texts[0] == texts[1] == kept  # the same documents, each whole
    assert lengths[0] == lengths[1]
    tokens = [row["test_tokens"] for row in report["results"]]
    assert tokens[0] != tokens[1]  # one text, two tokenizers: two token counts


def test_text_caps_keep_whole_documents_within_the_budget():
    """Guards the cut: whole documents while they fit; a first document longer than the budget
    keeps its head, cut between words and never inside a character."""
    from memdec_core.inputs.data import documents_within

    documents = ["aaaa bbbb", "cc", "dddd eeee ffff"]
    assert documents_within(documents, 11) == ["aaaa bbbb", "cc"]
    assert documents_within(documents, 12) == ["aaaa bbbb", "cc"]
    assert documents_within(documents, 6) == ["aaaa"]
    assert documents_within(["été est là"], 8) == ["été"]  # its first 8 bytes, "été es", cut at the space
    assert documents_within(["€€€"], 4) == ["€"]  # 3 bytes a character: none cut in two


def test_the_default_comparison_keeps_token_caps():
    """Guards the default table: the demo family shares one tokenizer, so ``memdec compare``'s
    default caps stay token caps (the same ids, so the same numbers)."""
    from memdec_core.components import registry
    from memdec_core.runs.prepare import TOKEN_CAPS, caps_for, count_tokenizations
    from memdec_core.runs.runconfig import window_settings

    assert caps_for(count_tokenizations(registry.default_bases()), window_settings({})) == TOKEN_CAPS


def test_compare_cuts_the_general_text_alike_for_different_tokenizers(corpus_dir, tiny_gpt2, other_tokenizer_model):
    """Guards general_bpb: compare's general tokens (a cap of its own) are read as the same text
    for bases of different tokenizers, and the table says how the caps were applied."""
    from memdec_cli.render import comparison_notes
    from memdec_core.runs.compare import CompareSettings, compare

    report = compare(str(corpus_dir), [str(tiny_gpt2), str(other_tokenizer_model)], ["base"],
                     settings=EvalSettings(**CAPS),
                     measure=CompareSettings(general=str(corpus_dir), general_tokens=300, latency_tokens=64,
                                             latency_seconds=0, generation_tokens=0))
    caps = report["meta"]["token_caps"]
    general = caps["general_test"]
    kept = load_corpus(str(corpus_dir)).documents["test"][:general["documents"]]
    assert caps["applied_as"] == "text" and general["bytes"] <= 300 * caps["bytes_per_token"]
    assert general["bytes"] == sum(len(document.encode()) for document in kept)
    assert all(row["general_bpb"] is not None for row in report["results"])
    assert any(note.startswith("token caps: the bases have different tokenizers") for note in comparison_notes(report))


def test_a_resumed_tasks_run_refuses_rows_whose_caps_read_other_text():
    """Guards --resume: rows scored on the text caps of bases of different tokenizers are not
    mixed with rows of token caps (a base of another tokenizer added or dropped between runs)."""
    from memdec_core.errors import ConfigError
    from memdec_core.runs.tasks import _reusable_rows

    config = {"values": {"domain": "finance", "bases": ["a"], "methods": ["base"], "settings": {}}}
    row = {"base": "a", "method": "base"}
    earlier = {"results": [row], "meta": {"config": config, "token_caps": {"applied_as": "text"}}}
    assert _reusable_rows(earlier, config, "text") == {("a", "base"): row}
    with pytest.raises(ConfigError, match="token caps as text, this run as tokens"):
        _reusable_rows(earlier, config, "tokens")
    before_caps_were_recorded = {"results": [row], "meta": {"config": config}}
    assert _reusable_rows(before_caps_were_recorded, config, "tokens") == {("a", "base"): row}
