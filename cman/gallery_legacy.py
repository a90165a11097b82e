"""Index directories of earlier releases, moved into the gallery store the first time they are opened.

Read-only. The earlier layout was ``INDEX_DIR/<modality>/CURRENT -> v-N/`` (or the files directly in
``<modality>/``): ``index.faiss``, ``items.json``, ``index.json``; ``INDEX_DIR/wal/seg-*.log`` (online adds, one
``<crc32 hex> <json>`` line each, JSON ``{"record", "vectors": {modality: base64 float32}}``); ``INDEX_DIR/media/``
(files of added items). :func:`import_legacy` reads all of it into the store (records, vectors, media as blobs) in
batches that are each one transaction and idempotent, so an interrupted conversion completes on the next open. The
old files are then no longer read; they may be deleted.
"""

from __future__ import annotations

import base64
import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from cman.gallery_db import GalleryDB
from cman.modality import Modality

logger = logging.getLogger(__name__)

DONE_KEY = "legacy_import_done"
BATCH = 1000


def legacy_parts(index_dir: Path) -> list[Path]:
    """The earlier layout's snapshot directories and log segments under ``index_dir``."""
    snapshots = [index_dir / m.value for m in Modality if _snapshot_dir(index_dir / m.value) is not None]
    return snapshots + sorted((index_dir / "wal").glob("seg-*.log"))


def _snapshot_dir(directory: Path) -> Path | None:
    if (directory / "CURRENT").exists():
        return directory / (directory / "CURRENT").readlink()
    return directory if (directory / "index.json").is_file() else None


def read_snapshot(directory: Path) -> tuple[list[dict[str, Any]], np.ndarray]:
    """(records, vectors) of an earlier release's snapshot directory. # vectors: (n, dim)"""
    files = _snapshot_dir(directory)
    if files is None:
        raise FileNotFoundError(f"{directory} holds no index of an earlier release (no CURRENT or index.json)")
    try:
        items = json.loads((files / "items.json").read_text(encoding="utf-8"))
        index = faiss.read_index(str(files / "index.faiss"))
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{files} is not a readable index of an earlier release ({err}); rebuild it") from err
    if isinstance(index, faiss.IndexIVF):
        index.make_direct_map()
    vectors = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d), np.float32)
    if len(items) != len(vectors):
        raise ValueError(f"{files}: {len(items)} items but {len(vectors)} vectors; rebuild the index")
    return items, vectors


def read_log(index_dir: Path) -> Iterator[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """(record, vectors) of every complete line with a good checksum in the earlier write-ahead log."""
    for segment in sorted((index_dir / "wal").glob("seg-*.log")):
        data = segment.read_bytes()
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            crc, _, body = line.partition(b" ")
            try:
                if int(crc, 16) != zlib.crc32(body):
                    continue
                entry = json.loads(body)
                vectors = {m: np.frombuffer(base64.b64decode(v), dtype="<f4") for m, v in entry["vectors"].items()}
            except (ValueError, KeyError, TypeError):
                continue
            yield entry["record"], vectors


def _gather(index_dir: Path) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
    entries: dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]] = {}
    for modality in Modality:
        if _snapshot_dir(index_dir / modality.value) is None:
            continue
        records, vectors = read_snapshot(index_dir / modality.value)
        for record, vector in zip(records, vectors, strict=True):
            entries.setdefault(str(record["id"]), (record, {}))[1][modality.value] = vector
    for record, vectors in read_log(index_dir):
        entries.setdefault(str(record["id"]), (record, {}))[1].update(vectors)
    return entries


def _media(index_dir: Path, record: dict[str, Any]) -> dict[str, tuple[str, bytes]]:
    """Files of an added item (relative paths under media/) become blobs; dataset paths stay references."""
    out = {}
    for kind in ("image", "audio"):
        name = record.get(f"{kind}_path")
        if name and not Path(name).is_absolute() and (index_dir / name).is_file():
            out[kind] = (name, (index_dir / name).read_bytes())
    return out


def import_legacy(index_dir: Path, db: GalleryDB) -> int:
    """Move an earlier release's index directory into ``db`` (once); returns the items stored by this call."""
    if db.get_meta(DONE_KEY) is not None or not legacy_parts(index_dir):
        return 0
    entries = list(_gather(index_dir).values())
    stored = 0
    for start in range(0, len(entries), BATCH):
        batch = [(record, vectors, _media(index_dir, record)) for record, vectors in entries[start : start + BATCH]]
        stored += db.put_many(batch)
    db.set_meta(DONE_KEY, str(len(entries)))
    logger.info("moved %d items of the earlier index directory %s into the gallery store", len(entries), index_dir)
    return stored
