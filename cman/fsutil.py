"""Durable writes: fsync of a file or a directory (a rename or a new file is durable once its directory is synced).

Imports no other cman module, so any of them (and serve_app) can use it without an import circle.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Flush `path`'s data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush `path`'s directory entries (creations, renames, removals) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
