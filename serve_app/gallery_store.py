"""Durable online adds for a gallery directory: write-ahead log + in-memory indexes + background compaction.

`add` appends the item to the log (`cman.gallery_log`) and fsyncs it before the in-memory indexes change, so an
acknowledged item survives a crash and a failed write leaves nothing behind (a retry is not a "duplicate"). The cost
of an add does not grow with the gallery: one small fsynced append and one in-memory insert.

Several processes (Retriever replicas) may share one directory: appends hold the log's `flock`, and each process
first reads the lines others appended (`sync`), so ids stay unique across replicas. Each replica calls `sync` on a
timer; an add acknowledged by one replica is searchable on another after at most one timer period plus the read.

Compaction (every `compact_every` adds, in a background thread, and on `close`): start a new log segment, save every
modality's index (a consistent copy is taken under the index lock; writing happens outside it, so searches wait only
for the copy), then delete the segments that the snapshots now hold once they are older than `retain_s` (replicas
still reading them have that long; one that falls further behind reloads from the snapshots).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cman import gallery_log
from cman.index import GalleryIndex, load_gallery
from cman.modality import Modality

logger = logging.getLogger(__name__)


class DuplicateItemError(ValueError):
    """An item with this id is already in the gallery (added before, possibly through another replica)."""


class GalleryStore:
    """The gallery of one index directory, kept durable under concurrent adds from threads and processes."""

    def __init__(
        self,
        index_dir: str | os.PathLike[str],
        gallery: dict[Any, GalleryIndex],
        offsets: dict[str, int] | None = None,
        params: dict[str, Any] | None = None,
        compact_every: int = 1000,
        retain_s: float = 60.0,
    ) -> None:
        self.index_dir = Path(index_dir)
        self.log_dir = self.index_dir / gallery_log.LOG_DIR
        self.indexes: dict[Modality, GalleryIndex] = {Modality(m): ix for m, ix in gallery.items()}
        self.offsets = dict(offsets or {})
        self.params = dict(params or {})
        self.compact_every, self.retain_s = compact_every, retain_s
        self.adds_since_compaction = 0
        self._lock = threading.Lock()  # one add / sync at a time in this process
        self._compactor: threading.Thread | None = None
        self._last_sync = time.monotonic()
        self.log_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def open(cls, index_dir: str | os.PathLike[str], modalities: list[str], dim: int, **kwargs: Any) -> GalleryStore:
        """Load snapshots + log of `index_dir`; empty indexes (GalleryIndex `params`) for `modalities` it lacks."""
        params = kwargs.pop("params", {})
        gallery, offsets = load_gallery(index_dir, modalities, dim, **params)
        return cls(index_dir, gallery, offsets, params=params, **kwargs)

    # ---- reads -----------------------------------------------------------------------------------------------------
    def __contains__(self, item_id: str) -> bool:
        return any(item_id in index for index in self.indexes.values())

    def record(self, item_id: str) -> dict[str, Any] | None:
        for index in self.indexes.values():
            if item_id in index:
                return index.get(item_id)
        return None

    def counts(self) -> dict[str, int]:
        return {m.value: len(ix) for m, ix in self.indexes.items()}

    # ---- writes ----------------------------------------------------------------------------------------------------
    def add(
        self, vectors: dict[str, np.ndarray], record: dict[str, Any], before_log: Callable[[], None] | None = None
    ) -> list[str]:
        """Log `record` with one vector per target modality (fsynced), then add it in memory; returns the targets.

        `before_log` runs under the lock after the duplicate check (the Retriever writes the item's media there, so
        a losing duplicate never overwrites them). Raises DuplicateItemError if the id is taken (here or by another
        process sharing the log); any failure before the log line is written leaves the gallery unchanged.
        """
        item_id = str(record["id"])
        targets = [Modality(m) for m in vectors]
        for m in targets:
            if m not in self.indexes:
                raise ValueError(f"no {m.value} index in this gallery; targets are {sorted(self.counts())}")
            vector = np.asarray(vectors[m.value], dtype=np.float32)
            if vector.shape != (self.indexes[m].dim,) or not np.isfinite(vector).all():
                raise ValueError(f"{m.value} vector must be {self.indexes[m].dim} finite floats, got {vector.shape}")
        line = gallery_log.encode(record, {m.value: vectors[m.value] for m in targets})
        with self._lock, gallery_log.locked(self.log_dir):
            self._catch_up()
            if item_id in self:
                raise DuplicateItemError(f"duplicate id {item_id!r}: an item with this id is already in the gallery")
            if before_log is not None:
                before_log()
            gallery_log.append(self.log_dir, line)
            newest = gallery_log.segments(self.log_dir)[-1].name
            self.offsets[newest] = self.offsets.get(newest, 0) + len(line)
            for m in targets:
                self.indexes[m].add(np.asarray(vectors[m.value], dtype=np.float32)[None], [record])
            self.adds_since_compaction += 1
        if self.adds_since_compaction >= self.compact_every:
            self.compact_in_background()
        return [m.value for m in targets]

    def sync(self) -> int:
        """Apply what other processes appended to the log since the last look; returns the items applied."""
        with self._lock:
            return self._catch_up()

    def _catch_up(self) -> int:
        gone = set(self.offsets) - {p.name for p in gallery_log.segments(self.log_dir)}
        for name in gone:  # compacted away: what was read from them is in the snapshots now
            del self.offsets[name]
        lagging = gone and time.monotonic() - self._last_sync > self.retain_s / 2
        self._last_sync = time.monotonic()
        if lagging:  # a segment may have been deleted before this process read all of it
            return self._reload()
        return gallery_log.replay(
            self.indexes, self.log_dir, self.offsets, lambda dim: GalleryIndex(dim, **self.params)
        )

    def _reload(self) -> int:
        logger.warning("log segments of %s were compacted before this replica read them; reloading", self.index_dir)
        gallery, self.offsets = load_gallery(self.index_dir, [m.value for m in self.indexes], None, **self.params)
        before = sum(len(ix) for ix in self.indexes.values())
        self.indexes.update(gallery)
        return sum(len(ix) for ix in self.indexes.values()) - before

    # ---- compaction ------------------------------------------------------------------------------------------------
    def compact_in_background(self) -> None:
        if self._compactor is not None and self._compactor.is_alive():
            return
        self._compactor = threading.Thread(target=self._compact_logged, name="gallery-compaction", daemon=True)
        self._compactor.start()

    def _compact_logged(self) -> None:
        try:
            self.compact()
        except Exception:  # a failed compaction loses nothing: the log still holds every item
            logger.exception("compaction of %s failed; the write-ahead log keeps every item", self.index_dir)

    def compact(self) -> bool:
        """Fold the log into new snapshots. Returns False if another process is compacting right now."""
        fd = os.open(self.log_dir / "compact.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            with self._lock, gallery_log.locked(self.log_dir):
                self._catch_up()
                closed = gallery_log.start_segment(self.log_dir)
                self.adds_since_compaction = 0
            for modality, index in list(self.indexes.items()):
                index.save(self.index_dir / modality.value)  # clones under the index lock, writes outside it
            cutoff = time.time() - self.retain_s
            for segment in closed:
                if segment.stat().st_mtime < cutoff:
                    segment.unlink(missing_ok=True)
            return True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def close(self) -> None:
        """Wait for a running compaction; the log already holds everything acknowledged."""
        if self._compactor is not None:
            self._compactor.join()
