"""`cman.Gallery`: a gallery in this process — load an index directory, or build one from items or a folder with a
model; add, remove, search; save it as an index directory that `cman serve --index DIR` serves.

    gallery = Gallery.build(model, "photos/")                 # every image, audio and .txt file, paired by stem
    gallery.add({"id": "dog", "text": "a dog on a beach", "image": "dog.jpg"})
    hits = gallery.search(model.encode_text("a dog"), target="image", k=5)
    gallery.save("index/")                                    # then: cman serve --checkpoint C --index index/

An item is one medium per modality: each is embedded on its own and joins that modality's gallery (what `cman index`
does). Media given as paths stay where they are (the saved index names them; the Retriever serves files under the
`root` of `index_meta.json`); media given as bytes (or PIL images) are stored in the gallery store itself, as the
service stores uploads. `media(id, kind)` returns an item's image or audio bytes either way.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cman.gallery_persist import encode_skipping, entries_of, media_suffix, previous_meta, read_blob, stored_root
from cman.modality import ALL_MODALITIES, Modality

if TYPE_CHECKING:
    from cman.index import GalleryIndex
    from cman.models.cman import CMAN

logger = logging.getLogger(__name__)

ITEM_KEYS = ("id", "text", "caption", "image", "audio", "group")
MAX_ID_CHARS = 128


class Gallery:
    """Items embedded per modality, searchable in-process; `load` / `save` an index directory (its gallery store
    DIR/gallery.db, the FAISS snapshots, index_meta.json).

    `search` returns what the HTTP service's `/search` returns in `results` (id, score, caption), with the local file
    path (`image_path`, `audio_path`) of media that are files; `media(id, kind)` reads any item's media.
    """

    def __init__(
        self,
        indexes: dict[str, GalleryIndex] | None = None,
        directory: str | Path | None = None,
        model: CMAN | None = None,
        *,
        store_url: str | None = None,
        store_id: str | None = None,
    ) -> None:
        self.indexes = dict(indexes or {})
        self.directory = Path(directory) if directory is not None else None
        self.model = model
        self.store_url = store_url
        self._store_id = store_id  # the store `directory` holds, if this gallery was loaded from / saved to it
        self._pending: dict[str, tuple[dict, dict[str, np.ndarray], dict[str, tuple[str, bytes]]]] = {}
        self._removed: set[str] = set()

    # ---- opening ---------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, model: CMAN | None = None, store_url: str | None = None) -> Gallery:
        """The gallery of an index directory, as a Retriever replica loads it (`model`: for `add` and text queries;
        `store_url`: the config's `serve.gallery_store` if it is not the default DIR/gallery.db)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"index directory {directory} not found; build it with `cman index --out DIR`")
        from cman.gallery_mirror import open_gallery, open_store  # the gallery store, as a Retriever replica loads it

        indexes = {m.value: index for m, index in open_gallery(directory, store_url).items()}
        if not indexes:
            names = ", ".join(m.value for m in ALL_MODALITIES)
            raise FileNotFoundError(f"{directory} holds a gallery without {names} vectors; build it with `cman index`")
        db = open_store(directory, store_url, create=False)
        try:
            store_id = db.store_id
        finally:
            db.close()
        return cls(indexes, directory, model, store_url=store_url, store_id=store_id)

    @classmethod
    def build(
        cls, model: CMAN, items_or_folder: Any, *, batch_size: int = 32, show_progress_bar: bool = False
    ) -> Gallery:
        """A new gallery of `items_or_folder` (see `add`) embedded with `model`; `save` writes it."""
        gallery = cls(model=model)
        gallery.add(items_or_folder, batch_size=batch_size, show_progress_bar=show_progress_bar)
        return gallery

    # ---- reading ---------------------------------------------------------------------------------------------------
    @property
    def targets(self) -> list[str]:
        return [name for name, index in self.indexes.items() if len(index)]

    @property
    def ids(self) -> list[str]:
        """Every item id (once, whatever the modalities it has)."""
        return list(dict.fromkeys(i for index in self.indexes.values() for i in index.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: object) -> bool:
        return any(item_id in index for index in self.indexes.values())

    def get(self, item_id: str) -> dict[str, Any] | None:
        """The item's record (id, group, caption, image_path, audio_path as stored), or None."""
        for index in self.indexes.values():
            record = index.get(item_id)
            if record is not None:
                return record
        return None

    def media(self, item_id: str, kind: str) -> bytes | None:
        """The bytes of the item's `kind` ("image" / "audio"): its file, or the blob in the gallery store; None if
        it has none."""
        record = self.get(item_id) or {}
        name = record.get(f"{kind}_path")
        if not name:
            return None
        if item_id in self._pending and kind in self._pending[item_id][2]:
            return self._pending[item_id][2][kind][1]
        if Path(name).is_absolute():
            return Path(name).read_bytes() if Path(name).is_file() else None
        if self.directory is None:
            return None
        return read_blob(self.directory, self.store_url, item_id, kind)

    def search(self, query: Any, target: str | Modality, k: int = 10) -> list[Any]:
        """Top-`k` items of the `target` gallery, best first. `query`: an embedding (a (n, dim) array gives one list
        per row), or a text (a list of texts) when the gallery has a model."""
        target = target.value if isinstance(target, Modality) else str(target)
        if target not in self.indexes:
            raise ValueError(f"unknown target {target!r}: this gallery has {self.targets}")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if isinstance(query, str) or (isinstance(query, list | tuple) and query and isinstance(query[0], str)):
            if self.model is None:
                raise ValueError("a text query needs a model: Gallery.load(dir, model=...) or pass an embedding")
            query = self.model.encode_text(query if isinstance(query, str) else list(query))
        query = np.asarray(query, dtype=np.float32)
        hits = self.indexes[target].search(query, int(k))
        rows = [[_result(item, score) for item, score in row] for row in hits]
        return rows if query.ndim == 2 else rows[0]

    # ---- changing --------------------------------------------------------------------------------------------------
    def add(
        self,
        items_or_folder: Any,
        *,
        model: CMAN | None = None,
        batch_size: int = 32,
        show_progress_bar: bool = False,
        skip_bad: bool | None = None,
    ) -> list[str]:
        """Embed and add items; returns the ids added. `items_or_folder`: a folder (every image, audio and .txt file
        under it, paired by stem: `cman.data.folder`), one item or a list of items. An item is a dict with "id" and
        any of "text", "image" (a path, bytes or a PIL image), "audio" (a path or bytes), "group"; or a dataset Item.
        An id already in the gallery is an error (remove it first). Media that cannot be decoded are an error, or,
        with `skip_bad` (the default for a folder), left out (logged). In memory until `save`."""
        model = model or self.model
        if model is None:
            raise ValueError("adding items needs a model: Gallery.build(model, ...), Gallery.load(dir, model=...)")
        self.model = self.model or model
        if skip_bad is None:
            skip_bad = isinstance(items_or_folder, str | os.PathLike)
        items = _as_items(items_or_folder)
        self._check_new_ids(items)
        vectors = _embed_items(model, items, batch_size, show_progress_bar, skip_bad)
        added = []
        for item in items:
            if vectors[item["id"]]:
                record, media = _record(item)
                self._insert(record, vectors[item["id"]], media)
                added.append(item["id"])
        return added

    def _check_new_ids(self, items: list[dict[str, Any]]) -> None:
        seen: set[str] = set()
        for item in items:
            item_id = item["id"]
            if item_id in seen or item_id in self:
                raise ValueError(f"id {item_id!r} is already in the gallery; remove it first or choose another id")
            seen.add(item_id)

    def _insert(self, record: dict, vectors: dict[str, np.ndarray], media: dict[str, tuple[str, bytes]]) -> None:
        from cman.index import GalleryIndex

        for name, vector in vectors.items():
            if name not in self.indexes:
                self.indexes[name] = GalleryIndex(len(vector))
            self.indexes[name].add(vector[None], [record])
        self._pending[record["id"]] = (record, vectors, media)

    def remove(self, item_ids: str | Iterable[str]) -> int:
        """Take items out (unknown ids are ignored); returns how many were held. In memory until `save`."""
        ids = [item_ids] if isinstance(item_ids, str) else [str(i) for i in item_ids]
        removed = 0
        for item_id in ids:
            held = sum(index.remove([item_id]) for index in self.indexes.values())
            if held:
                removed += 1
                self._pending.pop(item_id, None)
                if self._store_id is not None:  # saved back, the store deletes it (a no-op if it was never saved)
                    self._removed.add(item_id)
        return removed

    # ---- saving ----------------------------------------------------------------------------------------------------
    def save(self, directory: str | Path | None = None, *, kind: str = "flat") -> Path:
        """Write the gallery as an index directory (`cman serve --index DIR` serves it); returns the directory.

        Saved back to the directory it was loaded from, only the changes are written (adds and removals, each one
        transaction of the store); saved elsewhere, the directory must not hold another gallery. `kind`: the FAISS
        index of the snapshots (`flat`, `ivf`, `hnsw`, `auto`)."""
        from cman.config import ServeConfig
        from cman.gallery_build import write_meta, write_snapshots
        from cman.gallery_mirror import open_store

        target = Path(directory) if directory is not None else self.directory
        if target is None:
            raise ValueError("save() needs a directory (this gallery was built in memory)")
        target.mkdir(parents=True, exist_ok=True)
        same = target.resolve() == (self.directory.resolve() if self.directory else None)
        db = open_store(target, self.store_url if same else None)
        try:
            if self._store_id is not None and db.store_id == self._store_id:
                self._save_changes(db)
            else:
                self._save_all(db, target)
            counts = write_snapshots(db, target, kind)
            store_id = db.store_id
        finally:
            db.close()
        root = stored_root(target, self.indexes.values())
        before = previous_meta(target) if same else {}  # what `cman index` said of it: checkpoint, split, folder
        serve = ServeConfig(gallery_store=self.store_url) if same and self.store_url else None
        extra = {key: before[key] for key in ("folder",) if key in before}
        checkpoint, split = before.get("checkpoint"), before.get("split")
        write_meta(target, checkpoint, split, root, kind, len(self), counts, serve, built_by="cman.Gallery", **extra)
        self.directory, self._store_id = target, store_id
        self.store_url = self.store_url if same else None
        self._pending.clear()
        self._removed.clear()
        logger.info("gallery saved to %s: %s", target, counts)
        return target

    def _save_changes(self, db: Any) -> None:
        for item_id in sorted(self._removed):
            db.delete(item_id)
        for record, vectors, media in self._pending.values():
            db.add(record["id"], record, vectors, media or None)

    def _save_all(self, db: Any, target: Path) -> None:
        from cman.gallery_build import put_entries

        if db.count():
            raise ValueError(
                f"{target} already holds another gallery ({db.count()} items): save to a new directory, or "
                "Gallery.load it and add to that one"
            )
        entries = entries_of(self.indexes, self._pending, self.directory, self.store_url)
        put_entries(db, entries)

    def __repr__(self) -> str:
        counts = {name: len(index) for name, index in self.indexes.items()}
        return f"Gallery({len(self)} items, {counts}, directory={str(self.directory) if self.directory else None})"


def _embed_items(
    model: CMAN, items: list[dict], batch_size: int, progress: bool, skip_bad: bool
) -> dict[str, dict[str, np.ndarray]]:
    """id -> modality -> the embedding of that medium alone (what `cman index` stores)."""
    out: dict[str, dict[str, np.ndarray]] = {item["id"]: {} for item in items}
    for modality in ALL_MODALITIES:
        having = [item for item in items if item.get(modality.value) is not None]
        if not having:
            continue
        if modality not in model.modalities:
            raise ValueError(f"item {having[0]['id']!r} has {modality.value}, but the model has no such encoder")
        values = [item[modality.value] for item in having]
        vectors = encode_skipping(model, modality, values, batch_size, progress, skip_bad)
        for item, vector in zip(having, vectors, strict=True):
            if vector is not None:
                out[item["id"]][modality.value] = vector
    return out


def _result(item: dict[str, Any], score: float) -> dict[str, Any]:
    """A search result: id, score, caption, and the paths of media that are files (stored blobs: `Gallery.media`)."""
    out: dict[str, Any] = {"id": item["id"], "score": float(score)}
    if item.get("caption"):
        out["caption"] = item["caption"]
    for kind in ("image_path", "audio_path"):
        if item.get(kind) and Path(item[kind]).is_absolute():
            out[kind] = item[kind]
    return out


def _as_items(items_or_folder: Any) -> list[dict[str, Any]]:
    """Items as dicts {"id", "group", "text"?, "image"?, "audio"?}: media as absolute paths or bytes."""
    if isinstance(items_or_folder, str | os.PathLike):
        from cman.data.folder import scan_folder

        items_or_folder = scan_folder(items_or_folder)
    if isinstance(items_or_folder, dict) or hasattr(items_or_folder, "image_path"):
        items_or_folder = [items_or_folder]
    return [_as_item(raw, i) for i, raw in enumerate(items_or_folder)]


def _as_item(raw: Any, i: int) -> dict[str, Any]:
    if hasattr(raw, "image_path"):  # a cman.data.dataset.Item
        raw = {"id": raw.id, "group": raw.group, "text": raw.caption, "image": raw.image_path, "audio": raw.audio_path}
    if not isinstance(raw, dict):
        raise ValueError(f"item {i}: expected a dict with an 'id' (and text / image / audio), got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(ITEM_KEYS))
    item_id = raw.get("id")
    if unknown or not isinstance(item_id, str) or not 0 < len(item_id) <= MAX_ID_CHARS:
        raise ValueError(
            f"item {i}: needs an 'id' string of 1-{MAX_ID_CHARS} characters and only the keys {ITEM_KEYS} "
            f"(got id {item_id!r}, unknown keys {unknown})"
        )
    text = raw.get("text", raw.get("caption"))
    item = {"id": item_id, "group": str(raw.get("group") or item_id), "text": text}
    for kind in ("image", "audio"):
        item[kind] = _medium(raw.get(kind), kind, item_id)
    if all(item[k] is None for k in ("text", "image", "audio")):
        raise ValueError(f"item {item_id!r} has no text, image or audio")
    return item


def _medium(value: Any, kind: str, item_id: str) -> Path | bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str | os.PathLike):
        path = Path(value).resolve()
        if not path.is_file():
            raise ValueError(f"item {item_id!r}: {kind} file {value} not found")
        return path
    if kind == "image" and hasattr(value, "save"):  # a PIL image: stored as PNG
        out = io.BytesIO()
        value.convert("RGB").save(out, format="PNG")
        return out.getvalue()
    raise ValueError(f"item {item_id!r}: {kind} must be a path or bytes, got {type(value).__name__}")


def _record(item: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[str, bytes]]]:
    """The stored record of an item and its media blobs (kind -> (name, bytes)) for media given as bytes."""
    record: dict[str, Any] = {"id": item["id"], "group": item["group"]}
    if item["text"] is not None:
        record["caption"] = item["text"]
    media = {}
    for kind in ("image", "audio"):
        value = item[kind]
        if isinstance(value, bytes):
            name = f"media/{item['id']}.{kind}{media_suffix(value)}"
            media[kind] = (name, value)
            record[f"{kind}_path"] = name
        elif value is not None:
            record[f"{kind}_path"] = str(value)
    return record, media
