"""Writing an index directory that `cman serve` loads: item records and vectors into the gallery store
(`serve.gallery_store`, default `sqlite:///INDEX_DIR/gallery.db`), the cached FAISS snapshots replicas start from,
and `index_meta.json` (what was indexed; its `root` is where the Retriever may read media files from).

Shared by `cman index` (jobs/build_index.py) and the Python `Gallery.save`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cman.config import ServeConfig
from cman.data.dataset import Item
from cman.gallery_db import Entry, GalleryDB
from cman.gallery_mirror import CACHE_DIR, GalleryMirror, IndexPolicy, open_store
from cman.gallery_schema import redact
from cman.modality import Modality

logger = logging.getLogger(__name__)

CHUNK = 1000  # items per store transaction


def item_record(item: Item, root: Path) -> dict[str, Any]:
    """What the index stores per item: id, group, caption and absolute media paths (absent fields are left out).

    A media path outside the dataset `root` (an absolute path or `..` in a manifest) is an error: the Retriever
    serves these files, so a manifest must not be able to point it anywhere else.
    """
    record: dict[str, Any] = {"id": item.id, "group": item.group}
    if item.caption is not None:
        record["caption"] = item.caption
    for kind, path in (("image", item.image_path), ("audio", item.audio_path)):
        if path is None:
            continue
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(root):
            raise ValueError(f"item {item.id}: {kind} file {path} is outside the dataset root {root}; fix the manifest")
        record[f"{kind}_path"] = str(resolved)
    return record


def gallery_entries(galleries: dict[Modality, tuple[np.ndarray, list[dict]]]) -> list[Entry]:
    """One store entry (record, vectors by modality, no media) per item id of `galleries` (modality -> (vectors,
    records))."""
    entries: dict[str, tuple[dict, dict[str, np.ndarray], None]] = {}
    for modality, (vectors, records) in galleries.items():
        for vector, record in zip(vectors, records, strict=True):
            entries.setdefault(str(record["id"]), (record, {}, None))[1][modality.value] = vector
    return list(entries.values())


def put_entries(db: GalleryDB, entries: Sequence[Entry]) -> int:
    """Store `entries` in transactions of CHUNK items (unchanged items stay, changed ones are replaced); returns how
    many changed."""
    return sum(db.put_many(entries[i : i + CHUNK]) for i in range(0, len(entries), CHUNK))


def write_snapshots(db: GalleryDB, out_dir: Path, kind: str, serve: ServeConfig | None = None) -> dict[str, int]:
    """Load the store and write the FAISS snapshots of `kind` (`auto`: by size, from `serve`) into `out_dir/cache`;
    returns the items per modality."""
    serve = serve or ServeConfig()
    dims = db.dims
    policy = IndexPolicy(kind, serve.index_auto_exact_max, serve.index_auto_ann)
    mirror = GalleryMirror(db, list(dims), next(iter(dims.values()), None), policy, out_dir / CACHE_DIR)
    mirror.load()
    mirror.save_snapshots()
    return mirror.counts()


def write_gallery(
    out_dir: Path, galleries: dict[Modality, tuple[np.ndarray, list[dict]]], kind: str, serve: ServeConfig | None
) -> dict[str, int]:
    """Store every item with its vector per modality (`galleries`: modality -> (vectors, records)), then write the
    FAISS snapshots. Returns the items per modality of `galleries`."""
    serve = serve or ServeConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    db = open_store(out_dir, serve.gallery_store)
    try:
        changed = put_entries(db, gallery_entries(galleries))
        write_snapshots(db, out_dir, kind, serve)
    finally:
        db.close()
    logger.info("gallery store %s: %d items changed", redact(db.url), changed)
    return {m.value: len(records) for m, (_, records) in galleries.items()}


def write_meta(
    out_dir: Path,
    checkpoint: Path | None,
    split: str | None,
    root: Path | None,
    kind: str,
    n_items: int,
    counts: dict[str, int],
    serve: ServeConfig | None = None,
    **extra: Any,
) -> None:
    """`out_dir/index_meta.json`: the checkpoint, store, split (None for a folder or a Python-built gallery), the
    dataset root (the Retriever serves media files under it only), index kind and counts."""
    store = (serve or ServeConfig()).gallery_store
    meta = {
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "gallery_store": redact(store) if store else "sqlite:///INDEX_DIR/gallery.db",
        "split": split,
        "root": str(root) if root is not None else None,
        "kind": kind,
        "items_in_split": n_items,
        "counts": counts,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **extra,
    }
    tmp = out_dir / ".index_meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out_dir / "index_meta.json")
