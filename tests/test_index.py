"""FAISS gallery index: exactness, approximate recall, persistence and atomic saves."""

from __future__ import annotations

import json
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
    index.add(x, items)
    index.save(tmp_path / "image")
    assert sorted(p.name for p in (tmp_path / "image").iterdir()) == ["CURRENT", "v-1"]
    current = GalleryIndex.current_path(tmp_path / "image")
    assert sorted(p.name for p in current.iterdir()) == ["index.faiss", "index.json", "items.json"]
    meta = json.loads((current / "index.json").read_text())
    assert (meta["dim"], meta["kind"], meta["count"]) == (16, kind, n)
    loaded = GalleryIndex.load(tmp_path / "image")
    assert len(loaded) == n and loaded.kind == kind
    assert loaded.get("i7") == items[7]
    assert loaded.search(x[:5], 3) == index.search(x[:5], 3)
    loaded.add(_clustered(rng, 1, dim=16), [{"id": "added"}])
    assert "added" in loaded


def test_failed_save_leaves_previous_index_intact(tmp_path: Path) -> None:
    index = GalleryIndex(4)
    index.add(np.eye(4)[:2], _items(2))
    index.save(tmp_path / "text")
    index.add(np.eye(4)[2:3], [{"id": "bad", "blob": object()}])
    with pytest.raises(ValueError, match="JSON-serialisable"):
        index.save(tmp_path / "text")
    old = GalleryIndex.load(tmp_path / "text")
    assert old.ids == ["item0", "item1"]
    assert [p.name for p in tmp_path.iterdir()] == ["text"]  # no temp dirs left behind
    assert sorted(p.name for p in (tmp_path / "text").iterdir()) == ["CURRENT", "v-1"]


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GalleryIndex.load(tmp_path / "missing")
    index = GalleryIndex(4)
    index.add(np.eye(4), _items(4))
    target = tmp_path / "idx"
    index.save(target)

    (GalleryIndex.current_path(target) / "items.json").write_text(json.dumps(_items(3)))  # not this save's items
    with pytest.raises(ValueError, match="items.json does not match"):
        GalleryIndex.load(target)

    index.save(target)
    (GalleryIndex.current_path(target) / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json is not valid JSON"):
        GalleryIndex.load(target)

    index.save(target)
    (GalleryIndex.current_path(target) / "index.faiss").unlink()
    with pytest.raises(FileNotFoundError, match="index.faiss is missing"):
        GalleryIndex.load(target)


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


def test_save_is_one_switch_and_a_crash_before_it_keeps_the_old_version(tmp_path: Path, monkeypatch) -> None:
    import cman.index as index_module

    index = GalleryIndex(4)
    index.add(np.eye(4)[:2], _items(2))
    index.save(tmp_path / "g")
    index.add(np.eye(4)[2:3], [{"id": "new"}])

    def crash(*args, **kwargs):
        raise OSError("simulated crash before the switch")

    monkeypatch.setattr(index_module, "switch_symlink", crash)
    with pytest.raises(OSError, match="simulated crash"):
        index.save(tmp_path / "g")
    monkeypatch.undo()
    assert GalleryIndex.load(tmp_path / "g").ids == ["item0", "item1"]  # the complete old version, untouched
    index.save(tmp_path / "g")  # the next save supersedes the abandoned version and removes it
    assert GalleryIndex.load(tmp_path / "g").ids == ["item0", "item1", "new"]
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["CURRENT", "v-3"]


def test_legacy_flat_layout_still_loads(tmp_path: Path) -> None:
    index = GalleryIndex(4)
    index.add(np.eye(4), _items(4))
    index.save(tmp_path / "g")
    legacy = tmp_path / "legacy"
    GalleryIndex.current_path(tmp_path / "g").rename(legacy)  # index.faiss / items.json / index.json directly
    assert GalleryIndex.load(legacy).ids == index.ids


def test_auto_params_exact_below_threshold_ivf_above() -> None:
    from cman.index import auto_params

    assert auto_params(1000, exact_max=100_000) == {"kind": "flat"}
    assert auto_params(1_000_000, exact_max=100_000) == {"kind": "ivf", "nlist": 1024, "nprobe": 128}
    assert auto_params(200_000, exact_max=100_000, ann_kind="hnsw") == {"kind": "hnsw"}
