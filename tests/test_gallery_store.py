"""Durable online adds (write-ahead log + snapshots), shared by processes; media names and confined media reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny import REPO

from cman import gallery_log
from cman.index import GalleryIndex, open_gallery
from cman.modality import Modality
from serve_app.errors import RequestError
from serve_app.gallery_store import DuplicateItemError, GalleryStore
from serve_app.media import allowed_roots, media_name, read_media

DIM = 8


def _vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def _store(path: Path, **kwargs) -> GalleryStore:
    return GalleryStore.open(path, ["text", "image"], DIM, **kwargs)


def test_acknowledged_adds_survive_a_restart_and_a_torn_line_is_ignored(tmp_path: Path) -> None:
    store = _store(tmp_path)
    for i in range(5):
        assert store.add({"text": _vec(i), "image": _vec(100 + i)}, {"id": f"a{i}", "caption": f"c{i}"}) == [
            "text",
            "image",
        ]
    segment = gallery_log.segments(tmp_path / "wal")[-1]
    with open(segment, "ab") as f:  # a crash in the middle of writing the next line
        f.write(gallery_log.encode({"id": "torn"}, {"text": _vec(9)})[:-7])
    gallery = open_gallery(tmp_path)  # a fresh process: snapshots (none yet) + log replay
    assert gallery[Modality.TEXT].ids == [f"a{i}" for i in range(5)]
    np.testing.assert_allclose(gallery[Modality.IMAGE].vectors()[2], _vec(102), atol=1e-7)
    reopened = _store(tmp_path)
    reopened.add({"text": _vec(50)}, {"id": "after"})  # appends after dropping the torn tail
    assert open_gallery(tmp_path)[Modality.TEXT].ids[-1] == "after"
    assert "torn" not in open_gallery(tmp_path)[Modality.TEXT]


def test_a_failed_write_leaves_nothing_and_a_retry_is_not_a_duplicate(tmp_path: Path, monkeypatch) -> None:
    store = _store(tmp_path)

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gallery_log, "append", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.add({"text": _vec(1)}, {"id": "x"})
    assert "x" not in store and store.counts()["text"] == 0
    monkeypatch.undo()
    store.add({"text": _vec(1)}, {"id": "x"})
    with pytest.raises(DuplicateItemError, match="duplicate id 'x'"):
        store.add({"image": _vec(2)}, {"id": "x"})  # ids are unique across modalities
    assert open_gallery(tmp_path)[Modality.TEXT].ids == ["x"]


def test_compaction_snapshots_then_drops_the_folded_segments(tmp_path: Path) -> None:
    store = _store(tmp_path, compact_every=10**6, retain_s=0.0)
    for i in range(6):
        store.add({"text": _vec(i)}, {"id": f"i{i}"})
    assert store.compact()
    assert GalleryIndex.load(tmp_path / "text").ids == [f"i{i}" for i in range(6)]
    assert [p.name for p in gallery_log.segments(tmp_path / "wal")] == [gallery_log.segment_name(2)]
    store.add({"text": _vec(7)}, {"id": "late"})
    reopened = open_gallery(tmp_path)
    assert reopened[Modality.TEXT].ids == [*(f"i{i}" for i in range(6)), "late"]
    np.testing.assert_allclose(reopened[Modality.TEXT].vectors()[6], _vec(7), atol=1e-7)


ADDER = """
import sys
import numpy as np
from serve_app.gallery_store import GalleryStore
store = GalleryStore.open(sys.argv[1], ["text"], 8)
for i in range(25):
    v = np.random.default_rng(i).standard_normal(8).astype("float32")
    store.add({"text": v / np.linalg.norm(v)}, {"id": f"{sys.argv[2]}{i}"})
"""


def test_two_processes_adding_at_once_lose_nothing_and_see_each_other(tmp_path: Path) -> None:
    store = _store(tmp_path)
    procs = [
        subprocess.Popen([sys.executable, "-c", ADDER, str(tmp_path), prefix], cwd=REPO, env={"PYTHONPATH": str(REPO)})
        for prefix in ("p", "q")
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert store.sync() == 50  # what the other processes appended, read by this one
    expected = {f"{p}{i}" for p in "pq" for i in range(25)}
    assert set(store.indexes[Modality.TEXT].ids) == expected
    assert set(open_gallery(tmp_path)[Modality.TEXT].ids) == expected


def test_media_names_per_modality_and_reads_confined_to_the_gallery(tmp_path: Path) -> None:
    png, wav = b"\x89PNG....", b"RIFF....WAVEfmt "
    assert media_name("x", "image", png) == "media/x.image.png"
    assert media_name("x", "audio", wav) == "media/x.audio.wav"
    assert media_name("x", "image", b"??") != media_name("x", "audio", b"??")  # unknown formats no longer collide
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "x.image.png").write_bytes(png)
    secret = tmp_path.parent / f"{tmp_path.name}-secret.txt"
    secret.write_text("not for clients")
    roots = allowed_roots(tmp_path)
    assert read_media(tmp_path, roots, "x", "image", "media/x.image.png") == (png, "image/png")
    for stored in (str(secret), "../" + secret.name, "media/../../" + secret.name):
        with pytest.raises(RequestError, match="outside the gallery"):
            read_media(tmp_path, roots, "x", "image", stored)
