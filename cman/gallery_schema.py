"""The gallery store's schema, hot-path statements and engines (SQLite with WAL + synchronous=FULL, PostgreSQL through
psycopg); `cman.gallery_db` is the store itself.

Tables: `gallery_meta` (store id, schema version, vector size per modality), `gallery_changes` (the change sequence:
seq, "add" | "delete", item id), `gallery_items` (id, the seq of its add = its FAISS label, record JSON, content
digest), `gallery_vectors` (one float32 vector per item and modality), `gallery_media` (blobs of added items).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url

SCHEMA_VERSION = "1"
PG_LOCK_KEY = 0x434D414E  # "CMAN": pg_advisory_xact_lock key serialising the gallery's writers
SEQ = sa.BigInteger().with_variant(sa.Integer, "sqlite")  # INTEGER PRIMARY KEY AUTOINCREMENT in SQLite
DEFAULT_FILE = "gallery.db"

metadata = sa.MetaData()
meta_t = sa.Table(
    "gallery_meta", metadata, sa.Column("key", sa.String(64), primary_key=True), sa.Column("value", sa.Text)
)
changes_t = sa.Table(
    "gallery_changes",
    metadata,
    sa.Column("seq", SEQ, primary_key=True, autoincrement=True),
    sa.Column("op", sa.String(8), nullable=False),  # "add" | "delete"
    sa.Column("item_id", sa.String(128), nullable=False),
    sqlite_autoincrement=True,  # never reuse a number
)
items_t = sa.Table(
    "gallery_items",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False, unique=True),
    sa.Column("record", sa.Text, nullable=False),  # JSON: id, caption?, group?, image_path?, audio_path?
    sa.Column("digest", sa.String(64), nullable=False),
)
vectors_t = sa.Table(
    "gallery_vectors",
    metadata,
    sa.Column("item_id", sa.String(128), primary_key=True),
    sa.Column("modality", sa.String(16), primary_key=True),
    sa.Column("vector", sa.LargeBinary, nullable=False),  # float32 little-endian
)
media_t = sa.Table(
    "gallery_media",
    metadata,
    sa.Column("item_id", sa.String(128), primary_key=True),
    sa.Column("kind", sa.String(16), primary_key=True),  # "image" | "audio"
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
)


CHANGE_BATCH = 20_000
_bp = sa.bindparam


class Q:
    """Statements of the hot paths, built once (SQLAlchemy caches their compiled form; building them per call cost
    about as much as running them)."""

    add_change = sa.insert(changes_t).values(op="add", item_id=_bp("item_id")).returning(changes_t.c.seq)
    delete_change = sa.insert(changes_t).values(op="delete", item_id=_bp("item_id"))
    insert_item = sa.insert(items_t)
    insert_vectors = sa.insert(vectors_t)
    insert_media = sa.insert(media_t)
    delete_rows = [sa.delete(t).where(t.c.item_id == _bp("item_id")) for t in (vectors_t, media_t)]
    delete_item = sa.delete(items_t).where(items_t.c.id == _bp("item_id"))
    existing = sa.select(items_t.c.id, items_t.c.seq, items_t.c.digest).where(
        items_t.c.id.in_(_bp("ids", expanding=True))
    )
    get = (
        sa.select(items_t, vectors_t.c.modality)
        .outerjoin(vectors_t, vectors_t.c.item_id == items_t.c.id)
        .where(items_t.c.id == _bp("item_id"))
    )
    media = sa.select(media_t.c.name, media_t.c.data).where(
        media_t.c.item_id == _bp("item_id"), media_t.c.kind == _bp("kind")
    )
    head = sa.select(sa.func.max(changes_t.c.seq))
    _window = (
        sa.select(changes_t.c.seq).where(changes_t.c.seq > _bp("after")).order_by(changes_t.c.seq).limit(CHANGE_BATCH)
    ).subquery()
    window = sa.select(sa.func.count(), sa.func.max(_window.c.seq))
    changes = (
        sa.select(changes_t, items_t.c.record, vectors_t.c.modality, vectors_t.c.vector)
        .select_from(changes_t)
        .outerjoin(items_t, (items_t.c.seq == changes_t.c.seq) & (changes_t.c.op == "add"))
        .outerjoin(vectors_t, vectors_t.c.item_id == items_t.c.id)
        .where(changes_t.c.seq > _bp("after"), changes_t.c.seq <= _bp("last"))
        .order_by(changes_t.c.seq)
    )


def default_url(index_dir: str | Path) -> str:
    """The embedded store of an index directory: ``sqlite:///INDEX_DIR/gallery.db``."""
    return f"sqlite:///{Path(index_dir).resolve() / DEFAULT_FILE}"


def redact(url: str) -> str:
    """``url`` with its password hidden (for logs and index_meta.json)."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str) -> sa.Engine:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return sa.create_engine(parsed)  # a dropped connection fails one call (503, retried), then is replaced
    if backend != "sqlite" or not parsed.database or parsed.database == ":memory:":
        raise ValueError(
            f"serve.gallery_store {redact(url)!r}: use sqlite:///<path to a file> (one node) or "
            "postgresql://user@host:port/db (clusters)"
        )
    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(parsed, connect_args={"timeout": 60.0, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy's "begin" event below starts transactions
        cursor = dbapi_connection.cursor()
        for pragma in ("busy_timeout=60000", "journal_mode=WAL", "synchronous=FULL"):
            cursor.execute(f"PRAGMA {pragma}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        begin = conn.get_execution_options().get("sqlite_begin")
        if begin:  # writes and multi-statement reads; a single-statement read runs on its own
            conn.exec_driver_sql(begin)

    return engine
