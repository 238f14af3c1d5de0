"""Corpora → token streams → sliding windows.

A corpus is a registered Domain or a folder holding ``train``, ``valid`` and ``test`` files as
plain text (documents separated by a blank line) or JSONL (one ``{"text": ...}`` per line),
optionally gzipped. Each split becomes one token stream: documents joined by the tokenizer's
end-of-text token, tokenised once per text and tokenizer (in chunks of documents) and kept in
the cache as an ``.npy`` file that later runs memory-map. A token cap keeps a stream's first N
tokens and tokenises only the documents (or the head of a document) those need. Where the bases
of a run have different tokenizers, the caps are read as text instead (``cut_corpus``): whole
documents up to a byte budget, the same text for every tokenizer. Windows cut a stream so that
every predicted token has exactly one global position: position ``p`` is the input token whose
hidden state predicts token ``p + 1``.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from memdec_core.errors import ConfigError, DataError
from memdec_core.interfaces import BYTES_PER_TOKEN, SPLITS
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


#: What a domain is, for errors about something that is not one.
WHAT_A_DOMAIN_IS = ("a domain is a registered domain (memdec list domains) or a folder holding train, valid and "
                    "test files (" + ", ".join(SUFFIXES) + ")")
#: The longest name a file system takes for one file or folder (NAME_MAX on Linux and macOS).
LONGEST_NAME = 255


def load_corpus(domain: str, **domain_settings) -> Corpus:
    """A registered domain by name (with its settings, e.g. ``source="hub"``), or a corpus folder."""
    from memdec_core.components import registry

    path = Path(domain).expanduser()
    if domain not in registry.components("domains") and (_is_folder(path) or _looks_like_path(domain)):
        if domain_settings:
            raise ConfigError(f"domain settings ({', '.join(domain_settings)}) apply to registered "
                              f"domains, not to the folder {domain}")
        if not _is_folder(path):
            raise DataError(_not_a_folder(domain, path))
        return load_corpus_folder(path)
    if any(len(part) > LONGEST_NAME for part in path.parts):  # no domain's name, and no path's either
        raise DataError(f"domain {domain[:40]!r}… ({len(domain):,} characters) is too long for a folder name; "
                        f"{WHAT_A_DOMAIN_IS}")
    component = registry.get("domains", domain)(**domain_settings)
    return Corpus(domain, {split: component.documents(split) for split in SPLITS})


def _is_folder(path: Path) -> bool:
    """``path.is_dir()``, False where the OS refuses to look (a name too long for it)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _looks_like_path(text: str) -> bool:
    if "/" in text or text.startswith((".", "~")):
        return True
    try:
        return Path(text).exists()
    except OSError:
        return False


def _not_a_folder(domain: str, path: Path) -> str:
    """Why ``domain``, which names a path, is no corpus folder: a file, a link loop, missing..."""
    shown = domain if len(domain) <= 200 else f"{domain[:40]!r}… ({len(domain):,} characters)"
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return f"the corpus folder {shown} is a symbolic link loop: {_link_chain(path)}"
        if error.errno == errno.ENAMETOOLONG:
            return f"the corpus folder {shown} is not a path the OS takes (a name is too long); {WHAT_A_DOMAIN_IS}"
        if error.errno != errno.ENOENT:
            return f"cannot read the corpus folder {shown}: {error.strerror or error}"
        return f"corpus folder not found: {shown}"
    return f"{shown} is a file, not a corpus folder; {WHAT_A_DOMAIN_IS}"


def _link_chain(path: Path, limit: int = 40) -> str:
    """``test.txt → b.txt → test.txt``: the symbolic links from ``path`` until one comes back."""
    steps, seen, current = [str(path)], {os.path.abspath(path)}, Path(path)
    for _ in range(limit):
        try:
            target = os.readlink(current)
        except OSError:  # not a link: the loop is in a folder above it
            break
        current = Path(os.path.abspath(current.parent / target))
        steps.append(target)
        if str(current) in seen:
            break
        seen.add(str(current))
    return " → ".join(steps)


def load_corpus_folder(folder: Path) -> Corpus:
    return Corpus(folder.name, {split: read_split(folder, split) for split in SPLITS})


def read_split(folder: Path, split: str) -> list[str]:
    candidates = [folder / f"{split}{suffix}" for suffix in SUFFIXES]
    found = [path for path in candidates if path.is_file()]
    for path in candidates:
        if not found and path.is_symlink():  # is_file() is False for a link that leads nowhere
            _check_link(path)
    if not found:
        raise DataError(f"corpus folder {folder} has no {split} split "
                        f"(expected one of: {', '.join(p.name for p in candidates)})")
    if len(found) > 1:
        raise DataError(f"corpus folder {folder} has several {split} files: "
                        f"{', '.join(p.name for p in found)}; keep one")
    return read_documents(found[0])


def _check_link(path: Path) -> None:
    """DataError for a split file that is a symbolic link in a loop, or to nothing."""
    try:
        os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise DataError(f"{path} is a symbolic link loop: {_link_chain(path)}") from None
        raise DataError(f"{path} is a symbolic link to {os.readlink(path)}, which "
                        f"{'does not exist' if error.errno == errno.ENOENT else 'cannot be read'}") from None


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
        chunks.append(_joined(encoded, separator))
        if advance is not None:
            advance(len(batch))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)


def _joined(encoded: list[list[int]], separator: int | None) -> np.ndarray:
    """The documents' ids as one int32 array, each document after the separator (if any)."""
    pieces = [piece for ids in encoded for piece in (([separator], ids) if separator is not None else (ids,))]
    return np.fromiter((token for piece in pieces for token in piece), dtype=np.int32)


def tokenize_head(tokenizer, documents: list[str], cap: int, advance=None) -> tuple[np.ndarray, bool]:
    """``tokenize_documents(tokenizer, documents)[:cap]``, tokenising documents in order only until
    ``cap`` tokens exist; and whether every document was tokenised whole: then, and only then, the
    stream given is the whole split's, not cut (its first ``cap`` tokens are the capped stream).

    Documents go to the tokenizer in batches sized by the characters still needed; a document far
    longer than that has only its head tokenised (``head_ids``). ``advance(n)`` counts tokens.
    """
    separator = _separator(tokenizer)
    chunks = []
    have, position, whole = 0, 0, True
    chars, tokens = 0, 0  # consumed so far: their ratio sizes the next batch
    while position < len(documents) and have < cap:
        need = cap - have - (separator is not None)  # the document's own tokens still needed
        per_token = chars / tokens if tokens else FIRST_CHARS_PER_TOKEN
        wanted = max(MIN_BATCH_CHARS, int(need * per_token * BATCH_MARGIN))
        if len(documents[position]) > max(LONG_DOCUMENT_CHARS, 2 * wanted):
            ids, complete = head_ids(tokenizer, documents[position], max(need, 0))
            batch, encoded, whole = documents[position:position + 1], [ids], whole and complete
        else:
            batch = _batch(documents, position, wanted)
            encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        chunks.append(_joined(encoded, separator))
        added = len(chunks[-1])
        chars, tokens, have = chars + sum(map(len, batch)), tokens + added, have + added
        position += len(batch)
        if advance is not None:
            advance(min(added, max(cap - have + added, 0)))
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int32)
    whole = whole and position == len(documents)
    return (stream if whole else stream[:cap]), whole


#: Sizing the batches of ``tokenize_head``: characters per token assumed before any is measured
#: (low, so that the first batch rather falls short than tokenises far past the cap), the slack
#: over the measured ratio, and the fewest characters worth a call of the tokenizer.
FIRST_CHARS_PER_TOKEN = 2.0
BATCH_MARGIN = 1.2
MIN_BATCH_CHARS = 16_384
#: A document longer than this (and than twice what a cap still needs) has only its head tokenised.
LONG_DOCUMENT_CHARS = 65_536


def _batch(documents: list[str], first: int, wanted_chars: int) -> list[str]:
    """Documents from ``first`` on, until they hold ``wanted_chars`` characters (at least one;
    at most TOKENIZE_CHUNK; never a long one, which ``head_ids`` takes alone)."""
    end, chars = first, 0
    while end < len(documents) and chars < wanted_chars and end - first < TOKENIZE_CHUNK:
        if end > first and len(documents[end]) > LONG_DOCUMENT_CHARS:
            break
        chars += len(documents[end])
        end += 1
    return documents[first:end]


def head_ids(tokenizer, document: str, need: int) -> tuple[list[int], bool]:
    """The first ``need`` token ids of ``document`` tokenised whole, from the tokenisation of its
    head only; and whether the whole document was tokenised (then every id is given).

    A tokenizer may merge across the cut, so a head's last tokens are not trusted: the head is
    cut at a whitespace, then a head twice as long is tokenised, and the first ``need`` ids are
    taken once both heads agree on them (else both grow). Two cuts that far apart giving the same
    ids leave only a tokenizer whose early tokens depend on text thousands of characters later to
    differ from the whole document; one that splits text at whitespace before merging never does.
    """
    length = max(MIN_BATCH_CHARS, need * 8)
    while True:
        if length >= len(document):
            return tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"], True
        short = _encode_head(tokenizer, document, length)
        if len(short) > need:
            long = _encode_head(tokenizer, document, 2 * length)
            if long[:need] == short[:need]:
                return long[:need], False
        length *= 2


def _encode_head(tokenizer, document: str, length: int) -> list[int]:
    """The ids of ``document``'s first ``length`` characters, cut back to the last whitespace."""
    if length >= len(document):
        return tokenizer(document, add_special_tokens=False, verbose=False)["input_ids"]
    cut = max(document.rfind(space, 0, length) for space in (" ", "\n", "\t"))
    head = document[:cut] if cut > length // 2 else document[:length]
    return tokenizer(head, add_special_tokens=False, verbose=False)["input_ids"]


def _separator(tokenizer) -> int | None:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id


@dataclass(frozen=True)
class TokenizerRef:
    """A tokenizer that may not be loaded yet (``LoadedModel.tokenizer`` is loaded on first use):
    its ``key`` (``tokenization_key``) names its token streams in the cache, and ``load()`` gives
    it, called only when a text must be tokenised or decoded."""

    key: str
    load: Callable[[], Any]

    @classmethod
    def of(cls, tokenizer) -> "TokenizerRef":
        """A tokenizer (or a TokenizerRef, as it is) as a TokenizerRef."""
        return tokenizer if isinstance(tokenizer, TokenizerRef) else cls(tokenization_key(tokenizer), lambda: tokenizer)


def tokenization_key(tokenizer) -> str:
    """What decides a text's tokens: the whole tokenizer definition (normaliser and pre-tokeniser
    too, which the vocabulary's fingerprint does not cover) and the document separator."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    payload = f"{TOKENS_FORMAT}|{type(tokenizer).__name__}|{_separator(tokenizer)}|{definition}"
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@timed("tokenise")
def cached_stream(tokenizer, documents: list[str], text_hash: str, description: str = "tokenizing",
                  cap: int | None = None) -> np.ndarray:
    """The token stream of ``documents`` (whose text hash is ``text_hash``): read memory-mapped
    from the cache, else tokenised once and written there. Where the cache cannot be written (a
    read-only or full disk), the stream is tokenised in memory for this run. ``tokenizer`` may be
    a ``TokenizerRef``: it is loaded only when the stream is not cached.

    With ``cap``, its first ``cap`` tokens (``capped_stream``): the same ids, without tokenising
    the documents past the cap.
    """
    if cap:
        return capped_stream(tokenizer, documents, text_hash, cap, description)
    from memdec_core.errors import DiskError
    from memdec_core.runtime.progress import log
    from memdec_core.store.cache_dir import entry_lock

    ref = TokenizerRef.of(tokenizer)
    path = _stream_path(ref, text_hash)
    try:
        with entry_lock(path):
            stream = _read_stream(path)
            if stream is None:
                _write_stream(path, tokenize_with_progress(ref.load(), documents, description))
                stream = _read_stream(path)
            return stream
    except DiskError as error:
        log(f"token streams are not cached ({error}); tokenizing in memory")
        return tokenize_with_progress(ref.load(), documents, description)


def capped_stream(tokenizer, documents: list[str], text_hash: str, cap: int,
                  description: str = "tokenizing") -> np.ndarray:
    """``cached_stream(...)[:cap]``, tokenising only the documents the cap needs (``tokenize_head``).

    The whole split's stream, where the cache holds it, is read and cut. Otherwise the head is
    kept under a key of its own that names the cap, so that it never stands for the whole split
    (nor the whole split for it); a cap that takes every document whole writes the whole split's
    entry instead, which any cap then reads.
    """
    from memdec_core.errors import DiskError
    from memdec_core.runtime.progress import log
    from memdec_core.store.cache_dir import entry_lock

    ref = TokenizerRef.of(tokenizer)
    whole_path, head_path = _stream_path(ref, text_hash), _stream_path(ref, text_hash, cap)
    try:
        with entry_lock(whole_path):
            stream = _read_stream(whole_path)
        if stream is not None:
            return stream[:cap]
        with entry_lock(head_path):
            stream = _read_stream(head_path, expected=cap)
            if stream is not None:
                return stream
            stream, whole = tokenize_head_with_progress(ref.load(), documents, cap, description)
            if whole:  # every document was tokenised: this is the whole split's stream
                with entry_lock(whole_path):
                    _write_stream(whole_path, stream)
                return _read_stream(whole_path)[:cap]
            _write_stream(head_path, stream)
            return _read_stream(head_path, expected=cap)
    except DiskError as error:
        log(f"token streams are not cached ({error}); tokenizing in memory")
        return tokenize_head_with_progress(ref.load(), documents, cap, description)[0][:cap]


def _stream_path(ref: TokenizerRef, text_hash: str, cap: int | None = None) -> Path:
    """Where the cache keeps a split's stream, or (``cap``) its first ``cap`` tokens only."""
    from memdec_core.store.artifacts import cached_artifact, content_key

    parts = ("tokens", text_hash, ref.key) + (({"first": cap},) if cap else ())
    return cached_artifact("tokens", content_key(*parts) + ".npy")


def tokenize_head_with_progress(tokenizer, documents: list[str], cap: int,
                                description: str) -> tuple[np.ndarray, bool]:
    from memdec_core.runtime.progress import progress_bar

    with progress_bar(description, cap, "tokens") as advance:
        return tokenize_head(tokenizer, documents, cap, advance)


def tokenize_with_progress(tokenizer, documents: list[str], description: str) -> np.ndarray:
    from memdec_core.runtime.progress import progress_bar

    with progress_bar(description, len(documents), "documents") as advance:
        return tokenize_documents(tokenizer, documents, advance)


def _read_stream(path: Path, expected: int | None = None) -> np.ndarray | None:
    """The cached stream, memory-mapped; None when there is none or it is damaged (it is removed:
    it is rebuilt from the text). A head holds exactly ``expected`` tokens."""
    from memdec_core.runtime.progress import log

    if not path.is_file():
        return None
    try:
        stream = np.load(path, mmap_mode="r", allow_pickle=False)
        if stream.dtype == np.int32 and stream.ndim == 1 and expected in (None, len(stream)):
            return stream
    except (OSError, ValueError):
        pass
    log(f"damaged token cache {path}: tokenizing again")
    path.unlink(missing_ok=True)
    return None


def _write_stream(path: Path, stream: np.ndarray) -> None:
    """Write ``stream`` beside ``path`` and rename it into place (never a half-written file)."""
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


def cut_corpus(corpus: Corpus, max_tokens: dict[str, int | None]) -> Corpus:
    """``corpus`` with each capped split cut to whole documents within ``cap × BYTES_PER_TOKEN``
    bytes (``documents_within``): one text for every tokenizer, where token caps would cut each
    tokenizer's stream at another place. Splits without a cap are kept whole."""
    documents = {split: documents_within(docs, max_tokens[split] * BYTES_PER_TOKEN) if max_tokens.get(split) else docs
                 for split, docs in corpus.documents.items()}
    return Corpus(corpus.name, documents)


def documents_within(documents: list[str], budget: int) -> list[str]:
    """The documents in order, whole, while their UTF-8 bytes stay within ``budget``; where the
    first alone passes it, its head within the budget, cut between words."""
    kept, used = [], 0
    for document in documents:
        size = len(document.encode())
        if used + size > budget:
            break
        kept.append(document)
        used += size
    if kept or not documents:
        return kept
    head = documents[0].encode()[:budget].decode("utf-8", errors="ignore")  # no character cut in two
    cut = max(head.rfind(space) for space in (" ", "\n", "\t"))
    return [head[:cut].rstrip() if cut > 0 else head]


def text_bytes(documents: list[str]) -> int:
    """The UTF-8 bytes of a split's documents (the separators count none, as in bits per byte)."""
    return sum(len(document.encode()) for document in documents)


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
    """Tokenise every split; each must hold at least one full window of ``context`` tokens.
    ``tokenizer`` may be a ``TokenizerRef`` (loaded only for a split not cached)."""
    max_tokens = max_tokens or {}
    streams = {}
    for split in SPLITS:
        stream = cached_stream(tokenizer, corpus.documents[split], corpus.hashes[split], f"tokenizing {split}",
                               cap=max_tokens.get(split))
        if len(stream) < context:
            raise DataError(f"corpus {corpus.name!r}: the {split} split has {len(stream)} tokens, "
                            f"shorter than one window of {context}; use a smaller --context or more text")
        streams[split] = stream
    return TokenizedCorpus(corpus, streams, tokenizer_fingerprint)
