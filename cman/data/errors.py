"""The one exception type for bad data: it always names the item and the file."""

from __future__ import annotations

import re

_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")  # e.g. PIL's "cannot identify image file <_io.BytesIO ...>"


def scrub_reprs(message: str, replacement: str = "the upload") -> str:
    """`message` without object reprs and their memory addresses (they tell a client nothing, an attacker a little)."""
    return _REPR.sub(replacement, message)


class DataError(ValueError):
    """A data item that cannot be used: says which item, which file, and what is wrong."""

    def __init__(self, message: str, *, item_id: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.item_id = item_id
        self.path = path


class LimitError(DataError):
    """An input over a configured size limit (duration, pixels, characters): a client sends something smaller."""
