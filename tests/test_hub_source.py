"""``--source hub``: a pack's dataset streamed once into a local snapshot (a local folder stands in
for the hub: ``datasets`` streams both the same way)."""

import json
import random

import pytest

from memdec_core.errors import DataError
from memdec_core.inputs.data import load_corpus
from memdec_core.store.cache import cache_entries
from memdec_domains import hub
from memdec_domains.packs import PackDomain

datasets = pytest.importorskip("datasets")


def write_jsonl(path, texts, column="text"):
    path.write_text("".join(json.dumps({"id": i, column: text}) + "\n" for i, text in enumerate(texts)))


def documents(prefix, n):
    return [f"{prefix} document {i}: the ledger of account {i * 7} was closed." for i in range(n)]


@pytest.fixture
def hub_pack(tmp_path, monkeypatch):
    """The finance pack, its hub dataset replaced by a local folder; a fresh cache."""
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = tmp_path / "dataset"
    folder.mkdir()
    monkeypatch.setattr(PackDomain, "meta", classmethod(lambda cls: {"hub_source": {"dataset": str(folder)}}))
    return folder


def test_a_dataset_with_splits_is_streamed_once_and_then_read_from_its_snapshot(hub_pack, monkeypatch):
    expected = {"train": documents("train", 30), "valid": documents("valid", 5), "test": documents("test", 4)}
    write_jsonl(hub_pack / "train.jsonl", expected["train"][:10] + ["   "] + expected["train"][10:])  # a blank row
    write_jsonl(hub_pack / "validation.jsonl", expected["valid"])
    write_jsonl(hub_pack / "test.jsonl", expected["test"])

    assert load_corpus("finance", source="hub").documents == expected
    [entry] = cache_entries("hub")
    assert (entry.type, entry.status) == ("hub-snapshot", "complete") and entry.made_by.startswith("39 documents of ")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)  # a second run never reaches the hub
    assert load_corpus("finance", source="hub").documents == expected


def test_a_train_only_dataset_is_split_by_text_whatever_the_row_order(hub_pack, tmp_path, monkeypatch):
    texts = documents("only", 600)
    write_jsonl(hub_pack / "train.jsonl", texts)
    first = load_corpus("finance", source="hub").documents

    assert sorted(sum(first.values(), [])) == sorted(texts)  # every document, in exactly one split
    for split, split_documents in first.items():
        assert split_documents and all(hub.split_of(text) == split for text in split_documents)
    assert len(first["train"]) > 0.9 * len(texts)

    random.Random(0).shuffle(texts)  # the same dataset, its rows in another order, into another cache
    write_jsonl(hub_pack / "train.jsonl", texts)
    monkeypatch.setenv("MEMDEC_CACHE", str(tmp_path / "another-cache"))
    again = load_corpus("finance", source="hub").documents
    assert {split: sorted(docs) for split, docs in again.items()} == {split: sorted(docs) for split, docs in
                                                                      first.items()}


def test_a_stream_that_breaks_leaves_no_snapshot(hub_pack, tmp_path, monkeypatch):
    def rows():
        yield {"text": "one document"}
        yield {"text": "another document"}
        raise ConnectionError("connection reset by peer")
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: {"train": rows()})

    with pytest.raises(DataError, match=r"cannot load .* from the hub \(ConnectionError: connection reset"):
        load_corpus("finance", source="hub")
    snapshots = tmp_path / "cache" / "hub"
    assert not snapshots.exists() or not any(snapshots.iterdir())  # neither a snapshot nor a temporary folder


def test_a_dataset_without_text_is_a_clear_error(hub_pack):
    (hub_pack / "train.jsonl").write_text("".join(json.dumps({"id": i, "label": i % 2}) + "\n" for i in range(5)))
    with pytest.raises(DataError, match="has no text column"):
        load_corpus("finance", source="hub")


def test_the_first_string_column_is_the_text_where_none_is_named_text(hub_pack):
    texts = documents("note", 300)
    write_jsonl(hub_pack / "train.jsonl", texts, column="note")
    corpus = load_corpus("finance", source="hub")
    assert sorted(sum(corpus.documents.values(), [])) == sorted(texts)
