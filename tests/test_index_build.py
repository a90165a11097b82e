"""`jobs.build_index.build_index`: one GalleryIndex per modality, de-duplicated media, item records, metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cman.data.dataset import CMANDataset, Collator, load_split
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
    image_index = GalleryIndex.load(out / "image")
    assert image_index.ids == [items[0].id, items[4].id, items[5].id, items[6].id, items[7].id]
    for modality in ("text", "audio", "image"):
        index = GalleryIndex.load(out / modality)
        assert len(index) == counts[modality]
        for item_id in index.ids:
            record = index.get(item_id)
            assert Path(record["image_path"]).is_absolute() and Path(record["image_path"]).is_file()
            assert record["caption"] and record["id"] == item_id
    assert "audio_path" not in GalleryIndex.load(out / "text").get(items[5].id)
    assert items[5].id not in GalleryIndex.load(out / "audio")


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
        index = GalleryIndex.load(out / modality.value)
        assert index.kind == "hnsw"
        hits = index.search(expected, 1)
        for item, hit in zip(items, hits, strict=True):
            got, score = hit[0]
            assert score == pytest.approx(1.0, abs=1e-4)
            stored = index._index.reconstruct(index.ids.index(item.id))
            assert np.allclose(stored, expected[items.index(item)], atol=1e-4)
            assert got["id"] in index


def test_build_index_errors_name_the_problem(trained_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="metadata"):
        build_index(trained_checkpoint, "test", tmp_path / "index", root=tmp_path / "no_data")
    with pytest.raises(FileNotFoundError, match="not a CMAN checkpoint"):
        build_index(tmp_path, "test", tmp_path / "index", root=tmp_path)
