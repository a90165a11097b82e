"""A Retriever replica's gallery: the store (`cman.gallery_db`, the source of truth) and this replica's FAISS mirror
of it (`cman.gallery_mirror`).

An add or a delete is one store transaction; it is acknowledged after its commit, then this replica catches up at
once (so it finds its own writes). A background thread catches up on the other replicas' changes every
`serve.gallery_sync_s`, and, one job at a time, rebuilds an index the `index_kind` policy now wants built differently
(`auto`: exact → IVF as the gallery grows, trained on the stored vectors, swapped in whole) and rewrites the cached
snapshots once enough changes arrived since. Store failures become client-readable errors: 507 out of space, 503
anything else (retry: writes are idempotent), 409 another item under the id, 404 a delete of a missing id.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cman.gallery_db import ItemConflict, StoredItem, StoreError
from cman.gallery_mirror import CACHE_DIR, GalleryMirror, IndexPolicy, open_store
from cman.gallery_schema import redact
from cman.index import GalleryIndex
from cman.modality import Modality
from serve_app.errors import RequestError

logger = logging.getLogger(__name__)

RETRY_JOB_S = 60  # a failed rebuild or snapshot write is tried again after this long


@contextmanager
def http_errors() -> Iterator[None]:
    """Store errors as RequestErrors with their HTTP status."""
    try:
        yield
    except ItemConflict as err:
        raise RequestError(409, str(err)) from None
    except StoreError as err:
        raise RequestError(err.status, str(err)) from None


class GalleryStore:
    """The gallery of one store, mirrored into this process's FAISS indexes and kept in sync in the background."""

    def __init__(
        self,
        index_dir: str | os.PathLike[str],
        url: str | None,
        modalities: list[str],
        dim: int,
        policy: IndexPolicy | None = None,
        sync_s: float = 0.5,
    ) -> None:
        self.index_dir = Path(index_dir)
        self.db = open_store(self.index_dir, url)
        stored = {m: d for m, d in self.db.dims.items() if m in modalities and d != dim}
        if stored:
            self.db.close()
            raise ValueError(
                f"the gallery store {redact(self.db.url)} holds {stored} vectors, this model makes {dim}: index the "
                "gallery again with this checkpoint (`cman index`) or serve another index directory / gallery_store"
            )
        self.mirror = GalleryMirror(self.db, modalities, dim, policy, cache_dir=self.index_dir / CACHE_DIR)
        self.source = self.mirror.load()
        self.sync_s = sync_s
        self._stop = threading.Event()
        self._job: threading.Thread | None = None
        self._job_failed_at = -float("inf")
        self._failing = False
        if self.source == "store":  # the next replica to start reads the snapshots instead
            self._start_job("snapshot", self.mirror.save_snapshots)
        self._syncer = threading.Thread(target=self._sync_loop, name="gallery-sync", daemon=True)
        self._syncer.start()

    @property
    def indexes(self) -> dict[Modality, GalleryIndex]:
        return self.mirror.indexes

    def counts(self) -> dict[str, int]:
        return self.mirror.counts()

    # ---- background ----------------------------------------------------------------------------------------------
    def _sync_loop(self) -> None:
        while not self._stop.wait(self.sync_s):
            self.sync()
            idle = self._job is None or not self._job.is_alive()
            if idle and time.monotonic() - self._job_failed_at > RETRY_JOB_S:
                self._maintain()

    def sync(self) -> int:
        """Apply what was committed since the last look (by any replica); 0 if the store cannot be read now."""
        try:
            applied = self.mirror.catch_up()
        except Exception as err:  # noqa: BLE001 - keep serving searches from memory; the next period retries
            if not self._failing:
                logger.warning(
                    "gallery sync failed (searches go on from memory; retrying every %g s): %s", self.sync_s, err
                )
            self._failing = True
            return 0
        if self._failing:
            logger.info("gallery sync works again")
        self._failing = False
        return applied

    def _maintain(self) -> None:
        todo = self.mirror.rebuild_needed()
        if todo:

            def rebuild() -> None:
                for modality, params in todo.items():
                    self.mirror.rebuild(modality, params)
                self.mirror.save_snapshots()

            self._start_job("rebuild", rebuild)
        elif self.mirror.snapshot_due():
            self._start_job("snapshot", self.mirror.save_snapshots)

    def _start_job(self, name: str, job: Callable[[], Any]) -> None:
        def run() -> None:
            try:
                job()
            except Exception:  # a failed rebuild or snapshot loses nothing: the store holds every item
                self._job_failed_at = time.monotonic()
                logger.exception("gallery %s failed; the store keeps every item; retried in %d s", name, RETRY_JOB_S)

        self._job = threading.Thread(target=run, name=f"gallery-{name}", daemon=True)
        self._job.start()

    def wait_for_jobs(self, timeout: float | None = None) -> None:
        if self._job is not None:
            self._job.join(timeout)

    # ---- items -----------------------------------------------------------------------------------------------------
    def existing(self, item_id: str) -> StoredItem | None:
        with http_errors():
            return self.db.get(item_id)

    def add(
        self,
        item_id: str,
        record: dict[str, Any],
        vectors: dict[str, np.ndarray],
        media: dict[str, tuple[str, bytes]] | None = None,
        digest: str | None = None,
    ) -> tuple[StoredItem, bool]:
        """Store the item (acknowledged once committed), then show it in this replica's indexes."""
        for name, vector in vectors.items():
            index = self.mirror.indexes.get(Modality(name))
            if index is None or np.shape(vector) != (index.dim,) or not np.isfinite(vector).all():
                raise RequestError(400, f"no {name} gallery of this vector size, or a vector that is not finite")
        with http_errors():
            stored, created = self.db.add(item_id, record, vectors, media, digest)
        self.sync()
        return stored, created

    def delete(self, item_id: str) -> bool:
        with http_errors():
            deleted = self.db.delete(item_id)
        self.sync()
        return deleted

    def media(self, item_id: str, kind: str) -> tuple[str, bytes] | None:
        with http_errors():
            return self.db.media(item_id, kind)

    # ---- reads for the /v1 API (straight from the store, the source of truth) ----------------------------------------
    def vectors(self, item_ids: list[str]) -> dict[str, dict[str, np.ndarray]]:
        """id -> modality -> the item's stored vector, for those of `item_ids` in the store."""
        with http_errors():
            return self.db.vectors_of(item_ids)

    def page(self, offset: int, limit: int) -> tuple[int, list[StoredItem]]:
        """The number of items, and `limit` items from `offset` in the order they were added."""
        with http_errors():
            return self.db.page(offset, limit)

    def stop(self) -> None:
        """End the background sync (without waiting)."""
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        self.wait_for_jobs()
        self.db.close()
