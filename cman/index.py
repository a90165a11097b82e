"""FAISS-backed gallery index: one per target modality, mapping each vector to a JSON-able item record.

Vectors are L2-normalised float32 embeddings; the metric is inner product (= cosine similarity). Kinds:

- ``"flat"``: exact ``IndexFlatIP``.
- ``"hnsw"``: ``IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT`` (``hnsw_m`` links, ``ef_search`` at query time).
- ``"ivf"``: ``IndexIVFFlat`` with inner product. IVF needs training data, so the index stays exact (flat) until it
  holds at least ``39 * nlist`` vectors (faiss' own minimum for a sound k-means); the add that crosses that size
  trains the IVF on every vector held and moves them over. Searches probe ``nprobe`` lists.
- ``"ivf_refine"``: IVF over compressed ``codes`` (``REFINE_CODES``: 8-bit scalar quantisation of the residuals by
  default) finds ``k_factor * k`` candidates, which faiss' ``IndexRefineFlat`` re-scores exactly against the stored
  full vectors. Trained like ``"ivf"`` (exact below ``39 * nlist`` vectors; k-means on at most ``40 * nlist`` of
  them). Memory per item: the codes (dim bytes for sq8) + the full vectors. ``IndexRefine`` cannot remove vectors,
  so removed items are hidden (a faiss ``IDSelector`` keeps them out of the candidates) until the live vectors are
  re-added to the trained index, once a tenth of the index is hidden.

Every vector carries an int64 *label* (faiss ids): the gallery store's sequence number of the item's add (see
``cman.gallery_db``), or a running counter. ``remove`` takes items out (flat and IVF at once; HNSW, which cannot
remove, hides them from results until the index is rebuilt; ``"ivf_refine"``: see above). This index is a replica's
in-memory search structure; the items themselves live in the gallery store. ``save`` / ``load`` write and read one
snapshot file (the cache a replica starts from, tagged with the store sequence it covers), replaced whole by one
rename.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, get_args

import faiss
import numpy as np

from cman.config import IndexKind
from cman.fsutil import fsync_dir

INDEX_KINDS = get_args(IndexKind)  # the allowed values are written once, in cman.config
FORMAT_VERSION = 2
IVF_MIN_POINTS_PER_LIST = 39
# snapshot file: MAGIC, u64 + header JSON (dim, kind, parameters, count, tag), u64 + JSON {labels, items}, the faiss
# index, u64 faiss length, SHA-256 of all before it
MAGIC = b"CMANGIX2"
PARAM_NAMES = ("kind", "nlist", "hnsw_m", "nprobe", "ef_search", "ef_construction")
REFINE_PARAM_NAMES = ("k_factor", "codes")  # absent from the snapshots of earlier releases: the defaults apply
# "ivf_refine" candidate codes -> (dimensions per code, faiss factory string): 8-bit scalar quantisation of the
# residuals (dim bytes a vector; ranks near-duplicates well), or 4-bit fast-scan PQ with one sub-quantizer per 8
# dimensions (dim / 16 bytes; faster to scan, but too coarse to rank near-duplicates: bench/README.md)
REFINE_CODES = {"sq8": (1, "SQ8"), "pq4_d8": (8, "PQ{m}x4fs")}
TRAIN_POINTS_PER_LIST = 40  # "ivf_refine": k-means on at most this many vectors per list (as bench/search_bench.py)


class GalleryIndex:
    """Inner-product search over L2-normalised vectors, each tied to an item record with a unique ``"id"``."""

    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        nlist: int = 100,
        hnsw_m: int = 32,
        nprobe: int = 16,
        ef_search: int = 128,
        ef_construction: int = 200,
        k_factor: float = 8,
        codes: str = "sq8",
    ) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
        if dim < 1:
            raise ValueError(f"index dim must be >= 1, got {dim}")
        if nlist < 1 or hnsw_m < 2 or nprobe < 1 or ef_search < 1 or ef_construction < 1:
            raise ValueError(
                f"index parameters out of range: nlist={nlist} (>=1), hnsw_m={hnsw_m} (>=2), nprobe={nprobe} (>=1), "
                f"ef_search={ef_search} (>=1), ef_construction={ef_construction} (>=1)"
            )
        if not k_factor >= 1:
            raise ValueError(f"index parameter k_factor (candidates re-scored per result) must be >= 1, got {k_factor}")
        if codes not in REFINE_CODES or (kind == "ivf_refine" and dim % REFINE_CODES[codes][0]):
            raise ValueError(
                f"index parameter codes must be one of {list(REFINE_CODES)} with a dim divisible by its dimensions "
                f"per code ({ {name: dims for name, (dims, _) in REFINE_CODES.items()} }), got {codes!r} for dim {dim}"
            )
        self.dim, self.kind, self.nlist, self.hnsw_m = int(dim), kind, int(nlist), int(hnsw_m)
        self.nprobe, self.ef_search, self.ef_construction = int(nprobe), int(ef_search), int(ef_construction)
        self.k_factor, self.codes = float(k_factor), codes
        self._items: dict[int, dict[str, Any]] = {}  # label -> record, in insertion order
        self._pos: dict[str, int] = {}  # id -> label
        self._hidden: set[int] = set()  # removed labels whose vectors the index still holds (hnsw, ivf_refine)
        self._hidden_sel: tuple[Any, ...] | None = None  # ivf_refine: faiss selector of the live positions, cached
        self._next_label = 0
        self._lock = threading.RLock()
        self._index = self._empty_index()

    @property
    def params(self) -> dict[str, Any]:
        """The constructor's keyword arguments but ``dim`` (what a rebuild of the same kind needs)."""
        return {name: getattr(self, name) for name in PARAM_NAMES + REFINE_PARAM_NAMES}

    # ----------------------------------------------------------------- construction
    def _empty_index(self) -> faiss.Index:
        if self.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.ef_construction
            inner.hnsw.efSearch = self.ef_search
        else:  # ivf starts flat until it has enough vectors to train
            inner = faiss.IndexFlatIP(self.dim)
        return faiss.IndexIDMap(inner)

    @property
    def ivf_min_size(self) -> int:
        """Size from which an ``"ivf"`` or ``"ivf_refine"`` index is actually IVF (below it, searches are exact)."""
        return IVF_MIN_POINTS_PER_LIST * self.nlist

    @property
    def is_trained_ivf(self) -> bool:
        """Whether an IVF (``"ivf"`` or ``"ivf_refine"``) is in use, rather than the exact index it starts as."""
        return self._ivf_flat or self._refined

    @property
    def _ivf_flat(self) -> bool:
        return isinstance(self._index, faiss.IndexIVF)

    @property
    def _refined(self) -> bool:
        return isinstance(self._index, faiss.IndexIDMap) and isinstance(
            faiss.downcast_index(self._index.index), faiss.IndexRefine
        )

    @property
    def hidden_count(self) -> int:
        """Removed items whose vectors the index still holds (searches skip them)."""
        return len(self._hidden)

    def _maybe_switch_to_ivf(self) -> None:
        if self.kind not in ("ivf", "ivf_refine") or self.is_trained_ivf or len(self._items) < self.ivf_min_size:
            return
        labels, vectors = self._labelled_vectors()  # (n,), (n, dim)
        if self.kind == "ivf_refine":
            self._index = faiss.IndexIDMap(self._refine_index())
            most = TRAIN_POINTS_PER_LIST * self.nlist  # the k-means cost grows with n * nlist: a sample trains it
            sample = np.random.default_rng(0).choice(len(vectors), most, replace=False) if len(vectors) > most else None
            self._index.train(vectors if sample is None else vectors[np.sort(sample)])
        else:
            quantizer = faiss.IndexFlatIP(self.dim)
            self._index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
            self._index.train(vectors)
            self._index.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct and remove by label
            self._index.nprobe = self.nprobe
        self._index.add_with_ids(vectors, labels)
        self._hidden.clear()  # the IVF holds live vectors only

    def _refine_index(self) -> faiss.IndexRefine:
        """An untrained ``IndexRefineFlat`` over an IVF of ``codes`` (faiss' index factory)."""
        refine = faiss.index_factory(
            self.dim, refine_factory(self.dim, self.nlist, self.codes), faiss.METRIC_INNER_PRODUCT
        )
        self._tune_refine(refine)
        return refine

    def _tune_refine(self, refine: faiss.IndexRefine) -> None:
        refine.k_factor = self.k_factor
        faiss.extract_index_ivf(refine.base_index).nprobe = self.nprobe

    def _search_params(self) -> faiss.SearchParameters | None:
        """``ivf_refine``: nprobe, k_factor and, with hidden items, a selector of the live positions (cached)."""
        if not self._refined:
            return None
        if self._hidden and self._hidden_sel is None:
            held = faiss.vector_to_array(self._index.id_map)  # position -> label
            gone = np.flatnonzero(np.isin(held, np.fromiter(self._hidden, dtype=np.int64)))
            batch = faiss.IDSelectorBatch(gone)
            self._hidden_sel = (faiss.IDSelectorNot(batch), batch)
        base = faiss.SearchParametersIVF(nprobe=self.nprobe)
        if self._hidden:
            base.sel = self._hidden_sel[0]
        params = faiss.IndexRefineSearchParameters(k_factor=self.k_factor, base_index_params=base)
        params.referenced_objects = [base, self._hidden_sel]  # faiss holds raw pointers only
        return params

    def _labelled_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels, vectors) of every live item, in faiss' storage order. # (n,), (n, dim)"""
        if self._ivf_flat:
            labels = np.fromiter(self._items, dtype=np.int64, count=len(self._items))
            return labels, self._index.reconstruct_batch(labels) if len(labels) else np.zeros((0, self.dim), "f4")
        inner = faiss.downcast_index(self._index.index)
        if self._refined:
            inner = faiss.downcast_index(inner.refine_index)  # the full vectors
        labels = faiss.vector_to_array(self._index.id_map)
        vectors = inner.reconstruct_n(0, inner.ntotal) if inner.ntotal else np.zeros((0, self.dim), "f4")
        if self._hidden:
            live = ~np.isin(labels, np.fromiter(self._hidden, dtype=np.int64))
            labels, vectors = labels[live], vectors[live]
        return labels, vectors

    # ----------------------------------------------------------------- validation
    def _as_matrix(self, x: np.ndarray, what: str) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(f"{what} must have shape (n, {self.dim}), got {np.shape(x)}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{what} contain NaN or inf; embed again or drop those rows")
        return np.ascontiguousarray(arr)

    def _check_items(self, items: Sequence[dict[str, Any]], n: int) -> list[str]:
        if len(items) != n:
            raise ValueError(f"add() got {n} embeddings but {len(items)} items; pass one item per row")
        ids: dict[str, None] = {}  # insertion-ordered set: O(1) duplicate checks (a 1M-item add was quadratic)
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "id" not in item:
                raise ValueError(f"item {i} must be a dict with an 'id' key, got {item!r:.80}")
            item_id = str(item["id"])
            if item_id in self._pos or item_id in ids:
                raise ValueError(f"duplicate item id {item_id!r}: ids must be unique in the index")
            ids[item_id] = None
        return list(ids)

    def _check_labels(self, labels: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
        if labels is None:
            return np.arange(self._next_label, self._next_label + n, dtype=np.int64)
        out = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(out) != n or len(set(out.tolist())) != n:
            raise ValueError(f"add() needs {n} distinct labels, got {len(out)}")
        taken = [int(label) for label in out if int(label) in self._items or int(label) in self._hidden]
        if taken:
            raise ValueError(f"label {taken[0]} is already used in this index")
        return out

    # ----------------------------------------------------------------- public API
    def add(
        self,
        embeddings: np.ndarray,
        items: Sequence[dict[str, Any]],
        labels: Sequence[int] | np.ndarray | None = None,
        *,
        copy_items: bool = True,
    ) -> None:
        """Add vectors and their item records. embeddings: # (n, dim) L2-normalised; items: n dicts with "id";
        labels: n distinct int64 faiss ids (default: a running counter). ``copy_items=False`` keeps the dicts
        themselves (for callers that made them for this index)."""
        vectors = self._as_matrix(embeddings, "embeddings")
        with self._lock:
            ids = self._check_items(items, vectors.shape[0])
            if not ids:
                return
            checked = self._check_labels(labels, len(ids))
            self._index.add_with_ids(vectors, checked)
            for item_id, item, label in zip(ids, items, checked.tolist(), strict=True):
                self._pos[item_id] = label
                self._items[label] = copy.deepcopy(dict(item)) if copy_items else item
            self._next_label = max(self._next_label, int(checked.max()) + 1)
            self._maybe_switch_to_ivf()

    def remove(self, ids: Sequence[str]) -> int:
        """Take the items with these ids out of the index (unknown ids are ignored); returns how many were held.

        Their vectors are hidden at once (searches skip them) and dropped in batches (one pass over a flat or IVF
        index per 1 % of its size removed; a refined IVF re-adds its live vectors once 10 % are hidden; faiss' HNSW
        cannot drop vectors: a rebuild does, see ``hidden_count``).
        """
        with self._lock:
            labels = [self._pos.pop(str(i)) for i in dict.fromkeys(ids) if str(i) in self._pos]
            for label in labels:
                del self._items[label]
            self._hidden.update(labels)
            self._hidden_sel = None
            share, least = (10, 1000) if self._refined else (100, 32)
            if len(self._hidden) >= max(least, len(self._items) // share):
                self.compact()
            return len(labels)

    def compact(self) -> None:
        """Drop the vectors of removed items: a flat or IVF index removes them, a refined IVF (faiss' IndexRefine
        cannot remove) is emptied and given its live vectors again (no retraining, but the add's cost: a minute or
        two at 1 M x 512 on 2 cores), HNSW keeps them hidden until rebuilt."""
        with self._lock:
            if not self._hidden or self.kind == "hnsw":
                return
            if self._refined:
                labels, vectors = self._labelled_vectors()  # (n,), (n, dim) live only
                self._index.reset()  # the trained IVF and codebooks stay
                self._index.add_with_ids(vectors, labels)
            else:
                self._index.remove_ids(np.fromiter(self._hidden, dtype=np.int64, count=len(self._hidden)))
            self._hidden.clear()
            self._hidden_sel = None

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[dict[str, Any], float]]]:
        """Top-``k`` items per query, best first. queries: # (m, dim). ``k`` is clipped to the index size."""
        q = self._as_matrix(queries, "queries")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        with self._lock:
            k = min(int(k), len(self._items))
            if k == 0:
                return [[] for _ in range(q.shape[0])]
            params = self._search_params()  # ivf_refine: hidden items are never candidates
            fetch = min(k + (0 if params else len(self._hidden)), self._index.ntotal)
            scores, labels = self._index.search(q, fetch, params=params)  # (m, fetch), (m, fetch)
            return [
                [
                    (copy.deepcopy(self._items[j]), float(s))
                    for j, s in zip(row_l, row_s, strict=True)
                    if j in self._items
                ][:k]
                for row_l, row_s in zip(labels.tolist(), scores.tolist(), strict=True)
            ]

    def __len__(self) -> int:
        return len(self._items)

    @property
    def ids(self) -> list[str]:
        with self._lock:
            return [str(item["id"]) for item in self._items.values()]

    def get(self, item_id: str) -> dict[str, Any] | None:
        """The item record with this id, or None."""
        with self._lock:
            label = self._pos.get(str(item_id))
            return None if label is None else copy.deepcopy(self._items[label])

    def label(self, item_id: str) -> int | None:
        """The faiss label of the item with this id, or None."""
        return self._pos.get(str(item_id))

    def __contains__(self, item_id: object) -> bool:
        return str(item_id) in self._pos

    def vectors(self) -> np.ndarray:
        """Every stored vector, in insertion order (row i belongs to ``records()[i]``). # (n, dim)"""
        with self._lock:
            labels, vectors = self._labelled_vectors()
            row = {label: i for i, label in enumerate(labels.tolist())}
            return vectors[[row[label] for label in self._items]] if len(self._items) else vectors

    def records(self) -> list[dict[str, Any]]:
        """Copies of every item record, in insertion order."""
        with self._lock:
            return copy.deepcopy(list(self._items.values()))

    # ----------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike[str], tag: dict[str, Any] | None = None) -> None:
        """Write the index to the single file ``path`` (see :meth:`frozen`, :func:`write_snapshot`)."""
        write_snapshot(self.frozen(tag), path)

    def frozen(self, tag: dict[str, Any] | None = None) -> tuple[bytes, bytes, faiss.Index]:
        """A consistent copy to write as a snapshot: (header JSON, labels + records JSON, faiss clone); adds and
        searches wait only for the copy. ``tag`` (JSON, in the small header) travels with it: the gallery store's id
        and the change sequence the snapshot covers."""
        with self._lock:
            if not self._refined:  # a refined IVF keeps its hidden vectors (a re-add is slow), as HNSW does
                self.compact()
            try:
                header = json.dumps({**self._meta(), "tag": tag or {}}).encode("utf-8")
                body = {"labels": list(self._items), "items": list(self._items.values())}
                text = json.dumps(body, ensure_ascii=False).encode("utf-8")
            except (TypeError, ValueError) as err:
                raise ValueError(f"item records must be JSON-serialisable to save the index ({err})") from None
            return header, text, faiss.clone_index(self._index)

    def _meta(self) -> dict[str, Any]:
        return {"version": FORMAT_VERSION, "dim": self.dim, **self.params, "count": len(self._items)}

    @staticmethod
    def read_tag(path: str | os.PathLike[str]) -> dict[str, Any]:
        """The ``tag`` a snapshot was saved with (reads the header only; no checksum check)."""
        with open(path, "rb") as f:
            return _read_header(f, Path(path)).get("tag", {})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> GalleryIndex:
        """Load a snapshot written by :meth:`save`; errors name the file and say what to do."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(
                f"{path} is a directory: an index directory of an earlier release; open it with "
                "cman.gallery_mirror.open_gallery(INDEX_DIR), which moves it into the gallery store"
            )
        if not path.is_file():
            raise FileNotFoundError(f"index snapshot {path} does not exist; build one with `cman index`")
        with open(path, "rb") as f:
            meta, body, index = _read_snapshot(f, path)
        try:
            optional = {name: meta[name] for name in REFINE_PARAM_NAMES if name in meta}
            self = cls(meta["dim"], **{name: meta[name] for name in PARAM_NAMES}, **optional)
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: the snapshot header is missing or has a bad field: {err}") from err
        return self._fill(index, body["labels"], body["items"], path)

    def _fill(self, index: faiss.Index, labels: list[int], items: list[dict[str, Any]], path: Path) -> GalleryIndex:
        if not (len(labels) == len(items) <= index.ntotal) or index.d != self.dim:
            raise ValueError(
                f"snapshot {path} is inconsistent: {len(labels)} labels, {len(items)} items, "
                f"{index.ntotal} vectors of dim {index.d} (index dim {self.dim}); delete it (it is only a cache)"
            )
        self._index = index
        if self._ivf_flat:
            index.nprobe = self.nprobe
        elif self._refined:
            self._tune_refine(faiss.downcast_index(index.index))
        elif self.kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = self.ef_search
        for label, item in zip(labels, items, strict=True):
            self._items[int(label)] = item
            self._pos[str(item["id"])] = int(label)
        if index.ntotal > len(items):  # an HNSW graph or a refined IVF with hidden (removed) items
            held = faiss.vector_to_array(index.id_map) if hasattr(index, "id_map") else np.zeros(0, np.int64)
            self._hidden = set(held.tolist()) - set(self._items)
        self._next_label = max([*self._items, *self._hidden], default=-1) + 1
        return self


def write_snapshot(frozen: tuple[bytes, bytes, faiss.Index], path: str | os.PathLike[str]) -> None:
    """Write a :meth:`GalleryIndex.frozen` copy to ``path``: a temporary file in the same directory, fsynced, then one
    ``os.replace`` (a reader sees the old file or the new one; one that opened the old file keeps reading it).
    Snapshots are the replicas' start-up cache, never the only copy of an item."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_snapshot(f, *frozen)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _write_snapshot(f: BinaryIO, header: bytes, body: bytes, index: faiss.Index) -> None:
    digest = hashlib.sha256()
    written = 0

    def put(data: bytes) -> None:
        nonlocal written
        digest.update(data)
        f.write(data)
        written += len(data)

    put(MAGIC + struct.pack("<Q", len(header)) + header + struct.pack("<Q", len(body)) + body)
    start = written
    writer = faiss.PyCallbackIOWriter(put)
    faiss.write_index(index, writer)
    del writer
    put(struct.pack("<Q", written - start))
    f.write(digest.digest())
    f.flush()
    os.fsync(f.fileno())


def _read_header(f: BinaryIO, path: Path) -> dict[str, Any]:
    """The small JSON header at the start of a snapshot (dim, kind, parameters, count, tag)."""
    head = f.read(16)
    if len(head) < 16 or head[:8] != MAGIC:
        raise ValueError(f"{path} is not a gallery index snapshot (bad magic); delete it (it is only a cache)")
    meta = _read_json_block(f, struct.unpack("<Q", head[8:])[0], path)
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported snapshot version {meta.get('version')!r}")
    return meta


def _read_json_block(f: BinaryIO, size: int, path: Path) -> dict[str, Any]:
    try:
        return json.loads(f.read(size))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path}: a snapshot header is not valid JSON ({err}); delete it (it is only a cache)"
        ) from err


def _read_snapshot(f: BinaryIO, path: Path) -> tuple[dict[str, Any], dict[str, Any], faiss.Index]:
    total = os.fstat(f.fileno()).st_size
    meta = _read_header(f, path)
    body = _read_json_block(f, struct.unpack("<Q", f.read(8).rjust(8, b"\0"))[0], path)
    index_start = f.tell()
    digest = hashlib.sha256()
    f.seek(0)
    digest.update(f.read(index_start))
    remaining = total - index_start - 8 - 32

    def get(n: int) -> bytes:
        nonlocal remaining
        data = f.read(max(0, min(n, remaining)))
        remaining -= len(data)
        digest.update(data)
        return data

    try:
        index = faiss.read_index(faiss.PyCallbackIOReader(get))
    except RuntimeError as err:
        raise ValueError(f"{path} holds no readable faiss index ({err}); delete it (it is only a cache)") from err
    trailer = f.read(8)
    digest.update(trailer)
    if remaining != 0 or struct.unpack("<Q", trailer)[0] != f.tell() - 8 - index_start or f.read() != digest.digest():
        raise ValueError(f"{path} does not match its checksum (torn or partial write); delete it (it is only a cache)")
    return meta, body, index


def refine_factory(dim: int, nlist: int, codes: str) -> str:
    """The faiss ``index_factory`` string of an ``"ivf_refine"`` index: e.g. ``IVF1024,PQ64x4fs,RFlat`` (512-d)."""
    dims, pattern = REFINE_CODES[codes]
    return f"IVF{nlist},{pattern.format(m=dim // dims)},RFlat"


def auto_params(n: int, exact_max: int, ann_kind: str = "ivf_refine") -> dict[str, Any]:
    """``serve.index_kind: auto``: exact search up to ``exact_max`` items, ``ann_kind`` above (bench/README.md).

    ``"ivf_refine"`` (the default): nlist = 2^round(log2 4 sqrt(n)) (64-16384, at most n / 39 so that the IVF can
    train), nprobe = nlist / 16, ``codes`` sq8, ``k_factor`` 8. Measured on a 2-core EPYC (bench/README.md) with
    ``bench/search_bench.py --n 1000000 --dim 512 --kinds ivf_flat ivf_refine --refine-codes sq8 pq4_d8 --threads 1``
    (hard synthetic set) and ``... --n 1000000 --no-synthetic --real-index INDEX_DIR --spread 0.5 ...`` (real CMAN
    embeddings + noise): at 1M (4096 lists, nprobe 256) recall@10 0.997 / 1.000 at 18x / 14x the exact search's
    batch-1 queries/s, at 200k (2048, 128) 0.956 / 1.000 at 17x / 12x. 1024 lists needed nprobe 512 on the hard set
    (0.993 at 5x); nprobe 128 of 4096 gave 0.967 on the real one; 4-bit PQ codes (``pq4_d8``) cannot rank its
    near-duplicates (recall 0.02). ``"ivf"`` (IVF-flat, earlier releases): about sqrt(n) lists (64-4096) and
    nprobe = lists / 8: 0.917 at 7x on the hard set at 1M.
    """
    if ann_kind not in ("ivf_refine", "ivf", "hnsw"):
        raise ValueError(f"serve.index_auto_ann must be ivf_refine, ivf or hnsw, got {ann_kind!r}")
    if n <= exact_max:
        return {"kind": "flat"}
    if ann_kind == "hnsw":
        return {"kind": "hnsw"}
    if ann_kind == "ivf":
        nlist = int(min(4096, max(64, 2 ** round(np.log2(np.sqrt(n))))))
        return {"kind": "ivf", "nlist": nlist, "nprobe": nlist // 8}
    nlist = 2 ** round(np.log2(4 * np.sqrt(n)))
    nlist = int(min(16384, max(64, min(nlist, 2 ** int(np.log2(max(1, n // IVF_MIN_POINTS_PER_LIST)))))))
    return {"kind": "ivf_refine", "nlist": nlist, "nprobe": nlist // 16, "k_factor": 8, "codes": "sq8"}
