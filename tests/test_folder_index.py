"""`cman index --from-folder DIR`: images, audio and .txt files found recursively, paired by stem, indexed with no
metadata; the index loads as the Retriever loads it, its media are served from the folder, items are found by id."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from media_files import photo, wav
from tiny import CAPTIONS, tiny_demo_config

from cman.data.folder import scan_folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained model saved as a checkpoint (indexing needs no training)."""
    from cman.models.cman import build_model

    out = tmp_path_factory.mktemp("folder_ckpt")
    model = build_model(tiny_demo_config(out), captions=CAPTIONS * 5)
    return model.save_pretrained(out / "checkpoint")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("my_media")
    photo(root / "beach.jpg", seed=1)
    wav(root / "beach.wav", seed=1)
    (root / "beach.txt").write_text("waves on a sandy beach\n")
    photo(root / "2024" / "dog.png", seed=2)
    (root / "2024" / "dog.txt").write_text("a brown dog")
    (root / "2024" / "notes.txt").write_text("a note with no picture")
    rain = wav(root / "sounds" / "rain.wav", seed=3)
    data, rate = sf.read(rain)
    sf.write(str(root / "sounds" / "rain.flac"), data, rate)
    rain.unlink()
    sf.write(str(root / "sounds" / "bird.mp3"), data.astype(np.float32), rate, format="MP3")
    photo(root / "pics" / "cat.webp", seed=4)
    photo(root / "pics" / "cat.gif", seed=5)  # two images, one stem: not paired, ids keep the extension
    photo(root / "pics" / "x.bmp", seed=6)
    photo(root / ".thumbnails" / "beach.jpg", seed=7)  # hidden: skipped
    (root / "README.md").write_text("not media")
    (root / "empty.txt").write_text("  \n")  # no text: skipped
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # undecodable: skipped when embedding
    return root


EXPECTED_IDS = ["2024.dog", "2024.notes", "beach", "broken", "pics.cat.gif", "pics.cat.webp", "pics.x"]
EXPECTED_IDS = sorted([*EXPECTED_IDS, "sounds.bird", "sounds.rain"])


def test_scan_pairs_by_stem_and_names_items_by_relative_path(folder: Path) -> None:
    items = {item.id: item for item in scan_folder(folder)}
    assert sorted(items) == EXPECTED_IDS
    beach = items["beach"]
    assert beach.caption == "waves on a sandy beach" and beach.group == "beach"
    assert beach.image_path == folder / "beach.jpg" and beach.audio_path == folder / "beach.wav"
    assert items["2024.dog"].caption == "a brown dog" and items["2024.dog"].audio_path is None
    assert items["2024.notes"].image_path is None and items["sounds.rain"].audio_path.suffix == ".flac"
    assert items["pics.cat.gif"].image_path.name == "cat.gif" and items["pics.cat.gif"].caption is None


def test_scan_errors(tmp_path: Path) -> None:
    from cman.data.errors import DataError

    with pytest.raises(DataError, match="not found"):
        scan_folder(tmp_path / "nope")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match="holds no images, audio or .txt files"):
        scan_folder(tmp_path)


@pytest.fixture(scope="module")
def index_dir(checkpoint: Path, folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cman.cli import main

    out = tmp_path_factory.mktemp("folder_index") / "index"
    argv = ["index", "--checkpoint", str(checkpoint), "--from-folder", str(folder), "--out", str(out), "--in-process"]
    assert main(argv) == 0
    return out


def test_folder_index_loads_as_served_with_items_by_id(index_dir: Path, folder: Path) -> None:
    from cman.gallery_mirror import item_vectors, open_gallery

    meta = json.loads((index_dir / "index_meta.json").read_text())
    assert meta["root"] == str(folder.resolve()) and meta["folder"] == str(folder.resolve()) and meta["split"] is None
    gallery = {m.value: index for m, index in open_gallery(index_dir).items()}  # what a Retriever replica loads
    assert sorted(gallery["image"].ids) == ["2024.dog", "beach", "pics.cat.gif", "pics.cat.webp", "pics.x"]
    assert sorted(gallery["audio"].ids) == ["beach", "sounds.bird", "sounds.rain"]
    assert sorted(gallery["text"].ids) == ["2024.dog", "2024.notes", "beach"]
    record = gallery["image"].get("beach")
    assert record["caption"] == "waves on a sandy beach" and record["audio_path"] == str(folder / "beach.wav")
    for name, index in gallery.items():  # each item is found by its own vector
        for item_id, vector in item_vectors(index).items():
            assert index.search(vector, 1)[0][0][0]["id"] == item_id, (name, item_id)


def test_the_retriever_serves_the_folder_index_and_its_media(index_dir: Path, folder: Path) -> None:
    from cman.gallery_mirror import open_gallery
    from serve_app.gallery_store import GalleryStore
    from serve_app.media import allowed_roots, read_media

    dim = next(iter(open_gallery(index_dir).values())).dim
    store = GalleryStore(index_dir, None, ["text", "audio", "image"], dim)
    try:
        assert store.counts() == {"image": 5, "audio": 3, "text": 3}
        record = store.existing("2024.dog").record
        data, media_type = read_media(index_dir, allowed_roots(index_dir), "2024.dog", "image", record["image_path"])
        assert data == (folder / "2024" / "dog.png").read_bytes() and media_type == "image/png"
    finally:
        store.close()


def test_python_gallery_build_of_the_folder_matches_the_cli_index(checkpoint: Path, folder: Path, index_dir: Path):
    from cman import CMAN, Gallery

    model = CMAN.from_pretrained(checkpoint)
    built = Gallery.build(model, folder)
    served = Gallery.load(index_dir)
    assert sorted(built.ids) == sorted(i for i in EXPECTED_IDS if i != "broken")  # the CLI index skipped it too
    query = model.encode_text("waves on a sandy beach")
    for target in ("image", "audio", "text"):
        ours, theirs = built.search(query, target, k=3), served.search(query, target, k=3)
        assert [h["id"] for h in ours] == [h["id"] for h in theirs]
        np.testing.assert_allclose([h["score"] for h in ours], [h["score"] for h in theirs], atol=1e-4)
    assert built.search(query, "image", 1)[0]["image_path"].startswith(str(folder.resolve()))
