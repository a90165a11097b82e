"""The one exception type for bad data: it always names the item and the file."""

from __future__ import annotations


class DataError(ValueError):
    """A data item that cannot be used: says which item, which file, and what is wrong."""

    def __init__(self, message: str, *, item_id: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.item_id = item_id
        self.path = path


class LimitError(DataError):
    """An input over a configured size limit (duration, pixels, characters): a client sends something smaller."""
