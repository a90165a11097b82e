"""Retriever deployment: fusion transformer + the gallery of INDEX_DIR (one GalleryIndex per target modality).

It sends each query modality to its encoder deployment (concurrently), fuses the returned token streams into one
embedding, and searches the target index. The gallery store (SQLite or PostgreSQL: `serve.gallery_store`), this
replica's FAISS mirror of it and the replica sync live in `serve_app.gallery_store`; media names and confined media
reads in `serve_app.media`. Only the fusion transformer and the projections are loaded
(`CMAN.from_pretrained(dir, modalities=[])`); the encoders are other deployments.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from cman.config import ServeConfig
from cman.gallery_db import StoredItem, content_digest
from cman.gallery_mirror import IndexPolicy
from cman.index import GalleryIndex
from cman.modality import Modality
from cman.precision import resolve_dtype
from cman.steps import autocast
from serve_app.encoders import inference_device, limit_threads
from serve_app.errors import RequestError, raise_if_error
from serve_app.gallery_store import GalleryStore
from serve_app.media import allowed_roots, media_name, media_type, read_media, strip_image_metadata
from serve_app.queries import FUSE_BATCH, field, info, item_vector, links, padded, query_vector

logger = logging.getLogger(__name__)

ITEM_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # used with fullmatch: no trailing newline


def client_errors(method):
    """Return a RequestError as `{"error", "status"}` (a value, so the replica logs no traceback for bad input)."""

    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        try:
            result = method(self, *args, **kwargs)
            return await result if asyncio.iscoroutine(result) else result
        except RequestError as err:
            return err.to_dict()

    return wrapper


def request_digest(payloads: dict[str, Any]) -> str:
    """What makes two add requests "the same item": the text and the bytes of the media as sent."""
    media = {kind: payloads[kind] for kind in ("image", "audio") if kind in payloads}
    return content_digest({"text": payloads.get("text")}, media)


class RetrieverServer:
    """Fuses encoder streams into embeddings, answers searches and adds items to the gallery."""

    def __init__(
        self,
        encoders: dict[str, DeploymentHandle],
        checkpoint: str,
        index_dir: str,
        index_kind: str = "auto",
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        serve_config: dict[str, Any] | None = None,
    ) -> None:
        from cman.models.cman import CMAN

        limit_threads(num_cpus)
        cfg = ServeConfig.model_validate(serve_config or {})
        model = CMAN.from_pretrained(checkpoint, modalities=[])  # fusion + projections only
        self.device = inference_device(num_gpus)
        self.fusion = model.fusion.to(self.device).eval()
        self.dtype = resolve_dtype(self.device, cfg.dtype, purpose="serving")
        self.width = model.config.model.fusion.width
        self.modalities = list(json.loads((Path(checkpoint) / "metadata.json").read_text())["base_models"])
        self.dim = model.config.model.embedding_dim
        del model
        self.encoders = encoders
        self.index_dir = Path(index_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self.media_roots = allowed_roots(self.index_dir)
        policy = IndexPolicy(index_kind, cfg.index_auto_exact_max, cfg.index_auto_ann)
        self.store = GalleryStore(
            self.index_dir, cfg.gallery_store, self.modalities, self.dim, policy, sync_s=cfg.gallery_sync_s
        )
        logger.info("retriever ready (gallery from the %s): %s", self.store.source, self.counts())

    @property
    def indexes(self) -> dict[str, GalleryIndex]:
        """This replica's search indexes (a rebuild swaps one in whole)."""
        return {m.value: ix for m, ix in list(self.store.indexes.items()) if m.value in self.modalities}

    def check_health(self) -> None:
        """Serve's periodic health check: a tiny fusion forward. A store that cannot be reached does not fail it:
        searches go on from memory, writes answer 503 until the store is back."""
        self._fuse({Modality.TEXT: (np.zeros((1, self.width), np.float32), np.ones(1, bool))})

    # ---- embedding -------------------------------------------------------------------------------------------------
    async def _streams(self, payloads: dict[str, Any]) -> dict[Modality, tuple[np.ndarray, np.ndarray]]:
        unknown = [m for m in payloads if m not in self.modalities]
        if unknown:
            raise RequestError(400, f"this model has no {unknown[0]} encoder; send one of {self.modalities}")
        names = list(payloads)
        results = await asyncio.gather(*(self.encoders[m].encode.remote(payloads[m]) for m in names))
        for result in results:
            raise_if_error(result)
        return {Modality(m): (r["tokens"], r["mask"]) for m, r in zip(names, results, strict=True)}

    @torch.no_grad()
    def _fuse(self, streams: dict[Modality, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        tensors = {
            m: (
                torch.from_numpy(tokens)[None].to(self.device),  # (1, seq, width)
                torch.from_numpy(mask)[None].to(self.device),  # (1, seq)
            )
            for m, (tokens, mask) in streams.items()
        }
        with autocast(self.device, self.dtype):
            return self.fusion(tensors)[0].float().cpu().numpy()  # (embedding_dim,)

    @client_errors
    async def embed(self, payloads: dict[str, Any]) -> dict[str, Any]:
        if not payloads:
            raise RequestError(400, "empty query: send at least one of text, audio (file), image (file)")
        embedding = self._fuse(await self._streams(payloads))
        return {"modalities": list(payloads), "embedding": embedding.tolist()}

    # ---- search ----------------------------------------------------------------------------------------------------
    @client_errors
    async def search(self, payloads: dict[str, Any], target: str, k: int) -> dict[str, Any]:
        if target not in self.indexes:
            raise RequestError(400, f"unknown target {target!r}: use one of {sorted(self.indexes)}")
        if not payloads:
            raise RequestError(400, "empty query: send at least one of text, audio (file), image (file)")
        embedding = self._fuse(await self._streams(payloads))
        hits = self.indexes[target].search(embedding[None], k)[0]
        return {
            "query_modalities": list(payloads),
            "target": target,
            "results": [self._result(item, score) for item, score in hits],
        }

    @staticmethod
    def _result(item: dict[str, Any], score: float) -> dict[str, Any]:
        return {"id": item["id"], "score": round(float(score), 6), **links(item)}

    # ---- the /v1 forms: batches, vectors, stored items -------------------------------------------------------------
    @client_errors
    async def search_batch(self, queries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answers in order for queries prepared by the ingress (`serve_app.v1.prepare`): each one of {"payloads"},
        {"vector"}, {"item_id", "item_modality"}, with "target", "k" and "where" (its place, for error messages)."""
        for q in queries:
            if q["target"] not in self.indexes:
                raise RequestError(
                    400, f"{field(q, 'target')}: unknown target {q['target']!r}; use {sorted(self.indexes)}"
                )
        vectors, used = await self._query_vectors(queries)
        answers: list[dict[str, Any]] = [{} for _ in queries]
        groups: dict[tuple[str, int], list[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault((q["target"], int(q["k"])), []).append(i)
        for (target, k), rows in groups.items():  # one FAISS call per target and k
            for i, hits in zip(rows, self.indexes[target].search(vectors[rows], k), strict=True):
                results = [self._result(item, score) for item, score in hits]
                answers[i] = {"query_modalities": used[i], "target": target, "results": results}
        return answers

    @client_errors
    async def embed_batch(self, queries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Embeddings in order for queries prepared by the ingress (see `search_batch`)."""
        vectors, used = await self._query_vectors(queries)
        return [{"modalities": used[i], "embedding": vectors[i].tolist()} for i in range(len(queries))]

    async def _query_vectors(self, queries: list[dict[str, Any]]) -> tuple[np.ndarray, list[list[str]]]:
        """The queries' embeddings # (n, dim), and the modalities each one was made of."""
        vectors = np.zeros((len(queries), self.dim), np.float32)  # (n, dim)
        used: list[list[str]] = [[] for _ in queries]
        encoded = [i for i, q in enumerate(queries) if "payloads" in q]
        if encoded:
            vectors[encoded] = self._fuse_many(await self._streams_many([queries[i] for i in encoded]))
            for i in encoded:
                used[i] = list(queries[i]["payloads"])
        for i, q in enumerate(queries):
            if "vector" in q:
                vectors[i] = query_vector(q, self.dim)
        by_item = [i for i, q in enumerate(queries) if "item_id" in q]
        if by_item:
            stored = await asyncio.to_thread(self.store.vectors, sorted({queries[i]["item_id"] for i in by_item}))
            for i in by_item:
                vectors[i], used[i] = item_vector(queries[i], stored)
        return vectors, used

    async def _streams_many(self, queries: list[dict[str, Any]]) -> list[dict[Modality, tuple[np.ndarray, np.ndarray]]]:
        """Every query's token streams: one call per encoder with all of its payloads."""
        calls: dict[str, list[int]] = {}
        for i, q in enumerate(queries):
            for m in q["payloads"]:
                if m not in self.modalities:
                    raise RequestError(
                        400, f"{field(q, m)}: this model has no {m} encoder; send one of {self.modalities}"
                    )
                calls.setdefault(m, []).append(i)
        names = list(calls)
        answers = await asyncio.gather(
            *(self._encode_all(m, [queries[i]["payloads"][m] for i in calls[m]]) for m in names)
        )
        streams: list[dict[Modality, tuple[np.ndarray, np.ndarray]]] = [{} for _ in queries]
        for m, results in zip(names, answers, strict=True):
            for i, result in zip(calls[m], results, strict=True):
                if "error" in result:
                    raise RequestError(int(result.get("status", 400)), f"{field(queries[i], m)}: {result['error']}")
                streams[i][Modality(m)] = (result["tokens"], result["mask"])
        for stream, q in zip(streams, queries, strict=True):  # the modalities in the order the query gave them
            ordered = {Modality(m): stream[Modality(m)] for m in q["payloads"]}
            stream.clear()
            stream.update(ordered)
        return streams

    async def _encode_all(self, modality: str, payloads: list[Any]) -> list[dict[str, Any]]:
        """One payload: `encode` (batched with other requests by @serve.batch); several: `encode_many`, one call."""
        if len(payloads) == 1:
            return [await self.encoders[modality].encode.remote(payloads[0])]
        return await self.encoders[modality].encode_many.remote(payloads)

    @torch.no_grad()
    def _fuse_many(self, streams: list[dict[Modality, tuple[np.ndarray, np.ndarray]]]) -> np.ndarray:
        """Embeddings of many queries # (n, dim): those of one modality combination fused together, padded."""
        out = np.zeros((len(streams), self.dim), np.float32)
        groups: dict[tuple[Modality, ...], list[int]] = {}
        for i, stream in enumerate(streams):
            groups.setdefault(tuple(stream), []).append(i)
        for key, rows in groups.items():
            for start in range(0, len(rows), FUSE_BATCH):
                chunk = rows[start : start + FUSE_BATCH]
                tensors = {m: padded([streams[i][m] for i in chunk], self.device) for m in key}
                with autocast(self.device, self.dtype):
                    out[chunk] = self.fusion(tensors).float().cpu().numpy()  # (chunk, embedding_dim)
        return out

    @client_errors
    async def item_info(self, item_id: str) -> dict[str, Any]:
        """An item's metadata: the galleries it is in, its caption and group, the URLs of its media."""
        check_id(item_id)
        stored = await asyncio.to_thread(self.store.existing, item_id)
        if stored is None:
            raise RequestError(404, f"no item with id {item_id!r} in the gallery")
        return info(stored)

    @client_errors
    async def list_items(self, offset: int, limit: int) -> dict[str, Any]:
        """`limit` items' metadata from `offset`, in the order they were added, and the gallery's item count."""
        total, items = await asyncio.to_thread(self.store.page, offset, limit)
        return {"items": [info(stored) for stored in items], "offset": offset, "limit": limit, "total": total}

    # ---- items -----------------------------------------------------------------------------------------------------
    @client_errors
    async def media(self, item_id: str, kind: str) -> tuple[bytes, str]:
        """The raw bytes and media type of an item's image or audio (stored blobs, or dataset files under the
        gallery's roots)."""
        stored = await asyncio.to_thread(self.store.existing, item_id)
        if stored is None:
            raise RequestError(404, f"no item with id {item_id!r} in the gallery")
        path = stored.record.get(f"{kind}_path")
        if path and not Path(path).is_absolute():  # an added item's media: a blob in the store
            blob = await asyncio.to_thread(self.store.media, item_id, kind)
            if blob is None:
                raise RequestError(404, f"the {kind} of item {item_id!r} is missing from the gallery store")
            return blob[1], media_type(blob[0])
        return read_media(self.index_dir, self.media_roots, item_id, kind, path)

    @client_errors
    async def add_item(self, item_id: str, payloads: dict[str, Any]) -> dict[str, Any]:
        """Add an item; the same item again answers the stored one (200), another item under its id 409."""
        check_id(item_id)
        if not payloads:
            raise RequestError(400, "an item needs at least one of text, audio (file), image (file)")
        digest = request_digest(payloads)
        stored = await asyncio.to_thread(self.store.existing, item_id)
        if stored is None:
            streams = await self._streams(payloads)
            vectors = {m.value: self._fuse({m: s}) for m, s in streams.items() if m.value in self.indexes}
            record, media = await self._record(item_id, payloads)
            stored, created = await asyncio.to_thread(self.store.add, item_id, record, vectors, media, digest)
            if created:
                logger.info("added item %s to %s", item_id, stored.modalities)
        if stored.digest != digest:
            raise RequestError(409, f"id {item_id!r} already holds a different item; delete it first or use another id")
        return self._item_answer(stored)

    async def _record(self, item_id: str, payloads: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple]]:
        if "image" in payloads:  # EXIF (GPS, camera serials), XMP and comments are not kept in the gallery
            payloads = {**payloads, "image": await asyncio.to_thread(strip_image_metadata, payloads["image"])}
        record: dict[str, Any] = {"id": item_id}
        if "text" in payloads:
            record["caption"] = payloads["text"]
        media = {k: (media_name(item_id, k, payloads[k]), payloads[k]) for k in ("image", "audio") if k in payloads}
        record.update({f"{kind}_path": name for kind, (name, _) in media.items()})
        return record, media

    def _item_answer(self, stored: StoredItem) -> dict[str, Any]:
        return {"id": stored.id, "added_to": stored.modalities, "counts": self.counts()}

    @client_errors
    async def delete_item(self, item_id: str) -> dict[str, Any]:
        """Remove an item from the gallery (durable once answered); 404 if there is none with this id."""
        check_id(item_id)
        if not await asyncio.to_thread(self.store.delete, item_id):
            raise RequestError(404, f"no item with id {item_id!r} in the gallery")
        logger.info("deleted item %s", item_id)
        return {"id": item_id, "deleted": True, "counts": self.counts()}

    def counts(self) -> dict[str, int]:
        return {m: len(ix) for m, ix in self.indexes.items()}

    async def replica_search(self, payloads: dict[str, Any], target: str, k: int) -> dict[str, Any]:
        """`search` plus which replica (Serve replica id, process id) answered: for operators and replica tests."""
        context = serve.get_replica_context()
        result = await self.search(payloads, target, k)
        return {"replica": context.replica_id.unique_id, "pid": os.getpid(), **result}

    def __del__(self) -> None:
        store = getattr(self, "store", None)
        if store is not None:
            store.stop()


def check_id(item_id: str) -> None:
    if not ITEM_ID.fullmatch(item_id):
        raise RequestError(
            400, f"bad id {item_id!r}: use 1-128 letters, digits, '_', '-' or '.', starting with a letter/digit"
        )


RetrieverDeployment = serve.deployment(RetrieverServer, name="Retriever")
