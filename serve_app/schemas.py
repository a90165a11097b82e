"""The typed HTTP contract: response models, the one error model, and which statuses each route documents."""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel

ITEM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
ITEM_ID_RULE = "1-128 letters, digits, '_', '-' or '.', starting with a letter or digit"
MAX_K = 100


class Target(str, Enum):
    """The gallery a search ranks."""

    text = "text"
    audio = "audio"
    image = "image"


class ErrorResponse(BaseModel):
    """Every error: what went wrong and what to send instead."""

    error: str = Field(description="what went wrong and what to send instead")


class Hit(BaseModel):
    id: str
    score: float = Field(description="cosine similarity of the query and the item")
    caption: str | None = None
    image_url: str | None = Field(default=None, description="GET it for the item's image")
    audio_url: str | None = Field(default=None, description="GET it for the item's audio")


class SearchResponse(BaseModel):
    query_modalities: list[Target]
    target: Target
    results: list[Hit]


class EmbedResponse(BaseModel):
    modalities: list[Target]
    embedding: list[float] = Field(description="the L2-normalised embedding")


class ItemResponse(BaseModel):
    id: str
    added_to: list[Target] = Field(description="the galleries the item joined")
    counts: dict[str, int] = Field(description="gallery sizes after the addition")


class DeleteResponse(BaseModel):
    id: str
    deleted: bool = Field(description="true: the item is removed from every gallery")
    counts: dict[str, int] = Field(description="gallery sizes after the removal")


class EncoderStats(BaseModel):
    batches: int
    requests: int
    max_batch_size_seen: int
    batch_sizes: dict[str, int]


class StatsResponse(BaseModel):
    encoders: dict[str, EncoderStats]
    index: dict[str, int] = Field(description="gallery sizes")


class StatusResponse(BaseModel):
    status: str = Field(description='"ok"')


_WHY = {
    400: "a bad field (empty or control-only text, bad base64, a model without that encoder, invalid JSON)",
    401: "an API key is configured and the request has no valid `Authorization: Bearer <key>`",
    403: "a state-changing route refused: no API key configured on a non-loopback bind, or a cross-origin request",
    404: "no such item, or the item has no such medium or vector",
    409: "another item already has this id (the same item again answers 200); delete it first or use another id",
    413: "over a limit: body, upload, text characters, audio seconds, image pixels, form fields or batch queries",
    415: "undecodable media, or a content type other than multipart/form-data (application/json on /v1)",
    422: "validation: a field of the wrong type or out of range (`k` 1-100, `target`, `id`)",
    503: "a replica is restarting, the queue is full or the gallery store failed; retry (adds are idempotent)",
    504: "the request took longer than serve.request_timeout_s (an add may still complete: retrying it is safe)",
    507: "the gallery store is out of space; nothing was stored",
}
BINARY = {"schema": {"type": "string", "format": "binary"}}
MEDIA_CONTENT = {
    kind: {t: BINARY for t in types}
    for kind, types in {
        "image": ("image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "application/octet-stream"),
        "audio": ("audio/wav", "audio/flac", "audio/ogg", "audio/mpeg", "application/octet-stream"),
    }.items()
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these error statuses (401, 503 and 504 are added: any route may answer them)."""
    return {s: {"model": ErrorResponse, "description": _WHY[s]} for s in sorted({*statuses, 401, 503, 504})}


# ---- the JSON /v1 API ------------------------------------------------------------------------------------------------
MAX_VECTOR_DIM = 4096  # the longest `vector` a query may send (the model's embedding_dim decides what is accepted)
DEFAULT_MAX_BATCH_QUERIES = 64  # serve.max_batch_queries
MEDIA_DOC = "{kind} bytes, base64-encoded (standard or URL-safe alphabet), or a data URI `data:{mime};base64,...`"


class QueryIn(BaseModel):
    """One query: any combination of `text`, `image`, `audio` (a composed query), or a `vector`, or an `item_id`."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(default=None, description="query text (Unicode-normalised; control characters removed)")
    image: str | None = Field(default=None, description=MEDIA_DOC.format(kind="image", mime="image/png"))
    audio: str | None = Field(default=None, description=MEDIA_DOC.format(kind="audio", mime="audio/wav"))
    vector: list[float] | None = Field(
        default=None,
        max_length=MAX_VECTOR_DIM,
        description="a query embedding (the model's size, 512 by default); L2-normalised before the search",
    )
    item_id: str | None = Field(
        default=None,
        pattern=ITEM_ID_PATTERN,
        max_length=128,
        description=f"a stored item whose vector is the query ({ITEM_ID_RULE})",
    )
    item_modality: Target | None = Field(
        default=None,
        description="with item_id: which of the item's vectors to use (default: the target's if the item has one, "
        "else its first of text, audio, image)",
    )


class SearchQueryIn(QueryIn):
    target: Target | None = Field(default=None, description="the gallery to search (default: the request's)")
    k: int | None = Field(default=None, ge=1, le=MAX_K, description=f"number of results, 1-{MAX_K} (default 10)")


class SearchRequest(SearchQueryIn):
    """One query at the top level, or `queries` (a batch, answered in order; top-level `target` and `k` are the
    defaults of its queries)."""

    queries: list[SearchQueryIn] | None = Field(
        default=None, min_length=1, description="a batch of queries (at most serve.max_batch_queries)"
    )


class EmbedRequest(QueryIn):
    """One query at the top level, or `queries` (a batch, answered in order)."""

    queries: list[QueryIn] | None = Field(
        default=None, min_length=1, description="a batch of queries (at most serve.max_batch_queries)"
    )


class SearchBatchResponse(BaseModel):
    answers: list[SearchResponse] = Field(description="one answer per query, in the order of `queries`")


class EmbedBatchResponse(BaseModel):
    answers: list[EmbedResponse] = Field(description="one answer per query, in the order of `queries`")


class SearchV1Response(RootModel[SearchResponse | SearchBatchResponse]):
    """A single query's answer, or `{"answers": [...]}` for `queries`."""


class EmbedV1Response(RootModel[EmbedResponse | EmbedBatchResponse]):
    """A single query's answer, or `{"answers": [...]}` for `queries`."""


class ItemInfo(BaseModel):
    id: str
    modalities: list[Target] = Field(description="the galleries the item is in")
    caption: str | None = None
    group: str | None = Field(default=None, description="items of one group are relevant to each other")
    image_url: str | None = Field(default=None, description="GET it for the item's image")
    audio_url: str | None = Field(default=None, description="GET it for the item's audio")


class ItemPage(BaseModel):
    items: list[ItemInfo] = Field(description="in the order the items were added (stable across pages)")
    offset: int
    limit: int
    total: int = Field(description="items in the gallery")
