"""Passages of the train split, searched by a registered text retriever.

Passages are consecutive ``passage_tokens``-token chunks of the train stream. Their index is
built once per (train data, passage length, retriever and its build settings) and cached on
disk; a compare run's bases share it, since every base of a family has one tokenizer.
"""

from __future__ import annotations

import numpy as np

from memdec_core.components.identity import component_identity
from memdec_core.errors import DataError
from memdec_core.inputs.model_cards import write_readme
from memdec_core.interfaces import Retriever
from memdec_core.store.artifacts import atomic_directory, cached_artifact, content_key, write_manifest

INDEX_TYPE = "passage-index"
#: Indexes opened in this process, by cache folder.
_OPENED: dict = {}


class PassageIndex:
    """The passages and the retriever that finds the best one for a query."""

    def __init__(self, passages: list[np.ndarray], retriever: Retriever):
        if not passages:
            raise DataError("rag: the train split has no passages to retrieve")
        self.passages, self.retriever = passages, retriever

    def __len__(self) -> int:
        return len(self.passages)

    @classmethod
    def for_corpus(cls, ctx, passage_tokens: int, retriever: Retriever) -> "PassageIndex":
        corpus = ctx.require_corpus("rag")
        stream = corpus.streams["train"]
        folder = cached_artifact("passage-indexes", content_key(
            INDEX_TYPE, corpus.data_hash("train"), passage_tokens, retriever.name,
            component_identity(type(retriever)), retriever.build_settings()))
        if folder not in _OPENED:
            passages = [stream[start:start + passage_tokens] for start in range(0, len(stream), passage_tokens)]
            texts = ctx.base.tokenizer.batch_decode([passage.tolist() for passage in passages])
            if not folder.exists():
                with atomic_directory(folder) as temporary:
                    retriever.build(texts, temporary)
                    write_manifest(temporary, INDEX_TYPE, retriever=retriever.name, settings=retriever.config,
                                   passages=len(passages), passage_tokens=passage_tokens, domain=corpus.corpus.name,
                                   data_hash=corpus.data_hash("train"))
                    write_readme(temporary, f"{retriever.name} index of {corpus.corpus.name}'s train passages", [
                        f"- {len(passages):,} passages of {passage_tokens} tokens, consecutive chunks of the train "
                        f"split (data hash `{corpus.data_hash('train')}`), for in-context RAG (`--method rag`).",
                        "- The passages themselves are not stored: memdec cuts them from the train split again."],
                        tags=("rag", "index"), domain=corpus.corpus.name)
            retriever.load(texts, folder)
            _OPENED[folder] = cls(passages, retriever)
        return _OPENED[folder]

    def best_ids(self, tokenizer, queries: list[np.ndarray]) -> list[int]:
        """The index of the best passage for each query (token ids); -1 when nothing matches."""
        texts = tokenizer.batch_decode([query.tolist() for query in queries])
        _, ids = self.retriever.search(texts, 1)
        return [int(index) for index in ids[:, 0]]

    def best(self, tokenizer, queries: list[np.ndarray]) -> list[np.ndarray]:
        """The best passage for each query; an empty one when nothing matches."""
        return [self.passage(index) for index in self.best_ids(tokenizer, queries)]

    def passage(self, index: int) -> np.ndarray:
        """Passage ``index``; -1 (nothing retrieved) is the empty passage."""
        return self.passages[index] if index >= 0 else np.zeros(0, dtype=self.passages[0].dtype)

    def length(self, index: int) -> int:
        return len(self.passages[index]) if index >= 0 else 0
