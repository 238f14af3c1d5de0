"""BM25 over passages of the train split (bm25s: a maintained, numpy-only BM25)."""

from __future__ import annotations

import numpy as np

from memdec_core.errors import DataError

#: Indexes built in this process, by (train data hash, passage length): every base of a family
#: shares one tokenizer, so a compare run builds the index once.
_BUILT: dict[tuple[str, int], "PassageIndex"] = {}


class PassageIndex:
    """Consecutive ``passage_tokens``-token chunks of the train stream, searchable by BM25."""

    def __init__(self, passages: list[np.ndarray], texts: list[str]):
        import bm25s

        if not passages:
            raise DataError("rag: the train split has no passages to retrieve")
        self.passages = passages
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def __len__(self) -> int:
        return len(self.passages)

    @classmethod
    def for_corpus(cls, ctx, passage_tokens: int) -> "PassageIndex":
        key = (ctx.corpus.data_hash("train"), passage_tokens)
        if key not in _BUILT:
            stream = ctx.corpus.streams["train"]
            passages = [stream[start:start + passage_tokens] for start in range(0, len(stream), passage_tokens)]
            texts = ctx.base.tokenizer.batch_decode([passage.tolist() for passage in passages])
            _BUILT[key] = cls(passages, texts)
        return _BUILT[key]

    def best(self, tokenizer, queries: list[np.ndarray]) -> list[np.ndarray]:
        """The best passage for each query (token ids); an empty one when nothing matches."""
        import bm25s

        texts = tokenizer.batch_decode([query.tolist() for query in queries])
        tokens = bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
        found, scores = self.retriever.retrieve(tokens, k=1, show_progress=False, n_threads=1)
        empty = np.zeros(0, dtype=self.passages[0].dtype)
        return [self.passages[int(index)] if score > 0 else empty for index, score in zip(found[:, 0], scores[:, 0])]
