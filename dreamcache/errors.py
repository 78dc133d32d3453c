"""One exception family for bad input: entry points (the CLI, the jobs, Serve) catch it alone and map its
``kind`` to exit 2, an error row or an HTTP status. Anything else is a bug and stays a traceback."""

from __future__ import annotations

from typing import Literal

Kind = Literal["invalid", "not_found", "unreadable", "unsafe_id", "incompatible", "too_large", "unsupported",
               "unavailable", "conflict"]


class DreamCacheError(Exception):
    """Bad input, named in the message; ``kind`` says which (see :data:`Kind`)."""

    kind: Kind = "invalid"

    def __init__(self, message: str, kind: Kind | None = None) -> None:
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class InvalidValue(DreamCacheError, ValueError):
    """A bad argument or setting value (a ValueError too, for callers that catch that). Raise it where a value
    from a user (a flag, a config field, a line of a file) is refused; a bare ValueError is left for bugs."""
