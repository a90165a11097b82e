"""Retriever deployment: fusion transformer + the gallery of INDEX_DIR (one GalleryIndex per target modality).

It sends each query modality to its encoder deployment (concurrently), fuses the returned token streams into one
embedding, and searches the target index. Durable adds, the write-ahead log and replica sync live in
`serve_app.gallery_store`; media names and confined media reads in `serve_app.media`. Only the fusion transformer
and the projections are loaded (`CMAN.from_pretrained(dir, modalities=[])`); the encoders are other deployments.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from cman.config import ServeConfig
from cman.index import auto_params
from cman.modality import Modality
from serve_app.encoders import inference_device, limit_threads
from serve_app.errors import RequestError, raise_if_error
from serve_app.gallery_store import DuplicateItemError, GalleryStore
from serve_app.media import allowed_roots, media_name, read_media, strip_image_metadata, write_media

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


def index_params(index_kind: str, size: int, cfg: ServeConfig) -> dict[str, Any]:
    """GalleryIndex parameters for empty indexes; `auto` resolves by the gallery's current size."""
    if index_kind == "auto":
        return auto_params(size, cfg.index_auto_exact_max, cfg.index_auto_ann)
    return {"kind": index_kind}


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
        self.width = model.config.model.fusion.width
        self.modalities = list(json.loads((Path(checkpoint) / "metadata.json").read_text())["base_models"])
        self.dim = model.config.model.embedding_dim
        del model
        self.encoders = encoders
        self.index_dir = Path(index_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self.media_roots = allowed_roots(self.index_dir)
        params = index_params(index_kind, 0, cfg)
        self.store = GalleryStore.open(
            self.index_dir, self.modalities, self.dim, params=params, compact_every=cfg.gallery_compact_every
        )
        self.indexes = {m.value: ix for m, ix in self.store.indexes.items() if m.value in self.modalities}
        self._stop = threading.Event()
        self._sync_s = cfg.gallery_sync_s
        threading.Thread(target=self._sync_loop, name="gallery-sync", daemon=True).start()
        logger.info("retriever ready: %s", self.counts())

    def _sync_loop(self) -> None:
        """Pick up items other replicas added (bounded visibility delay: one period + the read)."""
        while not self._stop.wait(self._sync_s):
            try:
                if self.store.sync():
                    self.indexes.update({m.value: ix for m, ix in self.store.indexes.items()})
            except Exception:  # keep serving; the next period retries
                logger.exception("gallery sync from %s failed", self.index_dir)

    def check_health(self) -> None:
        """Serve's periodic health check: a tiny fusion forward and a writable gallery log."""
        self._fuse({Modality.TEXT: (np.zeros((1, self.width), np.float32), np.ones(1, bool))})
        if not os.access(self.store.log_dir, os.W_OK):
            raise RuntimeError(f"gallery log {self.store.log_dir} is not writable")

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
        out: dict[str, Any] = {"id": item["id"], "score": round(float(score), 6)}
        if item.get("caption"):
            out["caption"] = item["caption"]
        if item.get("image_path"):
            out["image_url"] = f"/items/{item['id']}/image"
        if item.get("audio_path"):
            out["audio_url"] = f"/items/{item['id']}/audio"
        return out

    # ---- items -----------------------------------------------------------------------------------------------------
    @client_errors
    def media(self, item_id: str, kind: str) -> tuple[bytes, str]:
        """The raw bytes and media type of an item's image or audio (only files under the gallery's roots)."""
        record = self.store.record(item_id)
        if record is None:
            raise RequestError(404, f"no item with id {item_id!r} in the gallery")
        return read_media(self.index_dir, self.media_roots, item_id, kind, record.get(f"{kind}_path"))

    @client_errors
    async def add_item(self, item_id: str, payloads: dict[str, Any]) -> dict[str, Any]:
        if not ITEM_ID.fullmatch(item_id):
            raise RequestError(
                400, f"bad id {item_id!r}: use 1-128 letters, digits, '_', '-' or '.', starting with a letter/digit"
            )
        if not payloads:
            raise RequestError(400, "an item needs at least one of text, audio (file), image (file)")
        if item_id in self.store:
            raise RequestError(400, f"duplicate id {item_id!r}: an item with this id is already in the gallery")
        streams = await self._streams(payloads)
        vectors = {m.value: self._fuse({m: s}) for m, s in streams.items() if m.value in self.indexes}
        if "image" in payloads:  # EXIF (GPS, camera serials), XMP and comments are not kept in the gallery
            payloads = {**payloads, "image": await asyncio.to_thread(strip_image_metadata, payloads["image"])}
        record: dict[str, Any] = {"id": item_id}
        if "text" in payloads:
            record["caption"] = payloads["text"]
        media = {kind: media_name(item_id, kind, payloads[kind]) for kind in ("image", "audio") if kind in payloads}
        record.update({f"{kind}_path": name for kind, name in media.items()})

        def write_files() -> None:  # under the store's lock, after the duplicate check, before the log line
            for kind, name in media.items():
                write_media(self.index_dir, name, payloads[kind])

        try:
            targets = await asyncio.to_thread(self.store.add, vectors, record, write_files)
        except DuplicateItemError as err:
            raise RequestError(400, str(err)) from None
        logger.info("added item %s to %s", item_id, targets)
        return {"id": item_id, "added_to": targets, "counts": self.counts()}

    def counts(self) -> dict[str, int]:
        return {m: len(ix) for m, ix in self.indexes.items()}

    async def replica_search(self, payloads: dict[str, Any], target: str, k: int) -> dict[str, Any]:
        """`search` plus which replica (Serve replica id, process id) answered: for operators and replica tests."""
        context = serve.get_replica_context()
        result = await self.search(payloads, target, k)
        return {"replica": context.replica_id.unique_id, "pid": os.getpid(), **result}

    def __del__(self) -> None:
        self._stop.set()


RetrieverDeployment = serve.deployment(RetrieverServer, name="Retriever")
