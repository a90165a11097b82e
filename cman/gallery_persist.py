"""What `cman.Gallery` needs to save and read a gallery: store entries of its in-memory indexes (media blobs copied
from the store it was loaded from), media names, and the `root` its media files lie under."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cman.gallery_db import Entry
    from cman.index import GalleryIndex

logger = logging.getLogger(__name__)

Pending = dict[str, tuple[dict, dict[str, np.ndarray], dict[str, tuple[str, bytes]]]]
_MAGIC = (
    (b"\x89PNG", ".png"),
    (b"\xff\xd8", ".jpg"),
    (b"GIF8", ".gif"),
    (b"BM", ".bmp"),
    (b"fLaC", ".flac"),
    (b"OggS", ".ogg"),
    (b"ID3", ".mp3"),
    (b"\xff\xfb", ".mp3"),
)


def media_suffix(data: bytes) -> str:
    """The file extension of encoded media by its magic bytes (the Retriever answers media by it); `.bin` if unknown."""
    if data.startswith(b"RIFF"):
        return ".webp" if data[8:12] == b"WEBP" else ".wav"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), ".bin")


def encode_skipping(
    model: Any, modality: Any, values: list[Any], batch_size: int, progress: bool, skip_bad: bool
) -> list[np.ndarray | None]:
    """`cman.embedding.encode` of `values`, batch by batch; with `skip_bad`, a batch with an undecodable medium is
    embedded again one by one and that medium's row is None (logged)."""
    from tqdm import tqdm

    from cman.data.errors import DataError
    from cman.embedding import encode

    step = max(1, int(batch_size))
    out: list[np.ndarray | None] = []
    for start in tqdm(range(0, len(values), step), desc=f"embedding {modality.value}", disable=not progress):
        chunk = values[start : start + step]
        try:
            out.extend(encode(model, modality, chunk, batch_size=step))
            continue
        except DataError:
            if not skip_bad:
                raise
        for value in chunk:
            try:
                out.append(encode(model, modality, value))
            except DataError as err:
                logger.warning("skipped: %s", err)
                out.append(None)
    return out


def read_blob(directory: Path, url: str | None, item_id: str, kind: str) -> bytes | None:
    """The bytes of an item's stored `kind` blob in the gallery store of `directory`, or None."""
    from cman.gallery_mirror import open_store

    db = open_store(directory, url, create=False)
    try:
        found = db.media(item_id, kind)
    finally:
        db.close()
    return None if found is None else found[1]


def entries_of(
    indexes: dict[str, GalleryIndex], pending: Pending, source: Path | None, source_url: str | None
) -> list[Entry]:
    """One store entry (record, vectors by modality, media blobs) per item of `indexes`; the blobs of items loaded
    from a store are read from it (`source`)."""
    records: dict[str, dict[str, Any]] = {}
    vectors: dict[str, dict[str, np.ndarray]] = {}
    for name, index in indexes.items():
        for record, vector in zip(index.records(), index.vectors(), strict=True):
            records.setdefault(str(record["id"]), record)
            vectors.setdefault(str(record["id"]), {})[name] = vector
    db = None
    try:
        entries = []
        for item_id, record in records.items():
            media = dict(pending[item_id][2]) if item_id in pending else {}
            for kind in ("image", "audio"):
                name = record.get(f"{kind}_path")
                if name and not Path(name).is_absolute() and kind not in media and source is not None:
                    db = db or _open(source, source_url)
                    blob = db.media(item_id, kind)
                    if blob is not None:
                        media[kind] = blob
            entries.append((record, vectors[item_id], media or None))
        return entries
    finally:
        if db is not None:
            db.close()


def _open(directory: Path, url: str | None) -> Any:
    from cman.gallery_mirror import open_store

    return open_store(directory, url, create=False)


def previous_meta(directory: Path) -> dict[str, Any]:
    """`directory/index_meta.json` as written before, or {}."""
    try:
        meta = json.loads((directory / "index_meta.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def stored_root(directory: Path, indexes: Iterable[GalleryIndex]) -> Path | None:
    """The folder holding every media file the gallery names (and the root `directory`'s index_meta.json named
    before): the Retriever serves files under it only. None if the gallery names no file."""
    old = previous_meta(directory).get("root")
    folders = {old} if old else set()
    for index in indexes:
        for record in index.records():
            for kind in ("image_path", "audio_path"):
                if record.get(kind) and Path(record[kind]).is_absolute():
                    folders.add(str(Path(record[kind]).parent))
    if not folders:
        return None
    root = Path(os.path.commonpath(sorted(folders)))
    if root == Path(root.anchor):
        logger.warning("the gallery's media files lie in unrelated folders: the service may read files under %s", root)
    return root
