"""`jobs.build_index.build_index`: the split into the gallery store (de-duplicated media, item records), snapshots of
one GalleryIndex per modality, metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import REPO

from cman.data.dataset import CMANDataset, Collator, load_split
from cman.gallery_db import GalleryDB
from cman.gallery_mirror import CACHE_DIR, open_gallery, snapshot_path
from cman.index import GalleryIndex
from cman.modality import Modality
from cman.models.cman import CMAN
from jobs.build_index import build_index


@pytest.fixture(scope="module")
def shared_image_root(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo test split where items 0-3 all show item 0's image (like 4 captions of one Flickr8k photo)."""
    root = tmp_path_factory.mktemp("shared_image")
    for sub in ("images", "audio"):
        shutil.copytree(demo_root / sub / "test", root / sub / "test")
    entries = json.loads((demo_root / "metadata" / "test_metadata.json").read_text())[:8]
    for entry in entries[1:4]:
        entry["image_filename"] = entries[0]["image_filename"]
    del entries[5]["audio_filename"]  # an item without audio: in the text and image galleries only
    (root / "metadata").mkdir()
    (root / "metadata" / "test_metadata.json").write_text(json.dumps(entries))
    return root


def test_build_index_dedupes_and_records(trained_checkpoint: Path, shared_image_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    counts = build_index(trained_checkpoint, "test", out, root=shared_image_root)
    assert counts == {"text": 8, "audio": 7, "image": 5}
    meta = json.loads((out / "index_meta.json").read_text())
    assert meta["counts"] == counts and meta["split"] == "test"
    assert meta["checkpoint"] == str(trained_checkpoint.resolve()) and meta["items_in_split"] == 8
    items = load_split(shared_image_root, "test")
    gallery = {m.value: ix for m, ix in open_gallery(out).items()}
    image_index = gallery["image"]
    assert image_index.ids == [items[0].id, items[4].id, items[5].id, items[6].id, items[7].id]
    for modality in ("text", "audio", "image"):
        index = gallery[modality]
        assert len(index) == counts[modality]
        for item_id in index.ids:
            record = index.get(item_id)
            assert Path(record["image_path"]).is_absolute() and Path(record["image_path"]).is_file()
            assert record["caption"] and record["id"] == item_id
    assert "audio_path" not in gallery["text"].get(items[5].id)
    assert items[5].id not in gallery["audio"]
    assert build_index(trained_checkpoint, "test", out, root=shared_image_root) == counts  # again: nothing changes
    assert GalleryDB(f"sqlite:///{out / 'gallery.db'}").head() == len({*gallery["text"].ids, *gallery["audio"].ids})


def test_index_vectors_are_single_modality_embeddings(trained_checkpoint: Path, demo_root: Path, tmp_path: Path):
    """A gallery vector equals the model's embedding of that medium alone (what Serve's queries are compared to)."""
    out = tmp_path / "index"
    build_index(trained_checkpoint, "test", out, root=demo_root, kind="hnsw")
    model = CMAN.from_pretrained(trained_checkpoint).merge_adapters()
    items = load_split(demo_root, "test")[:3]
    for modality in Modality:
        processors = {modality: model.processors[modality]}
        batch = Collator(processors)([CMANDataset(items, processors)[i] for i in range(3)])
        with torch.no_grad():
            expected = model(batch["inputs"])[modality].numpy()  # (3, 512)
        index = GalleryIndex.load(snapshot_path(out / CACHE_DIR, modality.value))  # what a replica starts from
        assert index.kind == "hnsw"
        hits = index.search(expected, 1)
        for item, hit in zip(items, hits, strict=True):
            got, score = hit[0]
            assert score == pytest.approx(1.0, abs=1e-4)
            stored = index.vectors()[index.ids.index(item.id)]
            assert np.allclose(stored, expected[items.index(item)], atol=1e-4)
            assert got["id"] in index


def test_build_index_errors_name_the_problem(trained_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="metadata"):
        build_index(trained_checkpoint, "test", tmp_path / "index", root=tmp_path / "no_data")
    with pytest.raises(FileNotFoundError, match="not a CMAN checkpoint"):
        build_index(tmp_path, "test", tmp_path / "index", root=tmp_path)


def test_manifest_path_outside_the_dataset_root_is_refused(trained_checkpoint: Path, demo_root: Path, tmp_path):
    """A hostile manifest (absolute path / `..`) must not put a file outside the root into served records."""
    root = tmp_path / "root"
    for sub in ("images", "audio"):
        shutil.copytree(demo_root / sub / "test", root / sub / "test")
    entries = json.loads((demo_root / "metadata" / "test_metadata.json").read_text())[:3]
    outside = tmp_path / "secret.png"
    shutil.copy(root / "images" / "test" / Path(entries[0]["image_filename"]).name, outside)
    entries[1]["image_filename"] = str(outside)
    (root / "metadata").mkdir()
    (root / "metadata" / "test_metadata.json").write_text(json.dumps(entries))
    with pytest.raises(ValueError, match="outside the dataset root|must be a path inside"):
        build_index(trained_checkpoint, "test", tmp_path / "index", root=root)


# ---- Ray Data -------------------------------------------------------------------------------------------------
def _gallery(out: Path) -> dict:
    return {m.value: ix for m, ix in open_gallery(out).items()}


def test_ray_data_index_equals_single_process_and_resumes_after_a_kill(
    ray_session, trained_checkpoint: Path, demo_root: Path, tmp_path: Path
) -> None:
    """`cman index` on Ray Data: SIGKILLed midway, re-run; no finished shard is recomputed; vectors equal to 1e-5."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import ray

    from cman.config import ServeConfig
    from jobs import faults
    from jobs.build_index import build_index_ray, shard_path

    single, sharded = tmp_path / "single", tmp_path / "ray"
    build_index(trained_checkpoint, "test", single, root=demo_root)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(REPO)}
    settings = ["serve.index_shard_size=2", "serve.index_batch_size=2", "serve.index_cpus_per_actor=0.5"]
    cmd = [sys.executable, "-m", "cman.cli", "index", "--config", str(trained_checkpoint / "config.yaml")]
    cmd += ["--checkpoint", str(trained_checkpoint), "--split", "test", "--out", str(sharded)]
    cmd += [f"--set=data.root={demo_root}", *(f"--set={s}" for s in settings)]
    pause = tmp_path / "pause"  # every shard write waits at a pause point (jobs.faults) until the test says go
    env |= {faults.DIR_ENV: str(pause), faults.AT_ENV: "index-*"}
    log = tmp_path / "index.log"  # a file, not a pipe: a full pipe would stall the build before its pause point
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=out)

    def wait_paused(n: int) -> list[Path]:
        deadline = time.monotonic() + 240
        while len(points := sorted(pause.glob("*.paused"))) < n:
            assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, f"fewer than {n} shard writes reached their pause point in 240 s"
            time.sleep(0.05)
        return points

    shards = lambda: list((sharded / "shards").glob("*/shard-*.npz"))  # noqa: E731
    first = wait_paused(1)[0]  # modalities are embedded in parallel: more than one may wait already
    (pause / first.name.replace(".paused", ".go")).touch()  # that one shard is written
    deadline = time.monotonic() + 120
    while not shards():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
        time.sleep(0.05)
    wait_paused(2)  # every other write waits: the build is midway, whatever the box's speed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (sharded / "shards").glob("*/shard-*.npz")}
    total = sum(-(-count // 2) for count in json.loads((single / "index_meta.json").read_text())["counts"].values())
    assert len(done) == 1 < total, f"{len(done)} of {total} shards were written before the kill"

    serve = ServeConfig(index_shard_size=2, index_batch_size=2, index_cpus_per_actor=0.5)
    counts = build_index_ray(trained_checkpoint, "test", sharded, root=demo_root, serve=serve, progress=False)
    for path, stamp in done.items():  # finished shards were not recomputed (same file, same mtime)
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp
    assert len(list((sharded / "shards").glob("*/shard-*.npz"))) == total
    expected, got = _gallery(single), _gallery(sharded)
    assert counts == {m: len(ix) for m, ix in expected.items()}
    for modality, index in expected.items():
        assert got[modality].ids == index.ids
        np.testing.assert_allclose(got[modality].vectors(), index.vectors(), atol=1e-5)
        queries = index.vectors()[:4]
        assert [[r["id"] for r, _ in hits] for hits in got[modality].search(queries, 5)] == [
            [r["id"] for r, _ in hits] for hits in index.search(queries, 5)
        ]
    assert shard_path(sharded, Modality.TEXT, 0).is_file()
