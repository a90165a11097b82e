"""Six-direction retrieval metrics: hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cman import metrics
from cman.metrics import (
    DIRECTIONS,
    EmbeddingSet,
    attribute_errors,
    dedupe,
    direction_metrics,
    evaluate_embeddings,
    format_table,
    group_confusion,
)
from cman.modality import Modality


def _unit(rows: list[list[float]]) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _angles(degrees: list[float]) -> np.ndarray:
    rad = np.deg2rad(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def test_recall_and_medr_4x4() -> None:
    # Gallery = identity basis, so query row = its scores over gallery items 0..3 (query i belongs to group gi).
    # q0 [.9 .1 0 0]   order 0,1,2,3 -> first relevant (0) at rank 1
    # q1 [.8 .3 .5 .1] order 0,2,1,3 -> item 1 at rank 3
    # q2 [.1 .2 .3 .9] order 3,2,1,0 -> item 2 at rank 2
    # q3 [.5 .5 .5 .5] all tied, stable by gallery index -> item 3 at rank 4
    # q4 in group "gX" absent from the gallery -> excluded.
    # ranks [1,3,2,4]: R@1 25, R@2 50, R@3 75, medR 2.5; R=1 per query so AP = [rank==1] -> mAP@R 25.
    gallery = EmbeddingSet(["a", "b", "c", "d"], ["g0", "g1", "g2", "g3"], np.eye(4))
    query = EmbeddingSet(
        ["q0", "q1", "q2", "q3", "q4"],
        ["g0", "g1", "g2", "g3", "gX"],
        _unit(
            [
                [0.9, 0.1, 0, 0],
                [0.8, 0.3, 0.5, 0.1],
                [0.1, 0.2, 0.3, 0.9],
                [0.5, 0.5, 0.5, 0.5],
                [1, 0, 0, 0],
            ]
        ),
    )
    m = direction_metrics(query, gallery, ks=(1, 2, 3))
    assert m["R@1"] == pytest.approx(25.0)
    assert m["R@2"] == pytest.approx(50.0)
    assert m["R@3"] == pytest.approx(75.0)
    assert m["medR"] == pytest.approx(2.5)
    assert m["P@1"] == pytest.approx(25.0)
    assert m["mAP@R"] == pytest.approx(25.0)
    assert m["n_queries"] == 4
    assert m["n_skipped"] == 1


def test_recall_3x3_default_ks() -> None:
    # Scores q0 [.2 .9 .1] (group A, item 0 at rank 2), q1 [.1 .9 .3] (B, item 1 rank 1),
    # q2 [.7 .2 .6] (C, item 2 rank 2): R@1 = 1/3, R@5 = R@10 = 100, medR 2.
    gallery = EmbeddingSet(["x", "y", "z"], ["A", "B", "C"], np.eye(3))
    query = EmbeddingSet(
        ["p", "q", "r"],
        ["A", "B", "C"],
        _unit([[0.2, 0.9, 0.1], [0.1, 0.9, 0.3], [0.7, 0.2, 0.6]]),
    )
    m = direction_metrics(query, gallery)
    assert m["R@1"] == pytest.approx(100 / 3)
    assert m["R@5"] == m["R@10"] == pytest.approx(100.0)
    assert m["medR"] == 2.0


def _five_captions() -> dict[Modality, EmbeddingSet]:
    # Two images on the unit circle: A at 0 deg, B at 90 deg; five captions each, caption = angle on the circle.
    # Score(caption at t, A) = cos t, score(caption, B) = sin t.
    # The image set has one entry per caption item (as the loader builds it) -> 5 duplicates per image file.
    text_angles = [0, 10, 20, 60, 88, 85, 30, 70, 75, 50]  # first five group A, last five group B
    groups = ["A"] * 5 + ["B"] * 5
    text = EmbeddingSet([f"cap{i}" for i in range(10)], groups, _angles(text_angles))
    image = EmbeddingSet(["img_a.jpg"] * 5 + ["img_b.jpg"] * 5, groups, _angles([0] * 5 + [90] * 5))
    return {Modality.TEXT: text, Modality.IMAGE: image}


def test_dedupe_keeps_first_occurrence() -> None:
    image = _five_captions()[Modality.IMAGE]
    d = dedupe(image)
    assert d.keys == ["img_a.jpg", "img_b.jpg"]
    assert d.groups == ["A", "B"]
    np.testing.assert_allclose(d.embeddings, image.embeddings[[0, 5]])


def test_five_captions_protocol() -> None:
    # text->image (gallery deduped to 2 images, one relevant per caption):
    #   A captions 0,10,20 closer to A (rank 1); 60,88 rank 2.  B captions 85,70,75,50 rank 1; 30 rank 2.
    #   ranks: seven 1s, three 2s -> R@1 70, R@5 = R@10 100, medR 1, mAP@R (R=1) 70.
    # image->text (2 image queries, 5 relevant captions each, a hit if any is in the top K):
    #   A: captions by cos desc = 0A 10A 20A 30B 50B | 60A 70B 75B 85B 88A
    #      first relevant rank 1; AP@5 = (1 + 1 + 1) / 5 = 0.6
    #   B: by sin desc = 88A 85B 75B 70B 60A | 50B 30B 20A 10A 0A
    #      first relevant rank 2; AP@5 = (1/2 + 2/3 + 3/4) / 5 = 0.383333
    #   R@1 50, R@5 = R@10 100, medR 1.5, mAP@R (0.6 + 0.383333) / 2 = 49.1667
    # rsum = (70 + 100 + 100) + (50 + 100 + 100) = 520
    result = evaluate_embeddings(_five_captions())
    t2i = result["directions"]["text->image"]
    i2t = result["directions"]["image->text"]
    assert set(result["directions"]) == {"text->image", "image->text"}
    assert (t2i["R@1"], t2i["R@5"], t2i["R@10"]) == pytest.approx((70.0, 100.0, 100.0))
    assert t2i["medR"] == 1.0
    assert t2i["mAP@R"] == pytest.approx(70.0)
    assert t2i["n_queries"] == 10
    assert (i2t["R@1"], i2t["R@5"], i2t["R@10"]) == pytest.approx((50.0, 100.0, 100.0))
    assert i2t["medR"] == 1.5
    assert i2t["mAP@R"] == pytest.approx(100 * (0.6 + (1 / 2 + 2 / 3 + 3 / 4) / 5) / 2)
    assert i2t["n_queries"] == 2
    assert result["rsum"] == pytest.approx(520.0)


def test_map_at_r_class_level() -> None:
    # Gallery (identity basis) classes [x, x, y, y, x, y]; R = 3 for both queries.
    # qx scores [.9 .1 .8 .7 .6 .2] -> order 0x 2y 3y | 4x 5y 1x: AP@3 = (1)/3
    # qy scores [.5 .4 .9 .1 .3 .8] -> order 2y 5y 0x | 1x 4x 3y: AP@3 = (1 + 1)/3
    # mAP@R = (1/3 + 2/3) / 2 = 50 %, while R@1 = P@1 = 100 %.
    gallery = EmbeddingSet([f"g{i}" for i in range(6)], ["x", "x", "y", "y", "x", "y"], np.eye(6))
    query = EmbeddingSet(
        ["qx", "qy"],
        ["x", "y"],
        _unit([[0.9, 0.1, 0.8, 0.7, 0.6, 0.2], [0.5, 0.4, 0.9, 0.1, 0.3, 0.8]]),
    )
    m = direction_metrics(query, gallery)
    assert m["mAP@R"] == pytest.approx(50.0)
    assert m["P@1"] == m["R@1"] == pytest.approx(100.0)
    assert m["medR"] == 1.0


def test_all_six_directions_and_table() -> None:
    rng = np.random.default_rng(0)
    groups = [f"g{i % 7}" for i in range(30)]
    sets = {
        m: EmbeddingSet(
            [f"{m.value}{i}" for i in range(30)],
            groups,
            _unit(rng.standard_normal((30, 8)).tolist()),
        )
        for m in Modality
    }
    result = evaluate_embeddings(sets)
    assert list(result["directions"]) == list(DIRECTIONS)
    expected = sum(d[f"R@{k}"] for d in result["directions"].values() for k in (1, 5, 10))
    assert result["rsum"] == pytest.approx(expected)
    table = format_table(result)
    for name in DIRECTIONS:
        assert name in table
    assert "rsum" in table and "medR" in table


def test_missing_or_empty_modality_skips_directions() -> None:
    sets = _five_captions()
    sets[Modality.AUDIO] = EmbeddingSet([], [], np.zeros((0, 2), dtype=np.float32))
    result = evaluate_embeddings(sets)
    assert set(result["directions"]) == {"text->image", "image->text"}
    assert "no direction" in format_table(evaluate_embeddings({}))


def test_direction_without_relevant_items_is_nan() -> None:
    q = EmbeddingSet(["a"], ["A"], np.eye(2)[:1])
    g = EmbeddingSet(["b"], ["B"], np.eye(2)[1:])
    m = direction_metrics(q, g)
    assert m["n_queries"] == 0 and m["n_skipped"] == 1
    assert math.isnan(m["R@1"])
    assert evaluate_embeddings({Modality.TEXT: q, Modality.IMAGE: g})["directions"] == {}


def test_chunking_matches_single_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    q = EmbeddingSet(
        [str(i) for i in range(50)],
        [f"g{i % 9}" for i in range(50)],
        _unit(rng.standard_normal((50, 4)).tolist()),
    )
    g = EmbeddingSet(
        [str(i) for i in range(40)],
        [f"g{i % 9}" for i in range(40)],
        _unit(rng.standard_normal((40, 4)).tolist()),
    )
    full = direction_metrics(q, g)
    monkeypatch.setattr(metrics, "_QUERY_CHUNK", 7)
    assert direction_metrics(q, g) == pytest.approx(full)


def _reference(q: EmbeddingSet, g: EmbeddingSet, ks: tuple[int, ...]) -> dict:
    """Naive definition: full stable sort per query."""
    ranks, aps = [], []
    for emb, group in zip(q.embeddings, q.groups, strict=True):
        order = np.argsort(-(g.embeddings @ emb), kind="stable")
        rel = np.array([g.groups[j] == group for j in order])
        r = int(rel.sum())
        if r == 0:
            continue
        ranks.append(int(rel.argmax()) + 1)
        hits = np.cumsum(rel[:r])
        aps.append(sum(hits[i] / (i + 1) for i in range(r) if rel[i]) / r)
    out = {f"R@{k}": 100 * np.mean(np.array(ranks) <= k) for k in ks}
    return {**out, "medR": float(np.median(ranks)), "mAP@R": 100 * np.mean(aps)}


@pytest.mark.parametrize("n_groups", [3, 40])
def test_matches_full_sort_reference_with_ties(n_groups: int) -> None:
    rng = np.random.default_rng(n_groups)
    # coarse values -> many exact score ties, exercising the (score desc, index asc) tie-break
    q = EmbeddingSet(
        [str(i) for i in range(60)],
        [f"g{i}" for i in rng.integers(0, n_groups, 60)],
        rng.integers(-2, 3, (60, 3)).astype(np.float32),
    )
    g = EmbeddingSet(
        [str(i) for i in range(80)],
        [f"g{i}" for i in rng.integers(0, n_groups, 80)],
        rng.integers(-2, 3, (80, 3)).astype(np.float32),
    )
    m = direction_metrics(q, g, ks=(1, 3, 10))
    ref = _reference(q, g, (1, 3, 10))
    for key, value in ref.items():
        assert m[key] == pytest.approx(value), key


def test_embedding_set_validates_lengths() -> None:
    with pytest.raises(ValueError, match="one key and one group"):
        EmbeddingSet(["a", "b"], ["g"], np.zeros((2, 3)))
    with pytest.raises(ValueError, match="differ in dim"):
        direction_metrics(
            EmbeddingSet(["a"], ["g"], np.ones((1, 3))),
            EmbeddingSet(["b"], ["g"], np.ones((1, 4))),
        )


def test_group_confusion_names_what_each_group_is_taken_for() -> None:
    """Per query group: P@1 and the gallery groups of its top-1 items; agrees with direction_metrics' P@1."""
    query = EmbeddingSet(
        ["q0", "q1", "q2", "q3", "q4"], ["two", "two", "two", "four", "four"], _angles([0, 88, 92, 90, 180])
    )
    gallery = EmbeddingSet(["t2", "t4", "t9"], ["two", "four", "nine"], _angles([0, 90, 180]))
    table = group_confusion(query, gallery)
    assert list(table) == ["two", "four"]
    assert table["two"] == {"n": 3, "P@1": pytest.approx(100 / 3), "top1": {"four": 2, "two": 1}}
    assert table["four"] == {"n": 2, "P@1": 50.0, "top1": {"four": 1, "nine": 1}}
    p_at_1 = direction_metrics(query, gallery)["P@1"]
    assert p_at_1 == pytest.approx(sum(r["P@1"] * r["n"] for r in table.values()) / len(query))
    tie = EmbeddingSet(["a", "b"], ["x", "y"], _angles([0, 0]))  # equal scores: the lower gallery index wins
    assert group_confusion(EmbeddingSet(["q"], ["y"], _angles([0])), tie)["y"]["top1"] == {"x": 1}
    assert group_confusion(query, EmbeddingSet([], [], np.zeros((0, 2), np.float32))) == {}


def test_attribute_errors_count_what_each_wrong_top1_got_wrong() -> None:
    """Groups as attribute tuples: a wrong top-1 result counts under every attribute it differs in."""
    text = EmbeddingSet(["t0", "t1", "t2"], ["big-red", "big-blue", "small-red"], _angles([0, 90, 180]))
    image = EmbeddingSet(
        ["i0", "i1", "i2"], ["big-red", "small-blue", "big-blue"], _angles([0, 92, 178])
    )  # t1 -> small-blue (size wrong), t2 -> big-blue (both wrong)
    table = attribute_errors({Modality.TEXT: text, Modality.IMAGE: image}, ("size", "colour"))
    assert table["text->image"] == {"n": 3, "wrong": 2, "size": 2, "colour": 1}
    assert table["image->text"] == {"n": 3, "wrong": 2, "size": 2, "colour": 1}
    assert set(table) == {"text->image", "image->text"}
    with pytest.raises(ValueError, match="does not have 3"):
        attribute_errors({Modality.TEXT: text, Modality.IMAGE: image}, ("size", "colour", "shape"))
