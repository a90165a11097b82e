"""Helpers of the Retriever's /v1 forms: where a field of a batch was sent, item metadata, `vector` and `item_id`
queries, and padding token streams of different lengths into one fusion batch."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cman.gallery_db import StoredItem
from cman.modality import ALL_MODALITIES
from serve_app.errors import RequestError

ORDER = [m.value for m in ALL_MODALITIES]  # text, audio, image
FUSE_BATCH = 64  # queries per fusion forward in a /v1 batch


def field(query: dict[str, Any], name: str) -> str:
    """Where a field of a prepared query was sent: `queries[3].image` in a batch, `image` alone."""
    return f"{query['where']}.{name}" if query.get("where") else name


def links(item: dict[str, Any]) -> dict[str, Any]:
    """The caption and media URLs of an item record (what search results and item metadata show)."""
    out: dict[str, Any] = {}
    if item.get("caption"):
        out["caption"] = item["caption"]
    if item.get("image_path"):
        out["image_url"] = f"/items/{item['id']}/image"
    if item.get("audio_path"):
        out["audio_url"] = f"/items/{item['id']}/audio"
    return out


def info(stored: StoredItem) -> dict[str, Any]:
    """The /v1 metadata of a stored item."""
    out: dict[str, Any] = {"id": stored.id, "modalities": [m for m in ORDER if m in stored.modalities]}
    if stored.record.get("group") is not None:
        out["group"] = str(stored.record["group"])
    return {**out, **links({**stored.record, "id": stored.id})}


def query_vector(query: dict[str, Any], dim: int) -> np.ndarray:
    """A `vector` query, L2-normalised; 422 unless `dim` finite numbers, not all zero."""
    with np.errstate(over="ignore"):
        v = np.asarray(query["vector"], dtype=np.float32)  # (dim,)
    if v.shape != (dim,):
        raise RequestError(422, f"{field(query, 'vector')} has {v.size} numbers; this model's embeddings have {dim}")
    norm = float(np.linalg.norm(v)) if np.isfinite(v).all() else float("nan")
    if not (np.isfinite(norm) and norm > 0):
        raise RequestError(422, f"{field(query, 'vector')} must be finite float32 numbers, not all zero")
    return v / norm


def item_vector(query: dict[str, Any], stored: dict[str, dict[str, np.ndarray]]) -> tuple[np.ndarray, list[str]]:
    """The stored vector an `item_id` query stands for: `item_modality`'s, else the target's if the item has one,
    else its first of text, audio, image; and that modality."""
    item_id, vectors = query["item_id"], stored.get(query["item_id"])
    if not vectors:
        raise RequestError(404, f"{field(query, 'item_id')}: no item with id {item_id!r} in the gallery")
    wanted = query.get("item_modality") or (
        query["target"] if query.get("target") in vectors else next(m for m in ORDER if m in vectors)
    )
    if wanted not in vectors:
        have = [m for m in ORDER if m in vectors]
        raise RequestError(
            404, f"{field(query, 'item_modality')}: item {item_id!r} has no {wanted} vector, only {have}"
        )
    return vectors[wanted], [wanted]


def padded(streams: list[tuple[np.ndarray, np.ndarray]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token streams of different lengths as one padded batch: tokens # (batch, seq, width), mask # (batch, seq)."""
    longest = max(tokens.shape[0] for tokens, _ in streams)
    tokens = np.zeros((len(streams), longest, streams[0][0].shape[1]), np.float32)  # (batch, seq, width)
    mask = np.zeros((len(streams), longest), bool)  # (batch, seq)
    for row, (t, m) in enumerate(streams):
        tokens[row, : len(t)], mask[row, : len(m)] = t, m
    return torch.from_numpy(tokens).to(device), torch.from_numpy(mask).to(device)
