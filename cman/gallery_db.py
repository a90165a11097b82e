"""The gallery's source of truth: items, their vectors per modality, media and a change sequence, in a database.

``sqlite:///<path>`` (the default: embedded, WAL journal, ``synchronous=FULL``) or ``postgresql://...`` (clusters),
through SQLAlchemy Core. An add or a delete is one transaction and returns only after its commit; a failed one
leaves nothing behind (an added item's media are rows of the same transaction). Writers are serialised (SQLite's
write lock, taken at ``BEGIN IMMEDIATE``; a transaction-scoped advisory lock in PostgreSQL), so change sequence
numbers commit in order: a reader that has applied every change up to n never later meets a change below n.

Writes are idempotent: an add carries a digest of its content; the same id with the same digest returns the stored
item (``created`` False), another digest raises :class:`ItemConflict`. A delete of a missing id returns False.
An item's ``seq`` (the sequence number of its add) is its FAISS label in every replica's index.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import resource
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection, make_url

from cman.gallery_schema import (
    CHANGE_BATCH,
    PG_LOCK_KEY,
    SCHEMA_VERSION,
    Q,
    items_t,
    make_engine,
    meta_t,
    metadata,
    redact,
    vectors_t,
)

logger = logging.getLogger(__name__)

Entry = tuple[dict[str, Any], dict[str, np.ndarray], "dict[str, tuple[str, bytes]] | None"]


class ItemConflict(ValueError):
    """Another item (different content) already has this id."""


class StoreError(RuntimeError):
    """The store failed (I/O error, connection lost, locked too long); the change may or may not be stored."""

    status = 503


class StoreFullError(StoreError):
    """The store is out of space; the change was not stored."""

    status = 507


@dataclass
class StoredItem:
    id: str
    seq: int
    record: dict[str, Any]
    digest: str
    modalities: list[str] = field(default_factory=list)


@dataclass
class Change:
    """One entry of the change sequence; an add whose item was deleted since has ``record`` None."""

    seq: int
    op: str
    item_id: str
    record: dict[str, Any] | None = None
    vectors: dict[str, np.ndarray] = field(default_factory=dict)


def content_digest(record: dict[str, Any], parts: dict[str, bytes] | None = None) -> str:
    """SHA-256 of an item's content: its record (JSON, keys sorted) and named byte strings (media, vectors)."""
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
    for name in sorted(parts or {}):
        digest.update(f"\0{name}\0".encode() + hashlib.sha256(parts[name]).digest())
    return digest.hexdigest()


def vector_bytes(vector: np.ndarray, what: str) -> bytes:
    v = np.asarray(vector, dtype="<f4")
    if v.ndim != 1 or v.size == 0 or not np.isfinite(v).all():
        raise ValueError(f"{what} must be a 1-d vector of finite floats, got shape {v.shape}")
    return v.tobytes()


def _is_full(err: BaseException) -> bool:
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return True
    if getattr(err, "sqlite_errorname", "") == "SQLITE_FULL" or "disk is full" in str(err):
        return True
    return getattr(err, "sqlstate", None) == "53100"  # PostgreSQL disk_full


def _sqlite_space_exhausted(url: str, err: BaseException) -> bool:
    """An SQLite write error ("disk I/O error": SQLite reports only ENOSPC as "full", not EFBIG) while the disk or
    the process's file size limit (RLIMIT_FSIZE) has less than 1 MiB left for the database files."""
    if not getattr(err, "sqlite_errorname", "").startswith("SQLITE_IOERR"):
        return False
    path = Path(make_url(url).database or "")
    try:
        free = os.statvfs(path.parent).f_bavail * os.statvfs(path.parent).f_frsize
        biggest = max((p.stat().st_size for p in path.parent.glob(path.name + "*")), default=0)
    except OSError:
        return False
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return free < 1 << 20 or (limit != resource.RLIM_INFINITY and biggest + (1 << 20) > limit)


@contextmanager
def store_errors(what: str, url: str) -> Iterator[None]:
    """Turn database and OS errors into StoreFullError (507) or StoreError (503) with a message for the client."""
    try:
        yield
    except (sa.exc.DBAPIError, sa.exc.TimeoutError, OSError) as err:
        orig = getattr(err, "orig", None) or err
        detail = str(orig).strip().splitlines()[0][:200] if str(orig).strip() else type(orig).__name__
        logger.warning("gallery store %s failed while %s: %s", redact(url), what, detail)
        if _is_full(orig) or _sqlite_space_exhausted(url, orig):
            raise StoreFullError(
                f"the gallery store is out of space while {what} ({detail}); nothing was stored: free space, then retry"
            ) from err
        raise StoreError(
            f"the gallery store failed while {what} ({type(orig).__name__}: {detail}); the change may or may not be "
            "stored: retry the same request (adds and deletes are idempotent)"
        ) from err


class GalleryDB:
    """One gallery in one database (SQLite file or PostgreSQL database); safe to share between threads and
    processes. Reads see committed changes only."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self._dims: dict[str, int] = {}
        self._write_lock = threading.Lock()
        with store_errors("opening the store", url):
            self.store_id = self._init_schema()

    def __repr__(self) -> str:
        return f"GalleryDB({redact(self.url)!r})"

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A connection for single-statement reads: no transaction around them (each sees what is committed)."""
        with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction holding the gallery's write lock; commits on exit (the acknowledgement point)."""
        try:
            # this process's writers queue here (fairly) rather than in SQLite's busy handler, which sleeps up to 100 ms
            with self._write_lock, self.engine.connect() as conn:
                conn.execution_options(sqlite_begin="BEGIN IMMEDIATE")
                with conn.begin():
                    if self.dialect == "postgresql":
                        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(PG_LOCK_KEY)))
                    yield conn
        except sa.exc.DBAPIError:
            if self.dialect == "sqlite":
                self._overwrite_failed_frames()
            raise

    def _overwrite_failed_frames(self) -> None:
        """After a failed SQLite write: a commit whose fsync failed is not visible, but its frames may sit in the WAL
        file, where crash recovery would find them and bring the change back. A small write now takes their place
        (WAL frames chain by checksum: one overwritten frame ends the chain)."""
        try:
            # this process's writers queue here (fairly) rather than in SQLite's busy handler, which sleeps up to 100 ms
            with self._write_lock, self.engine.connect() as conn:
                conn.execution_options(sqlite_begin="BEGIN IMMEDIATE")
                with conn.begin():
                    conn.execute(sa.delete(meta_t).where(meta_t.c.key == "last_failed_write"))
                    conn.execute(sa.insert(meta_t).values(key="last_failed_write", value=uuid.uuid4().hex))
        except sa.exc.DBAPIError as err:
            logger.warning("could not overwrite the WAL frames of a failed write (%s)", err)

    def _init_schema(self) -> str:
        with self._write() as conn:
            metadata.create_all(conn)
            rows = dict(conn.execute(sa.select(meta_t.c.key, meta_t.c.value)).all())
            if "store_id" not in rows:
                rows = {"store_id": uuid.uuid4().hex, "schema_version": SCHEMA_VERSION}
                conn.execute(sa.insert(meta_t), [{"key": k, "value": v} for k, v in rows.items()])
            if rows.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"{redact(self.url)}: gallery schema {rows.get('schema_version')!r} is not supported")
            self._dims = {k[4:]: int(v) for k, v in rows.items() if k.startswith("dim:")}
            return rows["store_id"]

    def _check_dims(self, conn: Connection, blobs: dict[str, bytes]) -> None:
        """Every modality keeps one vector size: the first add of a modality records it."""
        for modality, blob in blobs.items():
            dim = len(blob) // 4
            if modality not in self._dims:
                stored = conn.execute(sa.select(meta_t.c.value).where(meta_t.c.key == f"dim:{modality}")).scalar()
                if stored is None:
                    conn.execute(sa.insert(meta_t).values(key=f"dim:{modality}", value=str(dim)))
                self._dims[modality] = int(stored or dim)
            if self._dims[modality] != dim:
                raise ValueError(f"{modality} vector must have {self._dims[modality]} floats, got {dim}")

    # ---- writes ------------------------------------------------------------------------------------------------------
    def add(
        self,
        item_id: str,
        record: dict[str, Any],
        vectors: dict[str, np.ndarray],
        media: dict[str, tuple[str, bytes]] | None = None,
        digest: str | None = None,
    ) -> tuple[StoredItem, bool]:
        """Store an item: ``record`` (JSON), one vector per modality, ``media`` kind -> (name, bytes). Returns the
        stored item and whether this call created it; raises ItemConflict if the id holds other content."""
        item_id = str(item_id)
        record = {**record, "id": item_id}
        blobs = {m: vector_bytes(v, f"{m} vector of item {item_id!r}") for m, v in vectors.items()}
        if not blobs:
            raise ValueError(f"item {item_id!r} has no vector: it would join no gallery")
        digest = digest or content_digest(record, {**blobs, **{k: d for k, (_, d) in (media or {}).items()}})
        with store_errors(f"adding item {item_id!r}", self.url), self._write() as conn:
            found = self._existing(conn, [item_id]).get(item_id)
            if found is not None:
                return self._same_or_conflict(conn, item_id, found, digest), False
            self._check_dims(conn, blobs)
            seq = self._insert(conn, item_id, record, blobs, media or {}, digest)
        return StoredItem(item_id, seq, record, digest, sorted(blobs)), True

    def _same_or_conflict(self, conn: Connection, item_id: str, found: tuple[int, str], digest: str) -> StoredItem:
        if found[1] != digest:
            raise ItemConflict(f"id {item_id!r} already holds a different item; delete it first or choose another id")
        stored = self._get(conn, item_id)
        assert stored is not None  # read in the same transaction
        return stored

    def _insert(
        self,
        conn: Connection,
        item_id: str,
        record: dict[str, Any],
        blobs: dict[str, bytes],
        media: dict[str, tuple[str, bytes]],
        digest: str,
    ) -> int:
        seq = int(conn.execute(Q.add_change, {"item_id": item_id}).scalar_one())
        text = json.dumps(record, ensure_ascii=False)
        conn.execute(Q.insert_item, {"id": item_id, "seq": seq, "record": text, "digest": digest})
        conn.execute(Q.insert_vectors, [{"item_id": item_id, "modality": m, "vector": b} for m, b in blobs.items()])
        if media:
            rows = [{"item_id": item_id, "kind": k, "name": n, "data": d} for k, (n, d) in media.items()]
            conn.execute(Q.insert_media, rows)
        return seq

    def put_many(self, entries: Sequence[Entry]) -> int:
        """Store ``(record, vectors, media or None)`` entries in one transaction (``cman index``, conversions): an
        item already stored with the same content is left alone, one with other content (a new checkpoint, a changed
        caption) is replaced (a delete and an add in the change sequence). Returns how many items changed."""
        prepared = []
        for record, vectors, media in entries:
            blobs = {m: vector_bytes(v, f"{m} vector of item {record['id']!r}") for m, v in vectors.items()}
            parts = {**blobs, **{k: d for k, (_, d) in (media or {}).items()}}
            prepared.append((str(record["id"]), record, blobs, media or {}, content_digest(record, parts)))
        changed = 0
        with store_errors(f"storing {len(prepared)} items", self.url), self._write() as conn:
            existing = self._existing(conn, [p[0] for p in prepared])
            for item_id, record, blobs, media, digest in prepared:
                if item_id in existing:
                    if existing[item_id][1] == digest:
                        continue
                    self._delete(conn, item_id)
                self._check_dims(conn, blobs)
                self._insert(conn, item_id, record, blobs, media, digest)
                changed += 1
        return changed

    def get_meta(self, key: str) -> str | None:
        with store_errors("reading the store's settings", self.url), self._read() as conn:
            return conn.execute(sa.select(meta_t.c.value).where(meta_t.c.key == key)).scalar()

    def set_meta(self, key: str, value: str) -> None:
        with store_errors("writing the store's settings", self.url), self._write() as conn:
            conn.execute(sa.delete(meta_t).where(meta_t.c.key == key))
            conn.execute(sa.insert(meta_t).values(key=key, value=value))

    @property
    def dims(self) -> dict[str, int]:
        """modality -> vector size, for every modality that has held a vector."""
        with store_errors("reading the store's settings", self.url), self._read() as conn:
            rows = conn.execute(sa.select(meta_t.c.key, meta_t.c.value).where(meta_t.c.key.like("dim:%"))).all()
        self._dims.update({key[4:]: int(value) for key, value in rows})
        return dict(self._dims)

    def delete(self, item_id: str) -> bool:
        """Remove an item (record, vectors, media); False if there is none with this id."""
        with store_errors(f"deleting item {item_id!r}", self.url), self._write() as conn:
            if not self._existing(conn, [str(item_id)]):
                return False
            self._delete(conn, str(item_id))
        return True

    def _delete(self, conn: Connection, item_id: str) -> None:
        for statement in (*Q.delete_rows, Q.delete_item, Q.delete_change):
            conn.execute(statement, {"item_id": item_id})

    # ---- reads -------------------------------------------------------------------------------------------------------
    @staticmethod
    def _existing(conn: Connection, ids: list[str]) -> dict[str, tuple[int, str]]:
        found: dict[str, tuple[int, str]] = {}
        for start in range(0, len(ids), 500):
            rows = conn.execute(Q.existing, {"ids": ids[start : start + 500]})
            found.update({row.id: (int(row.seq), row.digest) for row in rows})
        return found

    @staticmethod
    def _get(conn: Connection, item_id: str) -> StoredItem | None:
        rows = conn.execute(Q.get, {"item_id": item_id}).all()
        if not rows:
            return None
        row = rows[0]
        modalities = sorted(r.modality for r in rows if r.modality is not None)
        return StoredItem(row.id, int(row.seq), json.loads(row.record), row.digest, modalities)

    def get(self, item_id: str) -> StoredItem | None:
        with store_errors(f"reading item {item_id!r}", self.url), self._read() as conn:
            return self._get(conn, str(item_id))

    def media(self, item_id: str, kind: str) -> tuple[str, bytes] | None:
        """(name, bytes) of an item's stored image or audio, or None."""
        with store_errors(f"reading the {kind} of item {item_id!r}", self.url), self._read() as conn:
            row = conn.execute(Q.media, {"item_id": item_id, "kind": kind}).first()
        return None if row is None else (row.name, bytes(row.data))

    def vectors_of(self, item_ids: list[str]) -> dict[str, dict[str, np.ndarray]]:
        """id -> modality -> the stored vector, for those of ``item_ids`` in the store."""
        query = sa.select(vectors_t.c.item_id, vectors_t.c.modality, vectors_t.c.vector)
        out: dict[str, dict[str, np.ndarray]] = {}
        with store_errors("reading item vectors", self.url), self._read() as conn:
            for row in conn.execute(query.where(vectors_t.c.item_id.in_(item_ids))):
                out.setdefault(row.item_id, {})[row.modality] = np.frombuffer(row.vector, "<f4").astype(np.float32)
        return out

    def page(self, offset: int, limit: int) -> tuple[int, list[StoredItem]]:
        """The number of items, and ``limit`` items from ``offset`` in the order they were added (stable: a new item
        goes last, a deleted one leaves the order of the others as it was)."""
        with store_errors("listing items", self.url), self._read() as conn:
            total = int(conn.execute(sa.select(sa.func.count()).select_from(items_t)).scalar() or 0)
            rows = conn.execute(sa.select(items_t).order_by(items_t.c.seq).offset(offset).limit(limit)).all()
            found: dict[str, list[str]] = {row.id: [] for row in rows}
            if found:
                query = sa.select(vectors_t.c.item_id, vectors_t.c.modality).where(vectors_t.c.item_id.in_(list(found)))
                for row in conn.execute(query):
                    found[row.item_id].append(row.modality)
        return total, [StoredItem(r.id, int(r.seq), json.loads(r.record), r.digest, sorted(found[r.id])) for r in rows]

    def head(self) -> int:
        """The newest change's sequence number (0 for an empty store)."""
        with store_errors("reading the change sequence", self.url), self._read() as conn:
            return int(conn.execute(Q.head).scalar() or 0)

    def count(self) -> int:
        with store_errors("counting items", self.url), self._read() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(items_t)).scalar() or 0)

    def changes(self, after: int) -> tuple[list[Change], bool]:
        """The changes with seq > ``after`` in order, at most CHANGE_BATCH of them (adds with their record and
        vectors), and whether more may follow."""
        with store_errors("reading changes", self.url), self._read() as conn:
            count, last = conn.execute(Q.window, {"after": after}).one()
            if not count:
                return [], False  # the common case, one indexed read: nothing new
            rows = conn.execute(Q.changes, {"after": after, "last": last}).all()
        out: dict[int, Change] = {}
        for row in rows:
            change = out.setdefault(row.seq, Change(int(row.seq), row.op, row.item_id))
            if row.record is not None and change.record is None:
                change.record = json.loads(row.record)
            if row.vector is not None:
                change.vectors[row.modality] = np.frombuffer(row.vector, dtype="<f4")
        return list(out.values()), count >= CHANGE_BATCH

    def scan(self, modalities: Sequence[str]) -> tuple[int, dict[str, Gathered]]:
        """Every stored vector of ``modalities`` with its item's label and record, read in one transaction, and
        the sequence number that read covers."""
        query = (
            sa.select(items_t.c.seq, items_t.c.record, vectors_t.c.modality, vectors_t.c.vector)
            .join(vectors_t, vectors_t.c.item_id == items_t.c.id)
            .where(vectors_t.c.modality.in_(list(modalities)))
        )  # no ORDER BY: sorting 2 KB rows in the database cost more than sorting labels here (Gathered.vectors)
        gathered = {m: Gathered() for m in modalities}
        with store_errors("loading the gallery", self.url), self.engine.connect() as conn:
            conn.execution_options(sqlite_begin="BEGIN")  # one snapshot for both statements
            if self.dialect == "postgresql":
                conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                head = int(conn.execute(Q.head).scalar() or 0)
                for row in conn.execution_options(stream_results=True, yield_per=10_000).execute(query):
                    gathered[row.modality].put(int(row.seq), row.record, row.vector)
        return head, gathered

    def close(self) -> None:
        self.engine.dispose()


class Gathered:
    """Labels, records and vectors of one modality read by :meth:`GalleryDB.scan`, collected in chunks."""

    CHUNK = 65_536

    def __init__(self) -> None:
        self.labels: list[int] = []
        self.records: list[dict[str, Any]] = []
        self._chunks: list[np.ndarray] = []
        self._pending: list[bytes] = []

    def put(self, label: int, record: str, vector: bytes) -> None:
        self.labels.append(label)
        self.records.append(json.loads(record))
        self._pending.append(bytes(vector))
        if len(self._pending) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            dim = len(self._pending[0]) // 4
            self._chunks.append(np.frombuffer(b"".join(self._pending), dtype="<f4").reshape(-1, dim))
            self._pending = []

    def vectors(self, dim: int) -> np.ndarray:
        """The vectors in label order (``labels`` and ``records`` are put in that order too). # (n, dim) float32"""
        self._flush()
        vectors = np.concatenate(self._chunks) if self._chunks else np.zeros((0, dim), np.float32)
        self._chunks = []
        order = np.argsort(np.asarray(self.labels, dtype=np.int64), kind="stable")
        if np.any(order != np.arange(len(order))):
            self.labels = [self.labels[i] for i in order]
            self.records = [self.records[i] for i in order]
            vectors = vectors[order]
        return vectors
