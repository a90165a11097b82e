"""The seed layout of a dataset on disk: `<root>/metadata/<split>_metadata.json`.

Light (no torch): the CLI checks a path with it before importing the data pipeline.
"""

from __future__ import annotations

from pathlib import Path

from cman.data.errors import DataError


def metadata_path(root: str | Path, split: str) -> Path:
    return Path(root) / "metadata" / f"{split}_metadata.json"


def existing_metadata(root: str | Path, split: str) -> Path:
    """`metadata_path(root, split)`, or a DataError naming it when there is no such file."""
    path = metadata_path(root, split)
    if not path.is_file():
        raise DataError(
            f"metadata file {path} not found (expected the seed layout <root>/metadata/<split>_metadata.json)",
            path=str(path),
        )
    return path
