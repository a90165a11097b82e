"""The gallery store (SQLite and PostgreSQL) and the replicas' FAISS mirrors of it: idempotent writes, SIGKILL right
after concurrent acknowledged changes, a full disk, an I/O error at commit, replica sync, snapshots, `index_kind:
auto` rebuilds, index directories of earlier releases; media names and confined media reads."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from tiny import REPO

from cman.gallery_db import GalleryDB, ItemConflict, StoreError, StoreFullError, store_errors
from cman.gallery_mirror import GalleryMirror, IndexPolicy, open_gallery, snapshot_path
from cman.index import GalleryIndex, write_snapshot
from cman.modality import Modality
from serve_app.errors import RequestError
from serve_app.gallery_store import GalleryStore
from serve_app.media import allowed_roots, media_name, read_media

DIM = 8
ENV = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "")}


def _vec(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store' / 'gallery.db'}"
    return request.getfixturevalue("postgres").database()


def _add(db: GalleryDB, item_id: str, seed: int, media: bytes | None = None):
    files = {"image": (f"media/{item_id}.image.png", media)} if media is not None else None
    return db.add(item_id, {"caption": f"caption {item_id}"}, {"text": _vec(seed), "image": _vec(seed + 1)}, files)


def test_writes_are_idempotent_and_a_failed_one_leaves_nothing(store_url: str) -> None:
    db = GalleryDB(store_url)
    first, created = _add(db, "a", 1, b"png-a")
    again, created_again = _add(db, "a", 1, b"png-a")
    assert created and not created_again and again == first  # the same item twice: the stored item both times
    with pytest.raises(ItemConflict, match="already holds a different item"):
        _add(db, "a", 1, b"other bytes")
    with pytest.raises(ValueError, match="finite"):
        db.add("nan", {}, {"text": np.full(DIM, np.nan)})
    with pytest.raises(ValueError, match="must have 8 floats"):
        db.add("short", {}, {"text": np.ones(3)})
    assert db.get("nan") is None and db.get("short") is None and db.head() == first.seq
    assert db.delete("missing") is False
    assert db.delete("a") is True and db.get("a") is None and db.media("a", "image") is None
    readded, created = _add(db, "a", 2)
    assert created and readded.seq > first.seq  # a new label in every replica
    assert [(c.op, c.item_id) for c in db.changes(0)[0]] == [("add", "a"), ("delete", "a"), ("add", "a")]
    db.close()


WRITER = """
import json, sys, threading
from concurrent.futures import ThreadPoolExecutor
import numpy as np
from cman.gallery_db import GalleryDB
db, ops, lock = GalleryDB(sys.argv[1]), json.loads(sys.argv[2]), threading.Lock()
def vec(seed):
    v = np.random.default_rng(seed).standard_normal(8).astype("float32")
    return v / np.linalg.norm(v)
def say(*words):
    with lock:
        print(*words, flush=True)
def run(op):
    kind, item_id, seed = op
    say("start", item_id)
    if kind == "add":
        media = {"image": (f"media/{item_id}.image.png", item_id.encode() * 500)}
        db.add(item_id, {"caption": item_id}, {"text": vec(seed), "image": vec(seed + 1)}, media)
    else:
        assert db.delete(item_id)
    say("ack", item_id)
with ThreadPoolExecutor(16) as pool:
    list(pool.map(run, ops))
"""


def _read_until(proc: subprocess.Popen, acks_wanted: int, timeout_s: float = 60) -> tuple[set[str], set[str]]:
    """(started, acknowledged) ids from the writer's stdout, once `acks_wanted` changes are acknowledged."""
    started, acked = set(), set()
    deadline = time.monotonic() + timeout_s
    while len(acked) < acks_wanted:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.kill()
            pytest.fail(f"the writer stopped after {len(acked)} acknowledgements: {proc.stderr.read()[-2000:]}")
        word, item_id = line.split()
        (started if word == "start" else acked).add(item_id)
    return started, acked


def test_sigkill_right_after_concurrent_acknowledged_changes_keeps_every_one(store_url: str) -> None:
    db = GalleryDB(store_url)
    for i in range(30):
        _add(db, f"old-{i}", 1000 + 2 * i)
    ops = [["add", f"new-{i}", 2 * i] for i in range(120)]
    for i in range(30):  # a delete of an existing item after every third add
        ops.insert(4 * i + 3, ["delete", f"old-{i}", 0])
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, store_url, json.dumps(ops)],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started, acked = _read_until(proc, 50)
    os.kill(proc.pid, signal.SIGKILL)  # no cleanup, no close: the next open recovers the store
    proc.wait(timeout=30)
    for line in proc.stdout.read().splitlines():  # what it printed before it died, not yet read here
        word, item_id = line.split()
        (started if word == "start" else acked).add(item_id)
    db.close()

    db = GalleryDB(store_url)  # what a restarted Retriever sees
    kinds = {item_id: kind for kind, item_id, _ in ops}
    seeds = {item_id: seed for _, item_id, seed in ops}
    for item_id in acked:
        stored = db.get(item_id)
        assert (stored is None) == (kinds[item_id] == "delete"), item_id  # every acknowledged change is there
    for item_id, kind in kinds.items():
        stored = db.get(item_id)
        if item_id not in started:  # never sent: nothing of it happened
            assert (stored is None) == (kind == "add"), item_id
        if kind == "add" and stored is not None:  # acknowledged, or in flight and committed: whole, never half
            assert stored.modalities == ["image", "text"] and stored.record["caption"] == item_id
            assert db.media(item_id, "image") == (f"media/{item_id}.image.png", item_id.encode() * 500)
    in_flight_committed = {i for i in started - acked if (db.get(i) is None) == (kinds[i] == "delete")}
    mirror = GalleryMirror(db, ["text", "image"], DIM)
    mirror.load()
    present = {f"old-{i}" for i in range(30)} | {i for i in kinds if kinds[i] == "add"}
    present = {i for i in present if (i in acked or i in in_flight_committed) != (kinds[i] == "delete")}
    assert set(mirror.indexes[Modality.TEXT].ids) == present
    for item_id in present & {i for i in kinds if kinds[i] == "add"}:
        hit = mirror.indexes[Modality.TEXT].search(_vec(seeds[item_id])[None], 1)[0][0]
        assert hit[0]["id"] == item_id and hit[1] == pytest.approx(1.0, abs=1e-5)
    db.close()


FULL = """
import json, os, resource, signal, sys
import numpy as np
from cman.gallery_db import GalleryDB, StoreError
from cman.gallery_mirror import GalleryMirror
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past RLIMIT_FSIZE fails with EFBIG instead of killing us
db = GalleryDB(sys.argv[1])
mirror = GalleryMirror(db, ["text"], 8)
mirror.load()
if sys.argv[2] == "rlimit":
    biggest = max(os.path.getsize(p) for p in sys.argv[3:] if os.path.exists(p))
    resource.setrlimit(resource.RLIMIT_FSIZE, (biggest + 200_000, biggest + 200_000))
acked, error = [], None
for i in range(200):
    try:
        db.add(f"big-{i}", {}, {"text": np.ones(8, "float32") / 8**0.5}, {"image": ("media/x.png", os.urandom(65536))})
        acked.append(f"big-{i}")
    except StoreError as err:
        error = {"id": f"big-{i}", "status": err.status, "message": str(err)}
        break
mirror.catch_up()
search = mirror.indexes["text"].search(np.ones((1, 8), "float32"), 3)[0]
print(json.dumps({"acked": acked, "error": error, "visible": db.get(error["id"]) is not None if error else None,
                  "count": db.count(), "search": len(search), "keep_0": db.get("keep-0") is not None}))
"""


@pytest.mark.parametrize("how", ["rlimit", "tmpfs"])
def test_a_full_disk_answers_507_and_keeps_everything_before(tmp_path: Path, how: str) -> None:
    store = tmp_path / "store"
    store.mkdir()
    if how == "tmpfs":
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root; the RLIMIT_FSIZE case runs everywhere")
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(store)], check=True)
    try:
        url = f"sqlite:///{store / 'gallery.db'}"
        db = GalleryDB(url)
        for i in range(5):
            _add(db, f"keep-{i}", i, b"x" * 1000)
        db.close()
        files = [str(store / name) for name in ("gallery.db", "gallery.db-wal")]
        result = subprocess.run(
            [sys.executable, "-c", FULL, url, how, *files], cwd=REPO, env=ENV, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
        out = json.loads(result.stdout)
        assert out["error"] is not None and out["error"]["status"] == 507, out  # a clear "out of space"
        assert "out of space" in out["error"]["message"]
        assert out["visible"] is False and out["keep_0"] and out["search"] == 3  # nothing half-stored; still serving
        assert out["count"] == 5 + len(out["acked"])
        db = GalleryDB(url)  # after the process: every acknowledged add whole, the failed one absent
        assert db.count() == 5 + len(out["acked"]) and db.get(out["error"]["id"]) is None
        assert all(len(db.media(i, "image")[1]) == 65536 for i in out["acked"])
        assert db.media("keep-4", "image")[1] == b"x" * 1000
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
        db.close()
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(store)], check=False)


SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>
static int failing(void) { const char *f = getenv("CMAN_EIO_FLAG"); return f && access(f, F_OK) == 0; }
#define FAIL_SYNC(name) int name(int fd) { if (failing()) { errno = EIO; return -1; } \
    return ((int (*)(int))dlsym(RTLD_NEXT, #name))(fd); }
FAIL_SYNC(fsync)
FAIL_SYNC(fdatasync)
"""

IOERR = """
import json, os, signal, sys
from pathlib import Path
import numpy as np
from cman.gallery_db import GalleryDB, StoreError
from cman.gallery_mirror import GalleryMirror
db, flag = GalleryDB(sys.argv[1]), Path(os.environ["CMAN_EIO_FLAG"])
mirror = GalleryMirror(db, ["text"], 8)
mirror.load()
v = np.ones(8, "float32") / 8**0.5
flag.touch()  # every fsync fails from here: the commit's
answers = []
for name, write in (("add", lambda: db.add("failed", {}, {"text": v})), ("delete", lambda: db.delete("keep-1"))):
    try:
        write()
        answers.append([name, 200, ""])
    except StoreError as err:
        answers.append([name, err.status, str(err)])
flag.unlink()
mirror.catch_up()
hits = mirror.indexes["text"].search(v[None], 10)[0]
print(json.dumps({"answers": answers, "failed": db.get("failed") is not None, "keep_1": db.get("keep-1") is not None,
                  "search": len(hits)}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # the worst moment: right after the failures, before any other write
"""


def test_an_io_error_at_commit_answers_503_and_the_change_never_appears(tmp_path: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "a C compiler (cc) is needed to inject fsync errors: `make install` installs gcc"
    shim = tmp_path / "eio.so"
    (tmp_path / "eio.c").write_text(SHIM)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "eio.c"), "-ldl"], check=True)
    url = f"sqlite:///{tmp_path / 'gallery.db'}"
    db = GalleryDB(url)
    for i in range(3):
        _add(db, f"keep-{i}", i)
    db.close()
    env = {**ENV, "LD_PRELOAD": str(shim), "CMAN_EIO_FLAG": str(tmp_path / "fail-fsync")}
    result = subprocess.run([sys.executable, "-c", IOERR, url], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert [a[:2] for a in out["answers"]] == [["add", 503], ["delete", 503]], out
    assert all("retry the same request" in a[2] for a in out["answers"])
    assert out == {**out, "failed": False, "keep_1": True, "search": 3}  # not stored, earlier items intact, serving
    db = GalleryDB(url)  # crash recovery must not bring the failed commits back
    assert db.get("failed") is None and db.get("keep-1") is not None and db.count() == 3
    db.close()


def test_store_errors_are_classified_for_clients() -> None:
    class DiskFull(Exception):
        sqlstate = "53100"  # what psycopg raises when PostgreSQL cannot extend a file

    import sqlalchemy as sa

    with pytest.raises(StoreFullError, match="out of space"):
        with store_errors("adding item 'x'", "postgresql://u:secret@h/db"):
            raise sa.exc.OperationalError("INSERT", {}, DiskFull("could not extend file"))
    with pytest.raises(StoreError, match="may or may not be stored") as err:
        with store_errors("adding item 'x'", "postgresql://u:secret@h/db"):
            raise sa.exc.OperationalError("COMMIT", {}, ConnectionError("server closed the connection"))
    assert err.value.status == 503 and "secret" not in str(err.value)


def test_two_replicas_see_each_others_adds_and_deletes_within_sync_s(store_url: str, tmp_path: Path) -> None:
    sync_s = 0.1
    one, two = (GalleryStore(tmp_path / n, store_url, ["text", "image"], DIM, sync_s=sync_s) for n in "ab")
    try:
        stored, created = one.add("x", {"caption": "x"}, {"text": _vec(1)}, None, "digest-x")
        assert created and one.add("x", {"caption": "x"}, {"text": _vec(1)}, None, "digest-x")[1] is False
        with pytest.raises(RequestError) as conflict:
            two.add("x", {"caption": "y"}, {"text": _vec(2)}, None, "digest-y")
        assert conflict.value.status == 409
        assert "x" in one.indexes[Modality.TEXT]  # the writer's own replica at once
        seen = _wait(lambda: "x" in two.indexes[Modality.TEXT])
        assert two.delete("x") and not two.delete("x")
        gone = _wait(lambda: "x" not in one.indexes[Modality.TEXT])
        assert max(seen, gone) <= sync_s + 1.0, (seen, gone)  # one period + the read; slack for a loaded box
    finally:
        one.close()
        two.close()


def _wait(condition, timeout_s: float = 10.0) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "not visible in time"
        time.sleep(0.01)
    return time.monotonic() - start


def test_a_replica_starts_from_the_snapshots_plus_later_changes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gallery.db'}"
    db = GalleryDB(url)
    db.put_many([({"id": f"i{n}"}, {"text": _vec(n), "image": _vec(n + 500)}, None) for n in range(40)])
    first = GalleryMirror(db, ["text", "image"], DIM, IndexPolicy("flat"), tmp_path / "cache")
    assert first.load() == "store"
    assert first.save_snapshots() == db.head()
    _add(db, "late", 900)
    db.delete("i3")
    started = GalleryMirror(db, ["text", "image"], DIM, IndexPolicy("flat"), tmp_path / "cache")
    assert started.load() == "snapshot"
    cold = GalleryMirror(db, ["text", "image"], DIM, IndexPolicy("flat"))
    assert cold.load() == "store"
    for modality in (Modality.TEXT, Modality.IMAGE):
        a, b = started.indexes[modality], cold.indexes[modality]
        assert sorted(a.ids) == sorted(b.ids) and "late" in a.ids and "i3" not in a.ids
        assert all(a.label(i) == b.label(i) for i in a.ids)
        np.testing.assert_allclose(a.vectors()[a.ids.index("late")], b.vectors()[b.ids.index("late")])
    newer = started.indexes[Modality.TEXT].frozen({"store_id": db.store_id, "seq": started.seq})
    write_snapshot(newer, snapshot_path(tmp_path / "cache", "text"))  # written later than the image snapshot
    mixed = GalleryMirror(db, ["text", "image"], DIM, IndexPolicy("flat"), tmp_path / "cache")
    assert mixed.load() == "snapshot" and mixed.counts() == cold.counts()  # replayed from the older one
    assert all(sorted(mixed.indexes[m].ids) == sorted(cold.indexes[m].ids) for m in cold.indexes)
    path = snapshot_path(tmp_path / "cache", "text")
    path.write_bytes(path.read_bytes()[:-100])  # a torn snapshot is not used: the store is
    assert GalleryMirror(db, ["text", "image"], DIM, IndexPolicy("flat"), tmp_path / "cache").load() == "store"
    other = GalleryDB(f"sqlite:///{tmp_path / 'other.db'}")  # nor one of another store
    first.save_snapshots()
    assert GalleryMirror(other, ["text", "image"], DIM, IndexPolicy("flat"), tmp_path / "cache").load() == "store"
    db.close()
    other.close()


def test_unfinished_snapshot_writes_are_removed_when_a_replica_starts(tmp_path: Path) -> None:
    """A replica killed while writing a snapshot leaves `.<modality>.gix.XXXX` (as large as the index); the next
    replica to start removes it, but not one a live replica may still be writing (modified recently)."""
    db = GalleryDB(f"sqlite:///{tmp_path / 'gallery.db'}")
    _add(db, "a", 1)
    cache = tmp_path / "cache"
    GalleryMirror(db, ["text"], DIM, IndexPolicy("flat"), cache).load()
    orphan, writing = cache / ".text.gix.k1l2m3", cache / ".image.gix.n4o5p6"
    cache.mkdir(exist_ok=True)
    orphan.write_bytes(b"x" * 4096)
    writing.write_bytes(b"y" * 4096)
    os.utime(orphan, (time.time() - 3600, time.time() - 3600))
    started = GalleryMirror(db, ["text"], DIM, IndexPolicy("flat"), cache)
    started.load()
    assert not orphan.exists() and writing.exists()
    assert started.indexes[Modality.TEXT].ids == ["a"]
    db.close()


def test_auto_index_becomes_ivf_as_the_gallery_grows_and_exact_again_as_it_shrinks(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'gallery.db'}"
    policy = IndexPolicy("auto", exact_max=2600)
    store = GalleryStore(tmp_path, url, ["text"], DIM, policy, sync_s=0.05)
    try:
        rng = np.random.default_rng(0)
        centres = rng.standard_normal((50, DIM))
        x = centres[rng.integers(0, 50, 3000)] + 0.2 * rng.standard_normal((3000, DIM))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        for start in range(0, 3000, 1000):
            store.db.put_many([({"id": f"v{n}"}, {"text": x[n]}, None) for n in range(start, start + 1000)])
        _wait(lambda: store.indexes[Modality.TEXT].is_trained_ivf, timeout_s=30)  # rebuilt in the background
        index = store.indexes[Modality.TEXT]
        assert (index.kind, index.nlist, len(index)) == ("ivf", 64, 3000)
        assert index.search(x[:1], 1)[0][0][0]["id"] == "v0"
        for n in range(700):  # below 0.9 * exact_max: exact again
            store.db.delete(f"v{n}")
        _wait(lambda: (store.indexes[Modality.TEXT].kind, len(store.indexes[Modality.TEXT])) == ("flat", 2300), 30)
        store.wait_for_jobs()
    finally:
        store.close()
    assert GalleryMirror(GalleryDB(url), ["text"], DIM, policy, tmp_path / "cache").load() == "snapshot"


def _legacy_dir(root: Path) -> None:
    """An index directory as earlier releases wrote it: versioned snapshot, write-ahead log, media files."""
    import faiss

    version = root / "text" / "v-1"
    version.mkdir(parents=True)
    (root / "text" / "CURRENT").symlink_to("v-1")
    index = faiss.IndexFlatIP(DIM)
    index.add(np.stack([_vec(0), _vec(1)]))
    faiss.write_index(index, str(version / "index.faiss"))
    (version / "items.json").write_text(json.dumps([{"id": "s0", "caption": "zero"}, {"id": "s1"}]))
    (version / "index.json").write_text(json.dumps({"version": 1, "dim": DIM, "kind": "flat", "count": 2}))
    (root / "wal").mkdir()
    (root / "media").mkdir()
    (root / "media" / "w0.image.png").write_bytes(b"\x89PNG legacy")
    lines = b""
    for item_id, vectors in (("w0", {"text": _vec(5), "image": _vec(6)}), ("s1", {"text": _vec(1)})):
        record = {"id": item_id, **({"image_path": "media/w0.image.png"} if item_id == "w0" else {})}
        enc = {m: __import__("base64").b64encode(v.astype("<f4").tobytes()).decode() for m, v in vectors.items()}
        body = json.dumps({"record": record, "vectors": enc}).encode()
        lines += b"%08x " % zlib.crc32(body) + body + b"\n"
    (root / "wal" / "seg-00000001.log").write_bytes(lines + b"0badc0de {torn")


def test_an_index_directory_of_an_earlier_release_moves_into_the_store(tmp_path: Path) -> None:
    _legacy_dir(tmp_path)
    gallery = open_gallery(tmp_path)
    assert sorted(gallery[Modality.TEXT].ids) == ["s0", "s1", "w0"] and gallery[Modality.IMAGE].ids == ["w0"]
    np.testing.assert_allclose(gallery[Modality.TEXT].vectors()[gallery[Modality.TEXT].ids.index("w0")], _vec(5))
    db = GalleryDB(f"sqlite:///{tmp_path / 'gallery.db'}")
    assert db.media("w0", "image") == ("media/w0.image.png", b"\x89PNG legacy")
    head = db.head()
    assert sorted(open_gallery(tmp_path)[Modality.TEXT].ids) == ["s0", "s1", "w0"] and db.head() == head  # once
    with pytest.raises(ValueError, match="earlier release"):
        GalleryIndex.load(tmp_path / "text")
    db.close()
    with pytest.raises(FileNotFoundError, match="holds no gallery index"):
        open_gallery(tmp_path / "media")


def test_media_names_per_modality_and_reads_confined_to_the_gallery(tmp_path: Path) -> None:
    png, wav = b"\x89PNG....", b"RIFF....WAVEfmt "
    assert media_name("x", "image", png) == "media/x.image.png"
    assert media_name("x", "audio", wav) == "media/x.audio.wav"
    assert media_name("x", "image", b"??") != media_name("x", "audio", b"??")  # unknown formats never collide
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "x.image.png").write_bytes(png)
    secret = tmp_path.parent / f"{tmp_path.name}-secret.txt"
    secret.write_text("not for clients")
    roots = allowed_roots(tmp_path)
    assert read_media(tmp_path, roots, "x", "image", "media/x.image.png") == (png, "image/png")
    for stored in (str(secret), "../" + secret.name, "media/../../" + secret.name):
        with pytest.raises(RequestError, match="outside the gallery"):
            read_media(tmp_path, roots, "x", "image", stored)
