"""FAISS-backed gallery index: one per target modality, mapping each vector to a JSON-able item record.

Vectors are L2-normalised float32 embeddings; the metric is inner product (= cosine similarity). Kinds:

- ``"flat"``: exact ``IndexFlatIP``.
- ``"hnsw"``: ``IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT`` (``hnsw_m`` links, ``ef_search`` at query time).
- ``"ivf"``: ``IndexIVFFlat`` with inner product. IVF needs training data, so the index stays exact (flat) until it
  holds at least ``39 * nlist`` vectors (faiss' own minimum for a sound k-means); the add that crosses that size
  trains the IVF on every vector held and moves them over. Searches probe ``nprobe`` lists.

Faiss labels are positions in a parallel list of item records (``{"id", "caption"?, "image_path"?, ...}``).
On disk (``save``/``load``) a directory holds versions ``v-<n>/`` (``index.faiss``, ``items.json``, ``index.json``
with dim, kind, count and checksums) and a symlink ``CURRENT`` switched to a new version by one rename. A gallery
directory (``open_gallery``) holds one such index per modality, ``wal/`` (adds since the snapshots, see
``cman.gallery_log``) and ``media/`` (files of added items).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

import faiss
import numpy as np

from cman.config import IndexKind
from cman.fsutil import fsync_dir, fsync_file
from cman.modality import Modality

INDEX_KINDS = get_args(IndexKind)  # the allowed values are written once, in cman.config
FORMAT_VERSION = 1
IVF_MIN_POINTS_PER_LIST = 39
INDEX_FILE, ITEMS_FILE, META_FILE, CURRENT = "index.faiss", "items.json", "index.json", "CURRENT"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        self.dim, self.kind, self.nlist, self.hnsw_m = (
            int(dim),
            kind,
            int(nlist),
            int(hnsw_m),
        )
        self.nprobe, self.ef_search, self.ef_construction = (
            int(nprobe),
            int(ef_search),
            int(ef_construction),
        )
        self._items: list[dict[str, Any]] = []
        self._pos: dict[str, int] = {}
        self._lock = threading.RLock()
        self._index = self._empty_index()

    # ----------------------------------------------------------------- construction
    def _empty_index(self) -> faiss.Index:
        if self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self.ef_search
            return index
        # ivf starts flat until it has enough vectors to train
        return faiss.IndexFlatIP(self.dim)

    @property
    def ivf_min_size(self) -> int:
        """Size from which an ``"ivf"`` index is actually IVF (below it, searches are exact)."""
        return IVF_MIN_POINTS_PER_LIST * self.nlist

    @property
    def is_trained_ivf(self) -> bool:
        return isinstance(self._index, faiss.IndexIVF)

    def _maybe_switch_to_ivf(self) -> None:
        if self.kind != "ivf" or self.is_trained_ivf or self._index.ntotal < self.ivf_min_size:
            return
        vectors = self._index.reconstruct_n(0, self._index.ntotal)  # (n, dim)
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(vectors)
        ivf.add(vectors)
        ivf.nprobe = self.nprobe
        self._index = ivf

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

    # ----------------------------------------------------------------- public API
    def add(self, embeddings: np.ndarray, items: Sequence[dict[str, Any]]) -> None:
        """Add vectors and their item records. embeddings: # (n, dim) L2-normalised; items: n dicts with "id"."""
        vectors = self._as_matrix(embeddings, "embeddings")
        with self._lock:
            ids = self._check_items(items, vectors.shape[0])
            if not ids:
                return
            self._index.add(vectors)
            for item_id, item in zip(ids, items, strict=True):
                self._pos[item_id] = len(self._items)
                self._items.append(copy.deepcopy(dict(item)))
            self._maybe_switch_to_ivf()

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[dict[str, Any], float]]]:
        """Top-``k`` items per query, best first. queries: # (m, dim). ``k`` is clipped to the index size."""
        q = self._as_matrix(queries, "queries")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        with self._lock:
            k = min(int(k), len(self._items))
            if k == 0:
                return [[] for _ in range(q.shape[0])]
            scores, labels = self._index.search(q, k)  # (m, k), (m, k)
            return [
                [(copy.deepcopy(self._items[j]), float(s)) for j, s in zip(row_l, row_s, strict=True) if j >= 0]
                for row_l, row_s in zip(labels, scores, strict=True)
            ]

    def __len__(self) -> int:
        return len(self._items)

    @property
    def ids(self) -> list[str]:
        return [str(item["id"]) for item in self._items]

    def get(self, item_id: str) -> dict[str, Any] | None:
        """The item record with this id, or None."""
        pos = self._pos.get(str(item_id))
        return None if pos is None else copy.deepcopy(self._items[pos])

    def __contains__(self, item_id: object) -> bool:
        return str(item_id) in self._pos

    def vectors(self) -> np.ndarray:
        """Every stored vector, in insertion order (row i belongs to ``records()[i]``). # (n, dim)"""
        with self._lock:
            if self.is_trained_ivf:
                self._index.make_direct_map()
            return self._index.reconstruct_n(0, self._index.ntotal) if len(self) else np.zeros((0, self.dim), "f4")

    def records(self) -> list[dict[str, Any]]:
        """Copies of every item record, in insertion order."""
        with self._lock:
            return copy.deepcopy(self._items)

    # ----------------------------------------------------------------- persistence
    def _meta(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "dim": self.dim,
            "kind": self.kind,
            "count": len(self._items),
            "nlist": self.nlist,
            "hnsw_m": self.hnsw_m,
            "nprobe": self.nprobe,
            "ef_search": self.ef_search,
            "ef_construction": self.ef_construction,
        }

    def _frozen(self) -> tuple[faiss.Index, str, dict[str, Any]]:
        """A consistent copy (faiss clone, items JSON, meta), taken under the lock; searches wait only for the copy."""
        with self._lock:
            try:
                items_text = json.dumps(self._items, ensure_ascii=False)
            except (TypeError, ValueError) as err:
                raise ValueError(f"item records must be JSON-serialisable to save the index ({err})") from err
            return faiss.clone_index(self._index), items_text, self._meta()

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the index into a new version directory under ``directory`` and switch ``CURRENT`` to it.

        The version (``index.faiss``, ``items.json``, ``index.json`` with checksums) is written and fsynced in full
        under a temporary name, renamed to ``v-<n>``, and then the symlink ``directory/CURRENT`` is replaced by one
        ``os.replace``: a reader sees the old version or the new one, never a mix. Older versions are removed after
        the switch. A failure before the switch (e.g. an item that is not JSON-serialisable) changes nothing.
        """
        directory = Path(directory)
        try:
            index, items_text, meta = self._frozen()
        except ValueError as err:
            raise ValueError(f"cannot save index to {directory}: {err}") from None
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-v-", dir=directory))
        try:
            faiss.write_index(index, str(tmp / INDEX_FILE))
            fsync_file(tmp / INDEX_FILE)
            _write_synced(tmp / ITEMS_FILE, items_text)
            meta["sha256"] = {INDEX_FILE: _sha256(tmp / INDEX_FILE), ITEMS_FILE: _sha256(tmp / ITEMS_FILE)}
            _write_synced(tmp / META_FILE, json.dumps(meta, indent=2))
            fsync_dir(tmp)
            version = directory / f"v-{_next_version(directory)}"
            os.rename(tmp, version)
            switch_symlink(directory / CURRENT, version.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in directory.iterdir():  # superseded versions and files of the pre-versioned layout
            if old.name != version.name and old.name != CURRENT and not old.name.startswith(".tmp-"):
                shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink(missing_ok=True)

    @staticmethod
    def current_path(directory: str | os.PathLike[str]) -> Path:
        """The directory holding the files of the index saved at ``directory`` (its current version)."""
        directory = Path(directory)
        link = directory / CURRENT
        if link.is_symlink() or link.exists():
            return directory / os.readlink(link)
        return directory  # an index saved before versioned directories

    @staticmethod
    def exists(directory: str | os.PathLike[str]) -> bool:
        return (GalleryIndex.current_path(directory) / META_FILE).is_file()

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> GalleryIndex:
        """Load an index written by :meth:`save`; errors name the offending path."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"index directory {directory} does not exist; build one with `cman index`")
        directory = cls.current_path(directory)
        meta = _read_json(directory / META_FILE, dict)
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{directory / META_FILE}: unsupported index version {meta.get('version')!r}")
        for name in (INDEX_FILE, ITEMS_FILE):
            path = directory / name
            if not path.is_file():
                raise FileNotFoundError(f"index file {path} is missing; rebuild the index")
            expected = meta.get("sha256", {}).get(name)
            if expected is not None and _sha256(path) != expected:
                raise ValueError(f"{path} does not match {directory / META_FILE} (torn or partial save); rebuild")
        items = _read_json(directory / ITEMS_FILE, list)
        try:
            index = faiss.read_index(str(directory / INDEX_FILE))
        except RuntimeError as err:
            raise ValueError(f"{directory / INDEX_FILE} is not a readable faiss index: {err}") from err
        try:
            self = cls(
                dim=meta["dim"],
                kind=meta["kind"],
                nlist=meta.get("nlist", 100),
                hnsw_m=meta.get("hnsw_m", 32),
                nprobe=meta.get("nprobe", 16),
                ef_search=meta.get("ef_search", 128),
                ef_construction=meta.get("ef_construction", 200),
            )
        except (KeyError, TypeError) as err:
            raise ValueError(f"{directory / META_FILE} is missing or has a bad field: {err}") from err
        count = meta.get("count")
        if not (count == len(items) == index.ntotal) or index.d != self.dim:
            raise ValueError(
                f"index at {directory} is inconsistent: index.json count={count}, dim={self.dim}; "
                f"items.json has {len(items)} items; index.faiss has {index.ntotal} vectors of dim {index.d}"
            )
        if isinstance(index, faiss.IndexIVF):
            index.nprobe = self.nprobe
        if isinstance(index, faiss.IndexHNSW):
            index.hnsw.efSearch = self.ef_search
        self._index = index
        for i, item in enumerate(items):
            if not isinstance(item, dict) or "id" not in item or str(item["id"]) in self._pos:
                raise ValueError(f"{directory / ITEMS_FILE}: entry {i} is not an item with a unique 'id'; rebuild")
            self._pos[str(item["id"])] = i
        self._index = index
        self._items = items
        return self


def _next_version(directory: Path) -> int:
    numbers = [int(p.name[2:]) for p in directory.glob("v-*") if p.name[2:].isdigit()]
    return max(numbers, default=0) + 1


def switch_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` (relative) with one atomic rename, then fsync the directory."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path, expected: type) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"index file {path} is missing; rebuild the index")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rebuild the index") from err
    if not isinstance(data, expected):
        raise ValueError(  # noqa: TRY004 - a corrupt file, not a caller's type error
            f"{path} should hold a JSON {expected.__name__}, got {type(data).__name__}"
        )
    return data


def auto_params(n: int, exact_max: int, ann_kind: str = "ivf") -> dict[str, Any]:
    """``serve.index_kind: auto``: exact search up to ``exact_max`` items, ``ann_kind`` above (bench/README.md).

    IVF gets about sqrt(n) lists (a power of two, 64-4096) and probes 1/8 of them: measured at 1M (bench/README.md),
    1024 lists with nprobe 128 gave recall@10 0.976 at 16x the exact search's queries/s; nprobe 16 only 0.51.
    """
    if n <= exact_max:
        return {"kind": "flat"}
    if ann_kind == "hnsw":
        return {"kind": "hnsw"}
    nlist = int(min(4096, max(64, 2 ** round(np.log2(np.sqrt(n))))))
    return {"kind": "ivf", "nlist": nlist, "nprobe": nlist // 8}


def load_gallery(
    index_dir: str | os.PathLike[str], modalities: Sequence[str] = (), dim: int | None = None, **params: Any
) -> tuple[dict[Modality, GalleryIndex], dict[str, int]]:
    """:func:`open_gallery`, plus the log position reached (segment name -> byte offset) for a process that tails it."""
    from cman import gallery_log

    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise FileNotFoundError(f"index directory {index_dir} does not exist; build one with `cman index`")
    gallery: dict[Modality, GalleryIndex] = {}
    for modality in Modality:
        if GalleryIndex.exists(index_dir / modality.value):
            gallery[modality] = GalleryIndex.load(index_dir / modality.value)
        elif modality.value in modalities and dim is not None:
            gallery[modality] = GalleryIndex(dim, **params)
    offsets: dict[str, int] = {}
    gallery_log.replay(gallery, index_dir / gallery_log.LOG_DIR, offsets, lambda dim: GalleryIndex(dim, **params))
    return gallery, offsets


def open_gallery(
    index_dir: str | os.PathLike[str], modalities: Sequence[str] = (), dim: int | None = None, **params: Any
) -> dict[Modality, GalleryIndex]:
    """Load a whole index directory: every ``<modality>/`` snapshot, then the write-ahead log ``wal/`` replayed on top.

    This is what the Retriever serves. ``modalities`` + ``dim`` (+ GalleryIndex ``params``) create empty indexes for
    modalities without a snapshot. Replay is idempotent: a logged item already in a snapshot is skipped.
    """
    return load_gallery(index_dir, modalities, dim, **params)[0]
