"""Write-ahead log of gallery adds: one line per acknowledged item, in segments under ``INDEX_DIR/wal/``.

A line is ``<crc32 hex> <json>\\n`` where the JSON is ``{"record": {...item record...}, "vectors": {"image": "<base64
float32>", ...}}``. A writer appends the whole line with one ``write`` on an ``O_APPEND`` descriptor while holding an
exclusive ``flock`` on ``wal/lock`` (so several processes can share one log) and ``fsync``s before the add is
acknowledged. A reader takes only complete lines whose checksum matches: a line torn by a crash is never applied.
Segments are named ``seg-<n>.log``; compaction starts a new segment, folds the older ones into the snapshot and
deletes them.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cman.fsutil import fsync_dir

logger = logging.getLogger(__name__)

LOG_DIR = "wal"
LOCK_FILE = "lock"


def segment_name(number: int) -> str:
    return f"seg-{number:08d}.log"


def segments(log_dir: Path) -> list[Path]:
    """The log's segments, oldest first."""
    if not log_dir.is_dir():
        return []
    return sorted(p for p in log_dir.glob("seg-*.log") if p.name[4:12].isdigit())


def encode(record: dict[str, Any], vectors: dict[str, np.ndarray]) -> bytes:
    """One log line for an item: its record and one float32 vector per modality it joins."""
    body = json.dumps(
        {
            "record": record,
            "vectors": {
                m: base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii") for m, v in vectors.items()
            },
        },
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")
    return b"%08x " % zlib.crc32(body) + body + b"\n"


def decode(line: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """(record, vectors) of a complete line, or None if its checksum or JSON is bad."""
    crc, _, body = line.rstrip(b"\n").partition(b" ")
    try:
        if int(crc, 16) != zlib.crc32(body):
            return None
        data = json.loads(body)
        vectors = {m: np.frombuffer(base64.b64decode(v), dtype="<f4").copy() for m, v in data["vectors"].items()}
        return data["record"], vectors
    except (ValueError, KeyError, TypeError):
        return None


def read_from(path: Path, offset: int) -> tuple[list[tuple[dict[str, Any], dict[str, np.ndarray]]], int]:
    """Entries of complete lines of ``path`` after byte ``offset``, and the offset after the last complete line."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a last line without its newline is still being written (or torn): leave it
    entries = []
    for line in data[:end].splitlines():
        entry = decode(line)
        if entry is None:
            logger.warning("skipping a corrupt line in %s (checksum or JSON)", path)
            continue
        entries.append(entry)
    return entries, offset + end


def replay(gallery: dict[Any, Any], log_dir: Path, offsets: dict[str, int], new_index: Callable[[int], Any]) -> int:
    """Apply the log's complete lines after ``offsets`` (updated in place) to ``gallery``; returns items applied.

    ``new_index(dim)`` makes the (empty) index of a modality that the gallery does not have yet.
    """
    from cman.modality import Modality

    applied = 0
    for segment in segments(log_dir):
        entries, offsets[segment.name] = read_from(segment, offsets.get(segment.name, 0))
        for record, vectors in entries:
            for name, vector in vectors.items():
                modality = Modality(name)
                if modality not in gallery:
                    gallery[modality] = new_index(vector.shape[0])
                if str(record["id"]) not in gallery[modality]:
                    gallery[modality].add(vector[None], [record])
            applied += 1
    return applied


@contextmanager
def locked(log_dir: Path) -> Iterator[None]:
    """Exclusive lock on the log (across processes) for appends, segment switches and compaction."""
    log_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def append(log_dir: Path, line: bytes) -> None:
    """Append one encoded line to the newest segment and fsync it. Call while holding :func:`locked`."""
    existing = segments(log_dir)
    path = existing[-1] if existing else log_dir / segment_name(1)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and _last_byte(path, size) != b"\n":
            os.ftruncate(fd, _last_newline(path, size))  # drop a line torn by a crash before appending after it
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if not existing:
        fsync_dir(log_dir)


def start_segment(log_dir: Path) -> list[Path]:
    """Start a new segment (under :func:`locked`); returns the older segments, now closed to appends."""
    older = segments(log_dir)
    number = int(older[-1].name[4:12]) + 1 if older else 1
    (log_dir / segment_name(number)).touch()
    fsync_dir(log_dir)
    return older


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1)


def _last_newline(path: Path, size: int) -> int:
    with open(path, "rb") as f:
        data = f.read(size)
    return data.rfind(b"\n") + 1
