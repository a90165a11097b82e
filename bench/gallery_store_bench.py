"""Gallery store: online add latency, sustained adds per second and a replica's cold start, SQLite vs PostgreSQL.

    python bench/gallery_store_bench.py --engines sqlite postgresql --sizes 1000 100000 1000000

Per engine and gallery size: a fresh store is filled with `size` items (one 512-d vector each, `cman index` style
batches of 1000), a Retriever-style `serve_app.gallery_store.GalleryStore` opens it (FAISS mirror, `index_kind:
auto`, exact up to `--exact-max`), then
- add latency: `--adds` sequential adds as `POST /items` makes them after embedding (the id lookup, the store
  transaction up to its commit, this replica's catch-up into FAISS); p50 / p99 / mean ms;
- sustained adds/s: `--threads` threads adding for `--sustain-s` seconds;
- the snapshot write (what a replica does in the background every max(10 000, 10 %) changes), then the cold
  start of a replica from that cached FAISS snapshot and from the store alone.
PostgreSQL: `--pg-url postgresql://...` (one database per size is created on it), or a private server started from
Debian's binaries as the tests do (tests/pg_server.py). Prints JSON and writes bench/results/gallery_store_<time>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from bench.emit import emit_json  # noqa: E402
from cman.gallery_db import GalleryDB  # noqa: E402
from cman.gallery_mirror import CACHE_DIR, GalleryMirror, IndexPolicy  # noqa: E402
from serve_app.gallery_store import GalleryStore  # noqa: E402


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill(url: str, size: int, dim: int, copy: bool = False) -> float:
    """Seconds to store `size` items in transactions of 1000 (what `cman index` does); `copy` (PostgreSQL): the
    first 1000 so, the rest with COPY (a faster harness for 1 M items; not what `cman index` does)."""
    db = GalleryDB(url)
    start = time.perf_counter()
    for lo in range(0, size if not copy else min(size, 1000), 1000):
        vectors = unit_rows(min(1000, size - lo), dim, seed=lo)
        db.put_many(
            [
                ({"id": f"g{lo + i}", "caption": f"gallery item {lo + i}"}, {"image": v}, None)
                for i, v in enumerate(vectors)
            ]
        )
    if copy and size > 1000:
        copy_rows(db, range(1000, size), dim)
    db.close()
    return time.perf_counter() - start


def copy_rows(db: GalleryDB, numbers: range, dim: int) -> None:
    """Items g<n> for `numbers`, written with PostgreSQL COPY: changes (explicit seq), items, vectors."""
    import json

    raw = db.engine.raw_connection()
    try:
        cursor = raw.driver_connection.cursor()
        first = db.head() + 1
        for lo in range(numbers.start, numbers.stop, 10_000):
            hi = min(lo + 10_000, numbers.stop)
            vectors = unit_rows(hi - lo, dim, seed=lo)
            seqs = range(first + lo - numbers.start, first + hi - numbers.start)
            with cursor.copy("COPY gallery_changes (seq, op, item_id) FROM STDIN") as copy:
                for seq, n in zip(seqs, range(lo, hi), strict=True):
                    copy.write_row((seq, "add", f"g{n}"))
            with cursor.copy("COPY gallery_items (id, seq, record, digest) FROM STDIN") as copy:
                for seq, n in zip(seqs, range(lo, hi), strict=True):
                    record = json.dumps({"id": f"g{n}", "caption": f"gallery item {n}"})
                    copy.write_row((f"g{n}", seq, record, f"copy-{n}"))
            with cursor.copy("COPY gallery_vectors (item_id, modality, vector) FROM STDIN") as copy:
                for n, vector in zip(range(lo, hi), vectors, strict=True):
                    copy.write_row((f"g{n}", "image", vector.astype("<f4").tobytes()))
        cursor.execute("SELECT setval(pg_get_serial_sequence('gallery_changes', 'seq'), max(seq)) FROM gallery_changes")
        cursor.execute("ANALYZE")  # what autovacuum would do after a bulk load
        raw.driver_connection.commit()
    finally:
        raw.close()


def fsync_p50_ms(directory: str, n: int = 100) -> float:
    """This disk's small-write fsync now (the floor under a durable add; it moves with the box's other I/O)."""
    fd, path = tempfile.mkstemp(dir=directory)
    try:
        times = []
        for _ in range(n):
            os.write(fd, b"x" * 128)
            start = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        os.unlink(path)
    return round(1000 * float(np.median(times)), 3)


def add_once(store: GalleryStore, item_id: str, vector: np.ndarray) -> float:
    start = time.perf_counter()
    if store.existing(item_id) is None:
        store.add(item_id, {"id": item_id, "caption": f"added {item_id}"}, {"image": vector}, None, f"d-{item_id}")
    return time.perf_counter() - start


def latency(store: GalleryStore, adds: int, dim: int) -> dict[str, float]:
    vectors = unit_rows(adds, dim, seed=7)
    times = np.array([add_once(store, f"lat-{i}", vectors[i]) for i in range(adds)]) * 1000
    return {
        "p50_ms": round(float(np.median(times)), 3),
        "p99_ms": round(float(np.percentile(times, 99)), 3),
        "mean_ms": round(float(times.mean()), 3),
    }


def sustained(store: GalleryStore, threads: int, seconds: float, dim: int) -> dict[str, float]:
    vectors = unit_rows(1024, dim, seed=11)
    stop = time.monotonic() + seconds
    times: list[float] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        i = 0
        while time.monotonic() < stop:
            took = add_once(store, f"s{t}-{i}", vectors[i % 1024])
            with lock:
                times.append(took)
            i += 1

    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    wall = time.perf_counter() - start
    ms = np.array(times) * 1000
    return {
        "threads": threads,
        "adds": len(times),
        "adds_per_s": round(len(times) / wall, 1),
        "p50_ms": round(float(np.median(ms)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
    }


def cold_start(url: str, cache: Path, dim: int, policy: IndexPolicy, from_store: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for source, cache_dir in (("snapshot", cache), ("store", None))[: 2 if from_store else 1]:
        db = GalleryDB(url)
        start = time.perf_counter()
        mirror = GalleryMirror(db, ["image"], dim, policy, cache_dir)
        got = mirror.load()
        out[f"from_{source}_s"] = round(time.perf_counter() - start, 2)
        out[f"from_{source}_used"] = got
        out["index"] = {k: v for k, v in mirror.indexes[next(iter(mirror.indexes))].params.items() if k != "hnsw_m"}
        del mirror
        db.close()
    return out


def run_size(engine: str, url: str, size: int, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"engine": engine, "size": size}
    copy = engine == "postgresql" and size > args.copy_above
    row["fill_s" if not copy else "fill_with_copy_s"] = round(fill(url, size, args.dim, copy), 1)
    policy = IndexPolicy("auto", exact_max=args.exact_max)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        start = time.perf_counter()
        store = GalleryStore(tmp, url, ["image"], args.dim, policy, sync_s=0.5)
        row["first_open_from_store_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        store.wait_for_jobs()  # the first replica writes the snapshot the next ones start from
        row["first_snapshot_write_s"] = round(time.perf_counter() - start, 2)
        row["fsync_p50_ms"] = fsync_p50_ms(args.tmp)
        row["add"] = latency(store, args.adds, args.dim)
        row["sustained"] = sustained(store, args.threads, args.sustain_s, args.dim)
        store.wait_for_jobs()
        start = time.perf_counter()
        store.mirror.save_snapshots()  # what the background job does every max(10 000, 10 %) changes
        row["snapshot_write_s"] = round(time.perf_counter() - start, 2)
        store.close()
        row["cold_start"] = cold_start(url, Path(tmp) / CACHE_DIR, args.dim, policy, not args.no_cold_store)
        row["snapshot_mb"] = round(sum(p.stat().st_size for p in (Path(tmp) / CACHE_DIR).iterdir()) / 2**20, 1)
    print(row, file=sys.stderr, flush=True)
    return row


def engine_urls(engine: str, args: argparse.Namespace, server: Any) -> list[str]:
    if engine == "sqlite":
        return [f"sqlite:///{args.tmp}/bench-{size}-{os.getpid()}.db" for size in args.sizes]
    if args.pg_url:
        import psycopg

        names = [f"cman_bench_{size}_{os.getpid()}" for size in args.sizes]
        with psycopg.connect(args.pg_url, autocommit=True) as conn:
            for name in names:
                conn.execute(f"CREATE DATABASE {name}")
        base = args.pg_url.rsplit("/", 1)[0]
        return [f"{base}/{name}" for name in names]
    return [server.database() for _ in args.sizes]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--adds", type=int, default=200, help="sequential adds timed per size")
    p.add_argument("--threads", type=int, default=8, help="threads adding at once (sustained rate)")
    p.add_argument("--sustain-s", type=float, default=10.0)
    p.add_argument(
        "--exact-max",
        type=int,
        default=200_000,
        help="index_auto_exact_max (above 100 k so that the 100 k gallery "
        "is not rebuilt as IVF in the middle of the timing; 1 M is IVF)",
    )
    p.add_argument("--copy-above", type=int, default=100_000, help="PostgreSQL: fill larger galleries with COPY")
    p.add_argument(
        "--no-cold-store", action="store_true", help="skip the second cold start from the store (the first open is one)"
    )
    p.add_argument("--pg-url", help="a PostgreSQL server to create the bench databases on (default: a private one)")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where SQLite files and snapshots go")
    p.add_argument("--out", help="JSON path (default bench/results/gallery_store_<time>.json)")
    args = p.parse_args(argv)
    server = None
    if "postgresql" in args.engines and not args.pg_url:
        from pg_server import PostgresServer

        server = PostgresServer().start()
    result: dict[str, Any] = {"load_avg_start": os.getloadavg(), "cpus": os.cpu_count(), "rows": []}
    try:
        for engine in args.engines:
            for size, url in zip(args.sizes, engine_urls(engine, args, server), strict=True):
                result["rows"].append(run_size(engine, url, size, args))
                if engine == "sqlite":
                    for suffix in ("", "-wal", "-shm"):
                        Path(url.removeprefix("sqlite:///") + suffix).unlink(missing_ok=True)
    finally:
        if server is not None:
            server.stop()
    result["load_avg_end"] = os.getloadavg()
    emit_json(result, f"gallery_store_{time.strftime('%Y%m%d-%H%M%S')}", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
