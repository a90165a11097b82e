"""FAISS gallery index: exactness, approximate recall, labels and removal, snapshot files and atomic saves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cman.index import GalleryIndex


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(rng: np.random.Generator, n: int, dim: int = 32) -> np.ndarray:
    """Random vectors around 64 random centres (embedding-like, unlike uniform noise)."""
    centres = np.random.default_rng(1234).standard_normal((64, dim))
    return _unit(centres[rng.integers(0, 64, n)] + 0.3 * rng.standard_normal((n, dim)))


def _items(n: int, prefix: str = "item") -> list[dict]:
    return [{"id": f"{prefix}{i}", "caption": f"caption {i}"} for i in range(n)]


def test_flat_top1_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    x, q = _unit(rng.standard_normal((200, 16))), _unit(rng.standard_normal((20, 16)))
    index = GalleryIndex(16)
    index.add(x, _items(200))
    results = index.search(q, 5)
    scores = q @ x.T  # (20, 200)
    for row, res in zip(scores, results, strict=True):
        assert len(res) == 5
        best = int(row.argmax())
        assert res[0][0]["id"] == f"item{best}"
        assert res[0][1] == pytest.approx(float(row[best]), abs=1e-5)
        assert [s for _, s in res] == sorted((s for _, s in res), reverse=True)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_recall_at_10(kind: str) -> None:
    rng = np.random.default_rng(0)
    x, q = _clustered(rng, 5000), _clustered(rng, 100)
    flat, approx = GalleryIndex(32), GalleryIndex(32, kind=kind)
    for idx in (flat, approx):
        idx.add(x, _items(5000))
    if kind == "ivf":
        assert approx.is_trained_ivf  # 5000 >= 39 * nlist(100)
    truth = [{it["id"] for it, _ in r} for r in flat.search(q, 10)]
    found = [{it["id"] for it, _ in r} for r in approx.search(q, 10)]
    recall = np.mean([len(t & f) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall >= 0.9


def test_ivf_is_exact_below_training_size() -> None:
    rng = np.random.default_rng(0)
    x = _unit(rng.standard_normal((50, 8)))
    index = GalleryIndex(8, kind="ivf", nlist=4)  # trains from 39 * 4 = 156 vectors
    index.add(x, _items(50))
    assert not index.is_trained_ivf
    assert index.search(x[:1], 1)[0][0][0]["id"] == "item0"
    index.add(_unit(rng.standard_normal((150, 8))), _items(150, "more"))
    assert index.is_trained_ivf and len(index) == 200
    assert index.search(x[:1], 1)[0][0][0]["id"] == "item0"


def test_k_clipping_empty_index_and_accessors() -> None:
    index = GalleryIndex(4)
    assert index.search(np.ones((2, 4)), 10) == [[], []]
    index.add(np.eye(4)[:3], _items(3))
    assert [len(r) for r in index.search(np.eye(4), 10)] == [3, 3, 3, 3]
    assert len(index) == 3 and index.ids == ["item0", "item1", "item2"]
    assert index.get("item1") == {"id": "item1", "caption": "caption 1"}
    assert index.get("nope") is None
    assert "item2" in index


def test_add_validation_and_duplicate_ids() -> None:
    index = GalleryIndex(4)
    index.add(np.eye(4)[:2], _items(2))
    with pytest.raises(ValueError, match="duplicate item id 'item1'"):
        index.add(np.eye(4)[2:], [{"id": "new"}, {"id": "item1"}])
    with pytest.raises(ValueError, match="duplicate item id 'x'"):
        index.add(np.eye(4)[2:], [{"id": "x"}, {"id": "x"}])
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        index.add(np.ones((1, 3)), [{"id": "y"}])
    with pytest.raises(ValueError, match="2 embeddings but 1 items"):
        index.add(np.eye(4)[2:], [{"id": "y"}])
    with pytest.raises(ValueError, match="'id' key"):
        index.add(np.eye(4)[:1], [{"caption": "no id"}])
    assert len(index) == 2  # failed adds leave the index unchanged
    with pytest.raises(ValueError, match="kind"):
        GalleryIndex(4, kind="lsh")


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_round_trip(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(0)
    n = 500 if kind != "ivf" else 4000
    x = _clustered(rng, n, dim=16)
    index = GalleryIndex(16, kind=kind)
    items = [{"id": f"i{j}", "image_path": f"img/{j}.jpg", "meta": {"n": j}} for j in range(n)]
    index.add(x, items, labels=np.arange(n) * 3 + 7)
    index.remove(["i1", "i2"])
    index.save(tmp_path / "image.gix", tag={"store_id": "s", "seq": 41})
    assert [p.name for p in tmp_path.iterdir()] == ["image.gix"]  # one file, no temporary left
    assert GalleryIndex.read_tag(tmp_path / "image.gix") == {"store_id": "s", "seq": 41}
    loaded = GalleryIndex.load(tmp_path / "image.gix")
    assert len(loaded) == n - 2 and loaded.kind == kind and loaded.params == index.params
    assert loaded.get("i7") == items[7] and loaded.label("i7") == 28 and "i1" not in loaded
    assert loaded.search(x[:5], 3) == index.search(x[:5], 3)
    loaded.add(_clustered(rng, 1, dim=16), [{"id": "added"}])
    assert "added" in loaded and loaded.label("added") == 3 * (n - 1) + 8  # after the highest label held


def test_failed_save_leaves_previous_index_intact(tmp_path: Path, monkeypatch) -> None:
    import cman.index as index_module

    index = GalleryIndex(4)
    index.add(np.eye(4)[:2], _items(2))
    index.save(tmp_path / "text.gix")
    index.add(np.eye(4)[2:3], [{"id": "bad", "blob": object()}])
    with pytest.raises(ValueError, match="JSON-serialisable"):
        index.save(tmp_path / "text.gix")
    index.remove(["bad"])
    index.add(np.eye(4)[3:], [{"id": "new"}])

    def crash(f, *args):
        f.write(b"half a snapshot")
        raise OSError("simulated crash while writing")

    monkeypatch.setattr(index_module, "_write_snapshot", crash)
    with pytest.raises(OSError, match="simulated crash"):
        index.save(tmp_path / "text.gix")
    monkeypatch.undo()
    assert GalleryIndex.load(tmp_path / "text.gix").ids == ["item0", "item1"]  # the complete old file, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["text.gix"]
    index.save(tmp_path / "text.gix")
    assert GalleryIndex.load(tmp_path / "text.gix").ids == ["item0", "item1", "new"]


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GalleryIndex.load(tmp_path / "missing.gix")
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match="earlier release"):
        GalleryIndex.load(tmp_path / "dir")
    index = GalleryIndex(4)
    index.add(np.eye(4), _items(4))
    target = tmp_path / "idx.gix"
    index.save(target)
    data = target.read_bytes()
    target.write_bytes(data[:-40])
    with pytest.raises(ValueError, match="idx.gix .*(checksum|faiss)"):
        GalleryIndex.load(target)
    target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="checksum"):
        GalleryIndex.load(target)
    target.write_bytes(b"not a snapshot at all")
    with pytest.raises(ValueError, match="not a gallery index snapshot"):
        GalleryIndex.load(target)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_removed_items_never_come_back_in_results(kind: str) -> None:
    rng = np.random.default_rng(5)
    x = _clustered(rng, 400, dim=8)
    index = GalleryIndex(8, kind=kind, nlist=4)
    index.add(x, _items(400))
    gone = [f"item{i}" for i in range(0, 400, 3)]  # 134 removed: flat and IVF drop them in batches
    assert index.remove([*gone, "unknown"]) == len(gone)
    assert index.remove(gone[:2]) == 0
    assert len(index) == 400 - len(gone) and index.hidden_count == (len(gone) if kind == "hnsw" else 0)
    found = {item["id"] for row in index.search(x, 10) for item, _ in row}
    assert not found & set(gone) and all(len(row) == 10 for row in index.search(x[:5], 10))
    assert index.ids == [f"item{i}" for i in range(400) if i % 3]
    np.testing.assert_allclose(index.vectors(), x[[i for i in range(400) if i % 3]], atol=1e-6)
    with pytest.raises(ValueError, match="label 5 is already used"):
        index.add(x[:1], [{"id": "again"}], labels=[5])


def test_vectors_and_records_in_insertion_order() -> None:
    rng = np.random.default_rng(3)
    for kind, n in (("flat", 50), ("hnsw", 50), ("ivf", 200)):
        x = _clustered(rng, n, dim=8)
        index = GalleryIndex(8, kind=kind, nlist=4)
        index.add(x, _items(n))
        np.testing.assert_allclose(index.vectors(), x, atol=1e-6)
        assert [r["id"] for r in index.records()] == [f"item{i}" for i in range(n)]
        index.records()[0]["id"] = "changed"  # a copy: the index keeps its own
        assert index.ids[0] == "item0"


def test_auto_params_exact_below_threshold_ivf_above() -> None:
    from cman.index import auto_params

    assert auto_params(1000, exact_max=100_000) == {"kind": "flat"}
    assert auto_params(1_000_000, exact_max=100_000, ann_kind="ivf") == {"kind": "ivf", "nlist": 1024, "nprobe": 128}
    with pytest.raises(ValueError, match="index_auto_ann must be"):
        auto_params(1_000_000, exact_max=100_000, ann_kind="lsh")
    assert auto_params(200_000, exact_max=100_000, ann_kind="hnsw") == {"kind": "hnsw"}
