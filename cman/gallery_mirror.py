"""A replica's in-memory view of the gallery store: one FAISS :class:`GalleryIndex` per modality, kept in sync.

``load`` starts from the cached snapshots (``<cache>/<modality>.gix``, each tagged with the store's id and the change
sequence it covers) and applies the changes after that sequence; without usable snapshots it reads every vector from
the store. ``catch_up`` applies the changes committed since (each Retriever replica calls it on a timer and after
its own writes). The store is the source of truth: snapshots are only a start-up cache, written in the background
and replaced whole by one rename, never deleted under a reader.

``IndexPolicy`` decides each index's kind (``serve.index_kind``; ``auto``: exact up to ``index_auto_exact_max`` items,
IVF above) and is asked again as the gallery grows or shrinks: ``rebuild`` makes the new index from the stored
vectors (training an IVF on them) outside the lock, then catches it up and swaps it in at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cman.gallery_db import Change, GalleryDB
from cman.gallery_legacy import import_legacy, legacy_parts
from cman.gallery_schema import DEFAULT_FILE, default_url
from cman.index import GalleryIndex, auto_params, write_snapshot
from cman.modality import Modality

logger = logging.getLogger(__name__)

CACHE_DIR = "cache"


@dataclass
class IndexPolicy:
    """Which FAISS index a gallery of n items gets (``serve.index_kind`` and its ``auto`` settings)."""

    kind: str = "flat"  # "auto" | "flat" | "ivf" | "hnsw"
    exact_max: int = 100_000
    ann: str = "ivf"
    hysteresis: float = 0.9  # back to exact only below this share of exact_max (no flapping at the boundary)

    def params(self, n: int) -> dict[str, Any]:
        return auto_params(n, self.exact_max, self.ann) if self.kind == "auto" else {"kind": self.kind}

    def rebuild_params(self, index: GalleryIndex) -> dict[str, Any] | None:
        """Parameters of the index to build instead of ``index``, or None if it is still the right one."""
        if index.kind == "hnsw" and index.hidden_count > max(1000, len(index) // 10):
            return index.params  # HNSW cannot drop removed vectors: a rebuild does
        if self.kind != "auto":
            return None
        want = self.params(len(index))
        if want["kind"] == "flat" and index.kind != "flat" and len(index) > self.hysteresis * self.exact_max:
            return None
        if want["kind"] == index.kind and want.get("nlist", index.nlist) == index.nlist:
            return None
        return want


def snapshot_path(cache_dir: Path, modality: str) -> Path:
    return cache_dir / f"{modality}.gix"


def remove_orphaned_snapshots(cache_dir: Path, min_age_s: float = 600.0) -> list[Path]:
    """Remove the temporary files of snapshot writes that never finished (a replica killed while writing one leaves
    ``.<modality>.gix.XXXX``, as large as the index). A file modified within ``min_age_s`` may still be written by a
    live replica and is kept. Returns what was removed."""
    removed: list[Path] = []
    if not cache_dir.is_dir():
        return removed
    now = time.time()
    for path in cache_dir.glob(".*.gix.*"):
        try:
            if now - path.stat().st_mtime >= min_age_s:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue  # another replica removed it first
    if removed:
        logger.info("removed %d unfinished snapshot file(s) from %s", len(removed), cache_dir)
    return removed


class GalleryMirror:
    """The FAISS indexes of one gallery store in this process; thread-safe (searches use the indexes directly)."""

    def __init__(
        self,
        db: GalleryDB,
        modalities: Sequence[str] = (),
        dim: int | None = None,
        policy: IndexPolicy | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.db = db
        self.policy = policy or IndexPolicy()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.dims = {**{m: dim for m in modalities if dim is not None}, **db.dims}
        self.indexes: dict[Modality, GalleryIndex] = {}
        self.seq = 0  # every change up to this one is applied
        self.snapshot_seq = 0  # the change sequence the snapshots on disk cover
        self._lock = threading.RLock()

    # ---- loading -----------------------------------------------------------------------------------------------------
    def load(self) -> str:
        """Fill the indexes: from the snapshots + later changes if usable, else from the store. Returns which."""
        if self.cache_dir is not None:
            remove_orphaned_snapshots(self.cache_dir)
        source = "snapshot" if self._load_snapshots() else "store"
        if source == "store":
            self.seq, gathered = self.db.scan(list(self.dims))
            for name, found in gathered.items():
                vectors = found.vectors(self.dims[name])  # sorts labels and records too
                index = GalleryIndex(self.dims[name], **self.policy.params(len(found.labels)))
                index.add(vectors, found.records, found.labels, copy_items=False)
                self.indexes[Modality(name)] = index
        applied = self.catch_up()
        logger.info("gallery loaded from the %s (+%d changes): %s", source, applied, self.counts())
        return source

    def _load_snapshots(self) -> bool:
        if self.cache_dir is None or not self.dims:
            return False
        head, found = self.db.head(), {}
        if not all(snapshot_path(self.cache_dir, name).is_file() for name in self.dims):
            return False
        try:
            for name in self.dims:
                tag = GalleryIndex.read_tag(snapshot_path(self.cache_dir, name))
                if tag.get("store_id") != self.db.store_id or not 0 <= tag.get("seq", -1) <= head:
                    return False
                found[name] = tag["seq"]
            indexes = {Modality(m): GalleryIndex.load(snapshot_path(self.cache_dir, m)) for m in self.dims}
        except (OSError, ValueError) as err:
            logger.warning("gallery snapshots in %s not used (%s): loading from the store", self.cache_dir, err)
            return False
        if self.policy.kind != "auto" and any(ix.kind != self.policy.kind for ix in indexes.values()):
            return False
        # snapshots written at different moments: replay from the oldest (applying a change twice changes nothing)
        self.indexes, self.seq = indexes, min(found.values())
        self.snapshot_seq = self.seq
        return True

    # ---- catching up -------------------------------------------------------------------------------------------------
    def catch_up(self) -> int:
        """Apply every change committed after ``seq``; returns how many."""
        applied, more = 0, True
        with self._lock:
            while more:
                batch, more = self.db.changes(self.seq)
                if batch:
                    self._apply(self.indexes, batch)
                    self.seq = batch[-1].seq
                    applied += len(batch)
        return applied

    def _apply(self, indexes: dict[Modality, GalleryIndex], changes: list[Change]) -> None:
        for change in changes:
            if change.op == "delete":
                for index in indexes.values():
                    index.remove([change.item_id])
                continue
            for name, vector in change.vectors.items():  # an add (its vectors are gone if deleted since)
                modality = Modality(name)
                if modality not in indexes:
                    self.dims.setdefault(name, len(vector))
                    indexes[modality] = GalleryIndex(len(vector), **self.policy.params(0))
                index = indexes[modality]
                if index.label(change.item_id) == change.seq:
                    continue  # already held (a snapshot or a scan newer than this change)
                index.remove([change.item_id])
                index.add(vector[None], [change.record], [change.seq])

    # ---- reads -------------------------------------------------------------------------------------------------------
    def record(self, item_id: str) -> dict[str, Any] | None:
        for index in list(self.indexes.values()):
            found = index.get(item_id)
            if found is not None:
                return found
        return None

    def counts(self) -> dict[str, int]:
        return {m.value: len(ix) for m, ix in list(self.indexes.items())}

    # ---- rebuilds and snapshots --------------------------------------------------------------------------------------
    def rebuild_needed(self) -> dict[Modality, dict[str, Any]]:
        """Modalities whose index the policy would now build differently, with the parameters it would use."""
        wanted = {m: self.policy.rebuild_params(ix) for m, ix in list(self.indexes.items())}
        return {m: params for m, params in wanted.items() if params is not None}

    def rebuild(self, modality: Modality, params: dict[str, Any]) -> GalleryIndex:
        """Build ``modality``'s index anew from the stored vectors (slow part, no lock held), bring it up to
        ``seq`` and swap it in (searches see the old index or the new one)."""
        head, gathered = self.db.scan([modality.value])
        found = gathered[modality.value]
        dim = self.dims[modality.value]
        vectors = found.vectors(dim)  # sorts labels and records too
        fresh = GalleryIndex(dim, **params)
        fresh.add(vectors, found.records, found.labels, copy_items=False)
        del vectors
        del gathered, found
        with self._lock:
            after, more = head, True
            while after < self.seq and more:
                batch, more = self.db.changes(after)
                batch = [c for c in batch if c.seq <= self.seq]
                self._apply({modality: fresh}, batch)
                after = batch[-1].seq if batch else self.seq
            self.indexes[modality] = fresh
        logger.info("%s index rebuilt as %s (%d items)", modality.value, params, len(fresh))
        return fresh

    def save_snapshots(self) -> int:
        """Write every index to the cache, tagged with the store and ``seq``; returns the sequence written."""
        if self.cache_dir is None:
            return self.snapshot_seq
        with self._lock:  # one consistent cut: copies of every index at one sequence number
            seq = self.seq
            frozen = {m: ix.frozen({"store_id": self.db.store_id, "seq": seq}) for m, ix in self.indexes.items()}
        for modality, copy in frozen.items():
            write_snapshot(copy, snapshot_path(self.cache_dir, modality.value))
        self.snapshot_seq = seq
        return seq

    def snapshot_due(self, min_changes: int = 10_000, share: float = 0.1) -> bool:
        """Whether enough changes arrived since the snapshots (max(min_changes, share of the gallery)) to rewrite
        them: a replica starting later then applies few changes, and the cost of a rewrite stays proportional."""
        if self.cache_dir is None or not self.indexes:
            return False
        size = sum(len(ix) for ix in list(self.indexes.values()))
        due = max(min_changes, share * size)
        if self.seq - self.snapshot_seq < due:
            return False
        try:  # another replica sharing this cache may have written newer snapshots
            tag = GalleryIndex.read_tag(snapshot_path(self.cache_dir, next(iter(self.indexes)).value))
            if tag.get("store_id") == self.db.store_id and tag.get("seq", 0) > self.snapshot_seq:
                self.snapshot_seq = min(int(tag["seq"]), self.seq)
        except (OSError, ValueError):
            pass
        return self.seq - self.snapshot_seq >= due


def open_store(index_dir: str | Path, url: str | None = None, create: bool = True) -> GalleryDB:
    """The gallery store of an index directory (``url``, default ``sqlite:///INDEX_DIR/gallery.db``); an index
    directory of an earlier release is moved into it on first open. ``create=False``: an index directory without
    a gallery (neither a store nor an earlier release's files) is a FileNotFoundError."""
    index_dir = Path(index_dir)
    if url is None and not (index_dir / DEFAULT_FILE).is_file():
        if not index_dir.is_dir() or not (create or legacy_parts(index_dir)):
            raise FileNotFoundError(
                f"{index_dir} holds no gallery index (no {DEFAULT_FILE}); build one with `cman index`"
            )
    db = GalleryDB(url or default_url(index_dir))
    import_legacy(index_dir, db)
    return db


def open_gallery(index_dir: str | Path, url: str | None = None) -> dict[Modality, GalleryIndex]:
    """Load the gallery of an index directory into FAISS indexes (what a Retriever replica serves), for in-process
    search and tests: snapshots + later changes, or the store."""
    db = open_store(index_dir, url, create=False)
    try:
        mirror = GalleryMirror(db, policy=IndexPolicy("auto"), cache_dir=Path(index_dir) / CACHE_DIR)
        mirror.load()
        return mirror.indexes
    finally:
        db.close()


def item_vectors(index: GalleryIndex) -> dict[str, np.ndarray]:
    """id -> vector of every item of ``index`` (tests and tools)."""
    return dict(zip(index.ids, index.vectors(), strict=True))
