"""The errors memdec raises for things a user can fix.

Library code raises these; the CLI turns them into one line on stderr and exit status 1.
"""

from __future__ import annotations

import difflib


def shorten(text: str, width: int = 60) -> str:
    """``text`` cut to ``width`` characters, "…" marking the cut: an error names a value the user gave,
    and that value may be megabytes long (a file's contents, a YAML alias bomb)."""
    return text if len(text) <= width else text[:width - 1] + "…"


class MemdecError(Exception):
    """Base class of every error a user can act on (bad input, missing file, bad artifact)."""


class UnknownComponentError(MemdecError, LookupError):
    """A name that no registered component (or domain, or model) answers to."""

    def __init__(self, kind: str, name: str, available: list[str], hint: str = ""):
        self.kind, self.name, self.available, self.hint = kind, name, sorted(available), hint
        super().__init__(self._message())

    def _message(self) -> str:
        message = f"unknown {self.kind} {shorten(repr(self.name))}"
        close = difflib.get_close_matches(self.name, self.available, n=1, cutoff=0.5)
        if close:
            message += f"; did you mean {close[0]!r}?"
        shown = ", ".join(self.available) if self.available else "none"
        return f"{message} (available: {shown}){'; ' + self.hint if self.hint else ''}"


class DuplicateComponentError(MemdecError):
    """Two plugins registered a component of the same kind under the same name."""


class ConfigError(MemdecError, ValueError):
    """A setting outside its allowed range or of the wrong kind."""


class DataError(MemdecError):
    """A corpus that is missing, empty, too short or malformed."""


class ModelError(MemdecError):
    """A model that cannot be loaded or is not supported."""


class ArtifactError(MemdecError):
    """A saved artifact that is missing, corrupt or does not match what it is used with."""


class PluginError(MemdecError):
    """A plugin that is broken in a way that stops memdec from working."""


class DiskError(ArtifactError):
    """A write the disk refused: full, read-only, over quota or failing. Nothing half-written is left."""


class ResultError(MemdecError):
    """A result that is not a number (NaN or infinite), named by the component that produced it."""
