"""Corpora → token streams → sliding windows.

A corpus is a registered Domain or a folder holding ``train``, ``valid`` and ``test`` files as
plain text (documents separated by a blank line) or JSONL (one ``{"text": ...}`` per line),
optionally gzipped. Each split becomes one token stream: documents joined by the tokenizer's
end-of-text token, tokenised once per text and tokenizer (in chunks of documents) and kept in
the cache as an ``.npy`` file that later runs memory-map. Windows cut a stream so that every
predicted token has exactly one global position: position ``p`` is the input token whose hidden
state predicts token ``p + 1``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memdec_core.errors import ConfigError, DataError
from memdec_core.interfaces import SPLITS
from memdec_core.runtime.timings import timed

SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".txt.gz")


@dataclass
class Corpus:
    """The documents of each split, with a hash of their text (part of artifact cache keys)."""

    name: str
    documents: dict[str, list[str]]
    hashes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for split in SPLITS:
            if not self.documents.get(split):
                raise DataError(f"corpus {self.name!r}: the {split} split is empty")
        self.hashes = {split: _text_hash(docs) for split, docs in self.documents.items()}


def _text_hash(documents: list[str]) -> str:
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:20]


def load_corpus(domain: str, **domain_settings) -> Corpus:
    """A registered domain by name (with its settings, e.g. ``source="hub"``), or a corpus folder."""
    from memdec_core.components import registry

    path = Path(domain).expanduser()
    if domain not in registry.components("domains") and (path.is_dir() or _looks_like_path(domain)):
        if domain_settings:
            raise ConfigError(f"domain settings ({', '.join(domain_settings)}) apply to registered "
                              f"domains, not to the folder {domain}")
        if not path.is_dir():
            raise DataError(f"corpus folder not found: {domain}")
        return load_corpus_folder(path)
    component = registry.get("domains", domain)(**domain_settings)
    return Corpus(domain, {split: component.documents(split) for split in SPLITS})


def _looks_like_path(text: str) -> bool:
    return "/" in text or text.startswith((".", "~")) or Path(text).exists()


def load_corpus_folder(folder: Path) -> Corpus:
    return Corpus(folder.name, {split: read_split(folder, split) for split in SPLITS})


def read_split(folder: Path, split: str) -> list[str]:
    candidates = [folder / f"{split}{suffix}" for suffix in SUFFIXES]
    found = [path for path in candidates if path.is_file()]
    if not found:
        raise DataError(f"corpus folder {folder} has no {split} split "
                        f"(expected one of: {', '.join(p.name for p in candidates)})")
    if len(found) > 1:
        raise DataError(f"corpus folder {folder} has several {split} files: "
                        f"{', '.join(p.name for p in found)}; keep one")
    return read_documents(found[0])


def read_documents(path: Path) -> list[str]:
    """The documents of one split file; a DataError naming the file when it is not (gzipped) UTF-8 text."""
    text = _read_text(path)
    if "\x00" in text:
        raise DataError(f"{path} looks binary, not text: it holds NUL bytes")
    if ".jsonl" in path.name:
        return _jsonl_documents(text, path)
    return [doc.strip() for doc in text.split("\n\n") if doc.strip()]


def _read_text(path: Path) -> str:
    if path.suffix != ".gz":
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{path} is not UTF-8 text ({_decode_problem(error)}): it looks binary, "
                            f"or is text in another encoding") from error
        except OSError as error:
            raise DataError(f"cannot read {path}: {error.strerror or error}") from error
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except EOFError as error:  # the end-of-stream marker never came: a cut-off download or copy
        raise DataError(f"{path} is truncated: the gzip stream ends early") from error
    except (gzip.BadGzipFile, zlib.error) as error:
        raise DataError(f"{path} is not valid gzip ({error})") from error
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from error
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} does not hold UTF-8 text once decompressed ({_decode_problem(error)}): "
                        f"it looks binary, or is text in another encoding") from error
    return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as a text-mode read gives


def _decode_problem(error: UnicodeDecodeError) -> str:
    return f"byte 0x{error.object[error.start]:02x} at offset {error.start}"


def _jsonl_documents(text: str, path: Path) -> list[str]:
    documents = []
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 and other line separators.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{number}: each line needs a \"text\" string")
        if record["text"].strip():
            documents.append(record["text"])
    return documents


#: Documents tokenised per call: Python's lists of token ids take ~10× the room of the int32 stream.
TOKENIZE_CHUNK = 2048
#: The layout of cached token streams; a change makes new cache keys.
TOKENS_FORMAT = 1


def tokenize_documents(tokenizer, documents: list[str], advance=None) -> np.ndarray:
    """One int32 token stream: the documents joined by the end-of-text (or BOS) token.

    ``advance(n)``, when given, is called after every chunk of ``n`` documents.
    """
    separator = _separator(tokenizer)
    chunks = []
    for first in range(0, len(documents), TOKENIZE_CHUNK):
        batch = documents[first:first + TOKENIZE_CHUNK]
        # verbose=False: long documents are expected here; windows are cut later.
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        pieces = [piece for ids in encoded for piece in (([separator], ids) if separator is not None else (ids,))]
        chunks.append(np.fromiter((token for piece in pieces for token in piece), dtype=np.int32))
        if advance is not None:
            advance(len(batch))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)


def _separator(tokenizer) -> int | None:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id


def tokenization_key(tokenizer) -> str:
    """What decides a text's tokens: the whole tokenizer definition (normaliser and pre-tokeniser
    too, which the vocabulary's fingerprint does not cover) and the document separator."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    payload = f"{TOKENS_FORMAT}|{type(tokenizer).__name__}|{_separator(tokenizer)}|{definition}"
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@timed("tokenise")
def cached_stream(tokenizer, documents: list[str], text_hash: str, description: str = "tokenizing") -> np.ndarray:
    """The token stream of ``documents`` (whose text hash is ``text_hash``): read memory-mapped
    from the cache, else tokenised once and written there. Where the cache cannot be written (a
    read-only or full disk), the stream is tokenised in memory for this run."""
    from memdec_core.errors import DiskError
    from memdec_core.runtime.progress import log
    from memdec_core.store.artifacts import cached_artifact, content_key
    from memdec_core.store.cache_dir import entry_lock

    path = cached_artifact("tokens", content_key("tokens", text_hash, tokenization_key(tokenizer)) + ".npy")
    try:
        with entry_lock(path):
            stream = _read_stream(path)
            if stream is None:
                _write_stream(path, tokenize_with_progress(tokenizer, documents, description))
                stream = _read_stream(path)
            return stream
    except DiskError as error:
        log(f"token streams are not cached ({error}); tokenizing in memory")
        return tokenize_with_progress(tokenizer, documents, description)


def tokenize_with_progress(tokenizer, documents: list[str], description: str) -> np.ndarray:
    from memdec_core.runtime.progress import progress_bar

    with progress_bar(description, len(documents), "documents") as advance:
        return tokenize_documents(tokenizer, documents, advance)


def _read_stream(path: Path) -> np.ndarray | None:
    """The cached stream, memory-mapped; None when there is none or it is damaged (it is removed:
    it is rebuilt from the text)."""
    from memdec_core.runtime.progress import log

    if not path.is_file():
        return None
    try:
        stream = np.load(path, mmap_mode="r", allow_pickle=False)
        if stream.dtype == np.int32 and stream.ndim == 1:
            return stream
    except (OSError, ValueError):
        pass
    log(f"damaged token cache {path}: tokenizing again")
    path.unlink(missing_ok=True)
    return None


def _write_stream(path: Path, stream: np.ndarray) -> None:
    """Write ``stream`` beside ``path`` and rename it into place (never a half-written file)."""
    import os
    import uuid

    from memdec_core.store.disk import disk_errors, require_space

    with disk_errors(path, stream.nbytes):
        path.parent.mkdir(parents=True, exist_ok=True)
        require_space(path.parent, stream.nbytes + 4096, path)
        temporary = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(temporary, "wb") as handle:
                np.save(handle, stream, allow_pickle=False)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


@dataclass(frozen=True)
class Window:
    """Tokens ``[start, end)`` fed to the model; positions ``[score_from, end - 1)`` are scored.

    Position ``p`` predicts token ``p + 1``; the scored positions are the last ones of the window.
    """

    start: int
    end: int
    score_from: int

    @property
    def n_scored(self) -> int:
        return self.end - 1 - self.score_from


def make_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """Sliding windows of at most ``context`` tokens; each scores the ``stride`` newest positions.

    The first window scores every position it holds; every position in ``[0, n_tokens - 1)`` is
    scored exactly once, with at least ``context - stride`` tokens of left context after the first.
    """
    check_window_settings(context, stride)
    if n_tokens < 2:
        raise DataError(f"a token stream of {n_tokens} token(s) has nothing to predict")
    windows, end = [], min(context, n_tokens)
    windows.append(Window(0, end, 0))
    while end < n_tokens:
        score_from = end - 1  # predicts token `end`, the first one not yet scored
        # The window must hold the input token at score_from, so it spans at most context tokens from it.
        new_end = min(end + stride, n_tokens, score_from + context)
        windows.append(Window(max(0, new_end - context), new_end, score_from))
        end = new_end
    return windows


def check_window_settings(context: int, stride: int) -> None:
    if context < 2:
        raise ConfigError(f"context must be at least 2 tokens, got {context}")
    if not 0 < stride <= context:
        raise ConfigError(f"stride must be between 1 and context ({context}), got {stride}")


@dataclass
class TokenizedCorpus:
    """Token streams per split, for one tokenizer."""

    corpus: Corpus
    streams: dict[str, np.ndarray]
    tokenizer_fingerprint: str
    hashes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        # Hash the tokens, not the text: it then also changes with the tokenizer and any truncation.
        self.hashes = {split: hashlib.sha256(stream.tobytes()).hexdigest()[:20]
                       for split, stream in self.streams.items()}

    def data_hash(self, split: str) -> str:
        return self.hashes[split]

    def windows(self, split: str, context: int, stride: int) -> list[Window]:
        """The sliding windows over ``split``'s stream (``make_windows``)."""
        return make_windows(len(self.streams[split]), context, stride)


def tokenize_corpus(corpus: Corpus, tokenizer, tokenizer_fingerprint: str, *, context: int,
                    max_tokens: dict[str, int] | None = None) -> TokenizedCorpus:
    """Tokenise every split; each must hold at least one full window of ``context`` tokens."""
    max_tokens = max_tokens or {}
    streams = {}
    for split in SPLITS:
        stream = cached_stream(tokenizer, corpus.documents[split], corpus.hashes[split], f"tokenizing {split}")
        if max_tokens.get(split):
            stream = stream[: max_tokens[split]]
        if len(stream) < context:
            raise DataError(f"corpus {corpus.name!r}: the {split} split has {len(stream)} tokens, "
                            f"shorter than one window of {context}; use a smaller --context or more text")
        streams[split] = stream
    return TokenizedCorpus(corpus, streams, tokenizer_fingerprint)
