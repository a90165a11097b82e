"""Six-direction cross-modal retrieval metrics with group-aware relevance.

A query and a gallery item are *relevant* to each other iff they share a relevance group (the metadata ``"group"``,
or the item id when there is none). Scores are cosine similarities, i.e. dot products of L2-normalised embeddings.
Ranking is deterministic: score descending, ties broken by gallery index ascending.

Per direction (e.g. ``"text->image"``) we report, over the queries that have at least one relevant gallery item:

- ``R@K``  percent of queries with at least one relevant item in the top K;
- ``medR`` median (over queries) of the 1-based rank of the first relevant item;
- ``P@1``  percent of queries whose top-1 item is relevant (equal to ``R@1``; kept for the class-level view);
- ``mAP@R`` percent; mean over queries of ``1/R * sum_{i<=R} P(i) * rel(i)`` with ``R`` the number of relevant
  gallery items of that query (Musgrave et al., "A Metric Learning Reality Check", 2020);
- ``n_queries`` queries evaluated, ``n_skipped`` queries excluded for having no relevant gallery item.

For the Flickr8k 5-captions protocol every modality's set is first deduplicated by media key (:func:`dedupe`), so an
image shared by five caption entries is one gallery item with five relevant captions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cman.modality import Modality

logger = logging.getLogger(__name__)

DIRECTIONS: tuple[str, ...] = (
    "text->image",
    "image->text",
    "audio->image",
    "image->audio",
    "text->audio",
    "audio->text",
)
VAL_METRIC = "val_rsum"  # the validation score every epoch reports: checkpoints, sweeps and the registry rank by it

_QUERY_CHUNK = 1024


@dataclass
class EmbeddingSet:
    """Embeddings of one modality, one row per item.

    Attributes:
        keys: per-item media key (image file, audio file, caption id); :func:`dedupe` keeps one row per key.
        groups: per-item relevance group; items with equal groups are relevant to each other.
        embeddings: float32 L2-normalised embeddings. # (n, dim)
    """

    keys: list[str]
    groups: list[str]
    embeddings: np.ndarray  # (n, dim)

    def __post_init__(self) -> None:
        self.keys = [str(k) for k in self.keys]
        self.groups = [str(g) for g in self.groups]
        emb = np.asarray(self.embeddings, dtype=np.float32)
        if emb.ndim == 1 and emb.size == 0:
            emb = emb.reshape(0, 0)
        if emb.ndim != 2:
            raise ValueError(f"EmbeddingSet.embeddings must be 2-d (n, dim), got shape {emb.shape}")
        if not (len(self.keys) == len(self.groups) == emb.shape[0]):
            raise ValueError(
                f"EmbeddingSet needs one key and one group per embedding row: got {len(self.keys)} keys, "
                f"{len(self.groups)} groups and {emb.shape[0]} rows"
            )
        if not np.isfinite(emb).all():
            raise ValueError("EmbeddingSet.embeddings contain NaN or inf")
        self.embeddings = np.ascontiguousarray(emb)

    def __len__(self) -> int:
        return len(self.keys)


def dedupe(es: EmbeddingSet) -> EmbeddingSet:
    """Keep the first occurrence of each key (e.g. one row per image file shared by 5 caption entries)."""
    seen: set[str] = set()
    keep: list[int] = []
    for i, key in enumerate(es.keys):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    if len(keep) == len(es):
        return es
    return EmbeddingSet(
        keys=[es.keys[i] for i in keep],
        groups=[es.groups[i] for i in keep],
        embeddings=es.embeddings[keep],
    )


def _group_codes(query: EmbeddingSet, gallery: EmbeddingSet) -> tuple[np.ndarray, np.ndarray]:
    """Map both sides' group strings to shared integer codes."""
    vocab: dict[str, int] = {}
    q = np.array([vocab.setdefault(g, len(vocab)) for g in query.groups], dtype=np.int64)
    g = np.array([vocab.setdefault(x, len(vocab)) for x in gallery.groups], dtype=np.int64)
    return q, g


def _first_relevant_rank(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of the first relevant item under (score desc, index asc), without a full sort.

    Args:
        scores: query-gallery similarities. # (queries, gallery)
        relevant: relevance mask; every row has at least one True. # (queries, gallery)
    """
    best = np.where(relevant, scores, -np.inf)  # (queries, gallery)
    j_best = best.argmax(axis=1)  # (queries,) lowest index among tied best relevant
    s_best = best[np.arange(len(best)), j_best][:, None]  # (queries, 1)
    before = (scores > s_best) | (
        (scores == s_best) & (np.arange(scores.shape[1]) < j_best[:, None])
    )  # (queries, gallery)
    return before.sum(axis=1) + 1


def _top_width(scores: np.ndarray, width: int) -> np.ndarray:
    """Indices of the ``width`` best items per row, ranked by (score desc, index asc). # (queries, width)"""
    n = scores.shape[1]
    if width < n:
        kth = -np.partition(-scores, width - 1, axis=1)[:, width - 1 : width]  # (queries, 1)
        above = scores > kth  # (queries, gallery)
        ties = scores == kth  # (queries, gallery)
        needed = width - above.sum(axis=1, keepdims=True)  # (queries, 1)
        chosen = above | (ties & (np.cumsum(ties, axis=1) <= needed))  # width per row
        idx = np.nonzero(chosen)[1].reshape(len(scores), width)  # ascending index
    else:
        idx = np.broadcast_to(np.arange(n), scores.shape)
    picked = np.take_along_axis(scores, idx, axis=1)  # (queries, width)
    order = np.argsort(-picked, axis=1, kind="stable")  # ties keep index order
    return np.take_along_axis(idx, order, axis=1)


def _ap_at_r(scores: np.ndarray, q_codes: np.ndarray, g_codes: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    """Average precision at R per query: ``1/R * sum_{i<=R} P(i) * rel(i)``.

    Args:
        scores: query-gallery similarities. # (queries, gallery)
        q_codes: query group codes. # (queries,)
        g_codes: gallery group codes. # (gallery,)
        n_rel: R, the number of relevant gallery items per query (>= 1). # (queries,)
    """
    width = int(n_rel.max())
    top = g_codes[_top_width(scores, width)] == q_codes[:, None]  # (queries, width)
    precision = np.cumsum(top, axis=1) / np.arange(1, width + 1)  # (queries, width)
    within_r = np.arange(width)[None, :] < n_rel[:, None]  # (queries, width)
    return (precision * top * within_r).sum(axis=1) / n_rel


def direction_metrics(
    query: EmbeddingSet,
    gallery: EmbeddingSet,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Retrieval metrics for one direction (``query`` modality -> ``gallery`` modality).

    Queries are processed in chunks of 1024 rows, so memory is ``O(1024 * len(gallery))``; no full sort is
    done (first-relevant rank by counting, AP@R over a partial top-R selection), same ranking as a stable sort.
    Returns ``{"R@k" for k in ks, "medR", "P@1", "mAP@R", "n_queries", "n_skipped"}``; recall, P@1 and mAP@R are in
    percent. When no query has a relevant gallery item, the rates are NaN and ``n_queries`` is 0.
    """
    if len(query) and len(gallery) and query.embeddings.shape[1] != gallery.embeddings.shape[1]:
        raise ValueError(
            f"query and gallery embeddings differ in dim: {query.embeddings.shape[1]} vs {gallery.embeddings.shape[1]}"
        )
    q_codes, g_codes = _group_codes(query, gallery)
    counts = np.bincount(g_codes, minlength=int(max(q_codes.max(initial=0), g_codes.max(initial=0))) + 1)
    n_rel_all = counts[q_codes] if len(query) else np.zeros(0, dtype=np.int64)  # (queries,)
    valid = np.flatnonzero(n_rel_all > 0)

    first_ranks: list[np.ndarray] = []
    aps: list[np.ndarray] = []
    for start in range(0, len(valid), _QUERY_CHUNK):
        rows = valid[start : start + _QUERY_CHUNK]
        scores = query.embeddings[rows] @ gallery.embeddings.T  # (chunk, gallery)
        relevant = g_codes[None, :] == q_codes[rows, None]  # (chunk, gallery)
        first_ranks.append(_first_relevant_rank(scores, relevant))
        aps.append(_ap_at_r(scores, q_codes[rows], g_codes, n_rel_all[rows]))

    result: dict[str, float] = {}
    n = len(valid)
    ranks = np.concatenate(first_ranks) if first_ranks else np.zeros(0, dtype=np.int64)
    for k in ks:
        result[f"R@{k}"] = 100.0 * float(np.mean(ranks <= k)) if n else math.nan
    result["medR"] = float(np.median(ranks)) if n else math.nan
    result["P@1"] = 100.0 * float(np.mean(ranks <= 1)) if n else math.nan
    result["mAP@R"] = 100.0 * float(np.mean(np.concatenate(aps))) if n else math.nan
    result["n_queries"] = n
    result["n_skipped"] = len(query) - n
    return result


def group_confusion(query: EmbeddingSet, gallery: EmbeddingSet) -> dict[str, dict]:
    """Per query group: which gallery groups its queries' top-1 items belong to (the class-level view of P@1).

    Returns ``{group: {"n": queries, "P@1": percent, "top1": {gallery group: queries, ...}}}`` for every query
    group, in order of first appearance; ``top1`` is sorted by count (descending), so the first key other than the
    group itself is what its queries are most often taken for. Top-1 is the first item under the ranking of
    :func:`direction_metrics` (score descending, ties by gallery index), so ``P@1`` here equals that direction's
    ``P@1`` restricted to the group (a group with no gallery item, which direction_metrics skips, scores 0 here).
    """
    if not len(query) or not len(gallery):
        return {}
    top: list[np.ndarray] = []
    for start in range(0, len(query), _QUERY_CHUNK):
        scores = query.embeddings[start : start + _QUERY_CHUNK] @ gallery.embeddings.T  # (chunk, gallery)
        top.append(scores.argmax(axis=1))  # lowest index among ties
    first = np.concatenate(top)  # (queries,)
    counts: dict[str, dict[str, int]] = {}
    for group, j in zip(query.groups, first, strict=True):
        row = counts.setdefault(group, {})
        row[gallery.groups[j]] = row.get(gallery.groups[j], 0) + 1
    out = {}
    for group, row in counts.items():
        n = sum(row.values())
        out[group] = {
            "n": n,
            "P@1": 100.0 * row.get(group, 0) / n,
            "top1": dict(sorted(row.items(), key=lambda kv: -kv[1])),
        }
    return out


def attribute_errors(
    sets: Mapping[Modality, EmbeddingSet], attributes: Sequence[str], separator: str = "-"
) -> dict[str, dict[str, int]]:
    """Top-1 errors by attribute, per direction, for groups that are attribute values joined by `separator`.

    A group such as ``"small-blue-square-right"`` with ``attributes=("size", "colour", "shape", "position")``: per
    direction, ``{"n": queries, "wrong": top-1 results not in the query's group, <attribute>: top-1 results whose
    value of that attribute differs from the query's, ...}`` (a result wrong in two attributes counts in both).
    Sets are deduplicated and ranked as in :func:`evaluate_embeddings`.
    """
    deduped = {Modality(m): dedupe(es) for m, es in sets.items() if es is not None and len(es)}
    table: dict[str, dict[str, int]] = {}
    for name in DIRECTIONS:
        src, dst = _parse_direction(name)
        if src not in deduped or dst not in deduped:
            continue
        row = {"n": 0, "wrong": 0, **{a: 0 for a in attributes}}
        for group, stats in group_confusion(deduped[src], deduped[dst]).items():
            want = _split_group(group, attributes, separator)
            row["n"] += stats["n"]
            for got, count in stats["top1"].items():
                if got == group:
                    continue
                row["wrong"] += count
                for attribute, a, b in zip(attributes, want, _split_group(got, attributes, separator), strict=True):
                    row[attribute] += count * (a != b)
        table[name] = row
    return table


def _split_group(group: str, attributes: Sequence[str], separator: str) -> list[str]:
    parts = group.split(separator)
    if len(parts) != len(attributes):
        raise ValueError(f"group {group!r} does not have {len(attributes)} {separator!r}-separated attributes")
    return parts


def _parse_direction(name: str) -> tuple[Modality, Modality]:
    src, dst = name.split("->")
    return Modality(src), Modality(dst)


def evaluate_embeddings(
    sets: Mapping[Modality, EmbeddingSet],
    ks: Sequence[int] = (1, 5, 10),
) -> dict:
    """Metrics for every direction in :data:`DIRECTIONS` whose two modalities are present and non-empty.

    Each set is deduplicated by key (:func:`dedupe`) and used both as queries and as gallery. A direction where no
    query has a relevant gallery item is left out (logged). ``rsum`` is the sum of ``R@k`` over ``ks`` and over the
    directions computed.

    Returns:
        ``{"directions": {"text->image": {...}, ...}, "rsum": float}``
    """
    deduped = {Modality(m): dedupe(es) for m, es in sets.items() if es is not None and len(es)}
    directions: dict[str, dict[str, float]] = {}
    for name in DIRECTIONS:
        src, dst = _parse_direction(name)
        if src not in deduped or dst not in deduped:
            continue
        metrics = direction_metrics(deduped[src], deduped[dst], ks=ks)
        if metrics["n_queries"] == 0:
            logger.warning(
                "%s: no query has a relevant gallery item (groups never match); skipped",
                name,
            )
            continue
        directions[name] = metrics
    rsum = float(sum(m[f"R@{k}"] for m in directions.values() for k in ks))
    return {"directions": directions, "rsum": rsum}


def format_table(result: Mapping) -> str:
    """Fixed-width text table of an :func:`evaluate_embeddings` result, for CLI printing."""
    directions: Mapping[str, Mapping[str, float]] = result.get("directions", {})
    recall_cols = sorted(
        {c for m in directions.values() for c in m if c.startswith("R@")},
        key=lambda c: int(c[2:]),
    ) or ["R@1", "R@5", "R@10"]
    cols = [*recall_cols, "medR", "mAP@R"]
    header = f"{'direction':<14}" + "".join(f"{c:>9}" for c in cols) + f"{'queries':>9}"
    lines = [header, "-" * len(header)]
    for name, m in directions.items():
        cells = "".join(f"{m.get(c, math.nan):>9.2f}" for c in cols)
        lines.append(f"{name:<14}{cells}{int(m.get('n_queries', 0)):>9d}")
    if not directions:
        lines.append("(no direction computable: need two modalities with matching groups)")
    lines.append("-" * len(header))
    lines.append(f"{'rsum':<14}{result.get('rsum', 0.0):>9.2f}")
    return "\n".join(lines)
