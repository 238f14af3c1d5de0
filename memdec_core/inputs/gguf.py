"""The header of a GGUF file, checked before a reader is given it.

A file named ``.gguf`` that starts with the magic but holds garbage after it would otherwise fail
deep in the reader with whatever it tripped on ("'utf-8' codec can't decode byte 0xff"). memdec
walks the header itself (the GGUF format: magic, version, tensor count, then typed key/value
metadata; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) and says in one line that
the file is not a valid GGUF file, and where. The tensors are not read: a valid header whose
model the reader cannot load is the reader's to explain.
"""

from __future__ import annotations

import functools
import mmap
import struct
from pathlib import Path

from memdec_core.errors import ModelError

MAGIC = b"GGUF"
#: The versions whose header this walker knows (v1, counted in 32 bits, is left to the reader).
VERSIONS = (2, 3)
#: Metadata value types of a fixed width, by type id, as struct formats (little-endian).
FIXED = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


class _Invalid(Exception):
    """What is wrong with the header, and at which byte."""


def check_gguf_file(path: Path) -> None:
    """ModelError naming ``path`` when its header is not GGUF: no magic, an unknown version, or
    metadata that runs past the end, holds text that is not UTF-8 or a value of no known type."""
    stat = path.stat()
    _check(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _check(path: str, size: int, mtime_ns: int) -> None:  # size and mtime: a rewritten file is checked again
    try:
        with open(path, "rb") as handle:
            if size < len(MAGIC) or handle.read(len(MAGIC)) != MAGIC:
                raise _Invalid("it does not start with the GGUF magic bytes")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _walk_header(data)
    except _Invalid as error:
        raise ModelError(f"{path} is not a valid GGUF file: {error}") from None
    except OSError as error:
        raise ModelError(f"cannot read {path}: {error.strerror or error}") from error


def _walk_header(data) -> None:
    reader = _Reader(data, len(MAGIC))
    version = reader.number("<I")
    if version == 1:
        return  # an old GGUF, counted in 32 bits: the reader says it does not take it
    if version not in VERSIONS:
        raise _Invalid(f"version {version}, where GGUF files are v{' or v'.join(map(str, VERSIONS))}")
    reader.number("<Q")  # tensors: their table follows the metadata
    for _ in range(reader.count(minimum_bytes=12)):
        reader.text("a metadata key")
        reader.value(reader.kind())


class _Reader:
    """Reads the header's fields from ``data``, refusing to run past its end."""

    def __init__(self, data, position: int):
        self.data, self.position = data, position

    def number(self, form: str):
        width = struct.calcsize(form)
        if self.position + width > len(self.data):
            raise _Invalid(f"it ends inside its header (byte {len(self.data)})")
        (value,) = struct.unpack_from(form, self.data, self.position)
        self.position += width
        return value

    def count(self, minimum_bytes: int) -> int:
        """A u64 count of items that take at least ``minimum_bytes`` each, checked to fit the file."""
        at, count = self.position, self.number("<Q")
        if count * minimum_bytes > len(self.data) - self.position:
            raise _Invalid(f"it ends before the {count:,} items counted at byte {at} (cut short, or not GGUF)")
        return count

    def text(self, what: str) -> str:
        at, length = self.position, self.count(minimum_bytes=1)
        raw = self.data[self.position:self.position + length]
        self.position += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Invalid(f"{what} at byte {at} is not UTF-8 text") from None

    def kind(self) -> int:
        """A value's type id, checked to be one GGUF defines."""
        at, kind = self.position, self.number("<I")
        if kind not in FIXED and kind not in (STRING, ARRAY):
            raise _Invalid(f"a metadata value of unknown type {kind} at byte {at}")
        return kind

    def value(self, kind: int) -> None:
        if kind in FIXED:
            self.number(FIXED[kind])
        elif kind == STRING:
            self.text("a metadata string")
        else:  # an array: its items' type, their count, the items
            item_kind = self.kind()
            if item_kind in FIXED:
                width = struct.calcsize(FIXED[item_kind])
                count = self.count(minimum_bytes=width)
                self.position += width * count
                return
            for _ in range(self.count(minimum_bytes=8 if item_kind == STRING else 12)):
                self.value(item_kind)
