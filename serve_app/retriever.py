"""Retriever deployment: fusion transformer + one GalleryIndex per target modality under INDEX_DIR/<modality>/.

It sends each query modality to its encoder deployment (concurrently), fuses the returned token streams into one
embedding, and searches the target index. `add_item` embeds new media the same way, adds the item to each index it
can join, copies the media under INDEX_DIR/media/ and saves the touched indexes atomically.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from cman.index import GalleryIndex
from cman.modality import Modality
from serve_app.encoders import inference_device, limit_threads
from serve_app.errors import RequestError, raise_if_error

logger = logging.getLogger(__name__)

ITEM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
MEDIA_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".mp3": "audio/mpeg",
}
_MAGIC = (
    (b"\x89PNG", ".png"),
    (b"\xff\xd8", ".jpg"),
    (b"GIF8", ".gif"),
    (b"BM", ".bmp"),
    (b"RIFF", None),  # WAV or WEBP: see _extension
    (b"fLaC", ".flac"),
    (b"OggS", ".ogg"),
    (b"ID3", ".mp3"),
)


def _extension(data: bytes, modality: Modality) -> str:
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            if ext is None:
                return ".webp" if data[8:12] == b"WEBP" else ".wav"
            return ext
    return ".bin"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


class RetrieverServer:
    """Fuses encoder streams into embeddings and answers searches over the gallery indexes."""

    def __init__(
        self,
        encoders: dict[str, DeploymentHandle],
        checkpoint: str,
        index_dir: str,
        index_kind: str = "flat",
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
    ) -> None:
        from cman.models.cman import CMAN

        limit_threads(num_cpus)
        model = CMAN.from_pretrained(checkpoint)
        self.device = inference_device(num_gpus)
        self.fusion = model.fusion.to(self.device).eval()
        self.modalities = [m.value for m in model.modalities]
        self.dim = model.config.model.embedding_dim
        del model
        self.encoders = encoders
        self.index_dir = Path(index_dir)
        self.indexes: dict[str, GalleryIndex] = {}
        for modality in self.modalities:
            path = self.index_dir / modality
            if (path / "index.json").is_file():
                self.indexes[modality] = GalleryIndex.load(path)
            else:
                self.indexes[modality] = GalleryIndex(self.dim, kind=index_kind)
        self._add_lock = asyncio.Lock()
        logger.info("retriever ready: %s", {m: len(ix) for m, ix in self.indexes.items()})

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
    def _record(self, item_id: str) -> dict[str, Any] | None:
        for modality in ("image", "audio", "text"):
            index = self.indexes.get(modality)
            if index is not None and item_id in index:
                return index.get(item_id)
        return None

    @client_errors
    def media(self, item_id: str, kind: str) -> tuple[bytes, str]:
        """The raw bytes and media type of an item's image or audio."""
        record = self._record(item_id)
        if record is None:
            raise RequestError(404, f"no item with id {item_id!r} in the gallery")
        stored = record.get(f"{kind}_path")
        if not stored:
            raise RequestError(404, f"item {item_id!r} has no {kind}")
        path = Path(stored) if Path(stored).is_absolute() else self.index_dir / stored
        if not path.is_file():
            raise RequestError(404, f"the {kind} file of item {item_id!r} is missing on the server")
        return path.read_bytes(), MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")

    @client_errors
    async def add_item(self, item_id: str, payloads: dict[str, Any]) -> dict[str, Any]:
        if not ITEM_ID.match(item_id):
            raise RequestError(
                400, f"bad id {item_id!r}: use 1-128 letters, digits, '_', '-' or '.', starting with a letter/digit"
            )
        if not payloads:
            raise RequestError(400, "an item needs at least one of text, audio (file), image (file)")
        async with self._add_lock:
            targets = [m for m in payloads if m in self.indexes]
            if any(item_id in self.indexes[m] for m in self.indexes):
                raise RequestError(400, f"duplicate id {item_id!r}: an item with this id is already in the gallery")
            streams = await self._streams(payloads)
            embeddings = {m.value: self._fuse({m: s}) for m, s in streams.items()}  # each modality alone
            record: dict[str, Any] = {"id": item_id}
            if "text" in payloads:
                record["caption"] = payloads["text"]
            for kind in ("image", "audio"):
                if kind in payloads:
                    name = f"media/{item_id}{_extension(payloads[kind], Modality(kind))}"
                    _write_atomic(self.index_dir / name, payloads[kind])
                    record[f"{kind}_path"] = name
            for modality in targets:
                self.indexes[modality].add(embeddings[modality][None], [record])
                self.indexes[modality].save(self.index_dir / modality)
        logger.info("added item %s to %s", item_id, targets)
        return {"id": item_id, "added_to": targets, "counts": self.counts()}

    def counts(self) -> dict[str, int]:
        return {m: len(ix) for m, ix in self.indexes.items()}


RetrieverDeployment = serve.deployment(RetrieverServer, name="Retriever")
