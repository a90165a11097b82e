"""The ``ivf_refine`` index kind (IVF over compressed codes, candidates re-scored exactly by faiss' IndexRefineFlat):
exact top-k where exact search has it, removal, compaction, snapshots, and ``serve.index_kind: auto`` choosing it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cman.config import ServeConfig
from cman.gallery_build import write_gallery
from cman.gallery_mirror import CACHE_DIR, snapshot_path
from cman.index import PARAM_NAMES, GalleryIndex, auto_params
from cman.modality import Modality

DIM = 32


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    centres = np.random.default_rng(1234).standard_normal((40, dim))
    return _unit(centres[rng.integers(0, 40, n)] + 0.5 * rng.standard_normal((n, dim)))


def _items(n: int) -> list[dict]:
    return [{"id": f"item{i}", "caption": f"caption {i}"} for i in range(n)]


def _refined(n: int = 3000, **params) -> tuple[GalleryIndex, np.ndarray]:
    x = _clustered(np.random.default_rng(0), n)
    index = GalleryIndex(DIM, kind="ivf_refine", **{"nlist": 16, "nprobe": 16, "k_factor": 64, **params})
    index.add(x, _items(n))
    return index, x


def _exact_top(x: np.ndarray, q: np.ndarray, k: int, live: list[int]) -> list[list[str]]:
    scores = q @ x[live].T  # (m, live)
    return [[f"item{live[j]}" for j in np.argsort(-row, kind="stable")[:k]] for row in scores]


def _ids(results: list[list[tuple[dict, float]]]) -> list[list[str]]:
    return [[item["id"] for item, _ in row] for row in results]


@pytest.mark.parametrize("codes", ["sq8", "pq4_d8"])
def test_refined_search_returns_the_exact_top_k_with_exact_scores(codes: str) -> None:
    index, x = _refined(codes=codes)
    assert index.is_trained_ivf and index.ivf_min_size == 39 * 16 <= len(index)
    q = _clustered(np.random.default_rng(1), 50)
    found = index.search(q, 10)
    assert _ids(found) == _exact_top(x, q, 10, list(range(len(x))))  # recall 1.0: every list probed, 640 candidates
    for row, qv in zip(found, q, strict=True):  # re-scored against the full vectors, not the codes
        np.testing.assert_allclose([s for _, s in row], [float(qv @ x[int(it["id"][4:])]) for it, _ in row], atol=1e-5)


def test_refined_index_is_exact_until_it_can_train_and_keeps_labels() -> None:
    x = _clustered(np.random.default_rng(2), 700)
    index = GalleryIndex(DIM, kind="ivf_refine", nlist=16, nprobe=16, k_factor=64)
    index.add(x[:600], _items(600), labels=np.arange(600) * 2 + 5)
    assert not index.is_trained_ivf  # 600 < 39 * 16
    index.add(x[600:], [{"id": f"item{i}"} for i in range(600, 700)])
    assert index.is_trained_ivf and index.label("item3") == 11 and index.label("item600") == 2 * 599 + 6
    np.testing.assert_allclose(index.vectors(), x, atol=1e-6)  # the refine stage's full vectors, insertion order
    assert _ids(index.search(x[:5], 3)) == _exact_top(x, x[:5], 3, list(range(700)))


def test_removed_items_stay_out_of_results_and_compaction_re_adds_the_live_ones() -> None:
    index, x = _refined()
    q = _clustered(np.random.default_rng(3), 40)
    gone = {i for row in _ids(index.search(q, 5)) for i in row}  # the items these queries find first
    assert index.remove(sorted(gone)) == len(gone)
    assert index.hidden_count == len(gone)  # below max(1000, n/10): still held, kept out by a faiss selector
    live = [i for i in range(len(x)) if f"item{i}" not in gone]
    assert _ids(index.search(q, 10)) == _exact_top(x, q, 10, live)
    more = [f"item{i}" for i in live[: 1000 - len(gone)]]
    index.remove(more)  # 1000 hidden: the live vectors are re-added to the trained IVF
    assert index.hidden_count == 0 and index.is_trained_ivf and len(index) == len(x) - 1000
    live = live[len(more) :]
    assert index.ids == [f"item{i}" for i in live]
    np.testing.assert_allclose(index.vectors(), x[live], atol=1e-6)
    assert _ids(index.search(q, 10)) == _exact_top(x, q, 10, live)
    with pytest.raises(ValueError, match=f"label {live[0]} is already used"):
        index.add(x[:1], [{"id": "again"}], labels=[live[0]])


def test_save_load_keeps_parameters_hidden_items_and_results(tmp_path: Path) -> None:
    index, x = _refined(nprobe=12, k_factor=32, codes="pq4_d8")
    index.remove([f"item{i}" for i in range(0, 300, 3)])
    index.save(tmp_path / "text.gix", tag={"seq": 7})
    loaded = GalleryIndex.load(tmp_path / "text.gix")
    assert loaded.params == index.params and loaded.params["codes"] == "pq4_d8" and loaded.k_factor == 32
    assert loaded.hidden_count == 100 and len(loaded) == len(x) - 100 and loaded.is_trained_ivf
    q = _clustered(np.random.default_rng(4), 30)
    assert loaded.search(q, 10) == index.search(q, 10)
    assert "item0" not in {i for row in _ids(loaded.search(x[:3], 10)) for i in row}
    loaded.add(x[:1], [{"id": "new"}])
    assert loaded.label("new") == len(x)
    assert loaded.search(x[:1], 10)[0][0][0]["id"] == "new"  # x[0]'s item was removed: the new copy, exactly 1.0


def test_snapshots_of_earlier_releases_without_the_new_fields_load(tmp_path: Path, monkeypatch) -> None:
    old = GalleryIndex(8, kind="ivf", nlist=4, nprobe=4)
    old.add(_unit(np.random.default_rng(5).standard_normal((200, 8))), _items(200))
    monkeypatch.setattr(GalleryIndex, "params", property(lambda self: {n: getattr(self, n) for n in PARAM_NAMES}))
    old.save(tmp_path / "old.gix")  # a header as earlier releases wrote it: no k_factor, no codes
    monkeypatch.undo()
    loaded = GalleryIndex.load(tmp_path / "old.gix")
    assert loaded.kind == "ivf" and loaded.is_trained_ivf and (loaded.k_factor, loaded.codes) == (8, "sq8")
    assert loaded.search(old.vectors()[:3], 1) == old.search(old.vectors()[:3], 1)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"k_factor": 0.5}, "k_factor .* must be >= 1, got 0.5"),
        ({"codes": "pq9"}, "codes must be one of .*got 'pq9'"),
        ({"codes": "pq4_d8", "dim": 12}, "codes .*'pq4_d8' for dim 12"),
        ({"nlist": 0}, "nlist=0"),
    ],
)
def test_out_of_range_parameters_name_the_parameter(params: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GalleryIndex(params.pop("dim", DIM), kind="ivf_refine", **params)


def test_auto_params_rule() -> None:
    assert auto_params(100_000, exact_max=100_000) == {"kind": "flat"}
    rule = {"kind": "ivf_refine", "k_factor": 8, "codes": "sq8"}
    assert auto_params(1_000_000, exact_max=100_000) == {**rule, "nlist": 4096, "nprobe": 256}  # 2^round(log2 4 sqrt n)
    assert auto_params(200_000, exact_max=100_000) == {**rule, "nlist": 2048, "nprobe": 128}
    assert auto_params(3000, exact_max=2000) == {**rule, "nlist": 64, "nprobe": 4}  # at most n / 39 lists: trainable
    assert auto_params(10**9, exact_max=100_000)["nlist"] == 16384
    assert auto_params(1_000_000, exact_max=100_000, ann_kind="ivf") == {"kind": "ivf", "nlist": 1024, "nprobe": 128}
    assert auto_params(200_000, exact_max=100_000, ann_kind="hnsw") == {"kind": "hnsw"}


def test_served_auto_index_is_refined_above_the_threshold(tmp_path: Path) -> None:
    serve = ServeConfig(index_auto_exact_max=2000, gallery_store=f"sqlite:///{tmp_path / 'gallery.db'}")
    assert serve.index_auto_ann == "ivf_refine"  # the default
    rng = np.random.default_rng(6)
    galleries = {  # 128-d, as real embeddings: the default codes are 4 bits per 8 dimensions
        Modality.TEXT: (_clustered(rng, 3000, 128), _items(3000)),  # above index_auto_exact_max: refined
        Modality.IMAGE: (_clustered(rng, 1500, 128), _items(1500)),  # below it: exact
    }
    write_gallery(tmp_path / "index", galleries, "auto", serve)  # what `cman index` and a Retriever's policy do
    text = GalleryIndex.load(snapshot_path(tmp_path / "index" / CACHE_DIR, "text"))
    image = GalleryIndex.load(snapshot_path(tmp_path / "index" / CACHE_DIR, "image"))
    want = auto_params(3000, 2000)
    assert want["kind"] == "ivf_refine" and {k: text.params[k] for k in want} == want and text.is_trained_ivf
    assert image.kind == "flat" and not image.is_trained_ivf
    x = galleries[Modality.TEXT][0]
    q = _clustered(np.random.default_rng(7), 50, 128)
    found, truth = _ids(text.search(q, 10)), _exact_top(x, q, 10, list(range(3000)))
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]) >= 0.95
