"""The JSON `/v1` API beside the multipart routes: search and embed with JSON bodies (text, base64 media or data URIs,
a `vector`, a stored `item_id`; one query or a batch of `queries`, answered in order), item metadata, a paged item
list and deletes.

Every limit of the multipart routes applies to each query of a batch (text characters, decoded media bytes, formats
told by content, `k`), and errors name the field and its place (`queries[3].image`). A batch holds at most
`serve.max_batch_queries` queries (413), and a JSON body is counted before it is parsed (`BoundedJSONRoute`): a body
within the byte limit that would parse into millions of values is refused first. The routes find the Ingress
replica (its deployment handles, limits and timeout) in `request.app.state.ingress`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Security
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer

from serve_app import schemas as s
from serve_app.errors import RequestError
from serve_app.uploads import ACCEPTED_TYPES, ANY_BINARY, Limits, check_media, check_text

bearer = HTTPBearer(
    auto_error=False,  # the Guard middleware checks the key; this declares the scheme (Swagger's Authorize button)
    description="the API key (CMAN_API_KEY or serve.api_key), when the service has one: `Authorization: Bearer <key>`",
)
MAX_PAGE = 1000
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
DATA_URI = re.compile(r"data:([\w.+-]+/[\w.+-]+)?((?:;[\w.+-]+=[\w.+-]*)*)(;base64)?,", re.IGNORECASE)
WHITESPACE = re.compile(r"\s+")
URL_SAFE = str.maketrans("-_", "+/")


@dataclass(frozen=True)
class V1Settings:
    limits: Limits
    max_batch_queries: int = s.DEFAULT_MAX_BATCH_QUERIES

    @property
    def max_json_values(self) -> int:
        """The most values (numbers, strings, objects, lists) a JSON body may hold: a full batch of vectors."""
        return self.max_batch_queries * (s.MAX_VECTOR_DIM + 32) + 64


def json_values_over(body: bytes, budget: int) -> bool:
    """Whether the JSON `body` holds more than `budget` values, counted without parsing it (commas and opening
    brackets outside strings); a cheap upper bound first, the string-aware count only when that is over."""
    if body.count(b",") + body.count(b"[") + body.count(b"{") <= budget:
        return False
    skeleton = JSON_STRING.sub(b"", body)
    return skeleton.count(b",") + skeleton.count(b"[") + skeleton.count(b"{") > budget


class BoundedJSONRoute(APIRoute):
    """A route whose JSON body is counted before FastAPI parses it: parsing a 30 MB body of tiny values would hold
    hundreds of MB (and seconds of CPU) in the ingress."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bounded(request: Request) -> Response:
            if request.method == "POST":
                settings: V1Settings = request.app.state.v1
                if json_values_over(await request.body(), settings.max_json_values):
                    raise RequestError(
                        413,
                        f"the JSON body holds more than {settings.max_json_values:,} values (a full batch of "
                        f"{settings.max_batch_queries} vectors, serve.max_batch_queries); send fewer queries",
                    )
            return await handler(request)

        return bounded


router = APIRouter(prefix="/v1", route_class=BoundedJSONRoute, dependencies=[Security(bearer)])


# ---- preparing queries ---------------------------------------------------------------------------------------------
def _named(label: str, check: Callable[[], Any]) -> Any:
    """Run a check of `uploads`, its error message prefixed with where the field was sent."""
    try:
        return check()
    except RequestError as err:
        raise RequestError(err.status, f"{label}: {err.message}") from None


def decode_media(name: str, value: str, label: str, limits: Limits) -> bytes:
    """Base64 (standard or URL-safe, whitespace ignored) or a base64 data URI → bytes, within the upload limit and
    of an allowed format (told by content)."""
    head = DATA_URI.match(value[:512])
    example = "data:image/png;base64,..." if name == "image" else "data:audio/wav;base64,..."
    if head:
        mime = (head.group(1) or "").lower()
        if not head.group(3):
            raise RequestError(400, f"{label} is a data URI without ;base64: send {example}")
        if mime and mime not in ANY_BINARY and not mime.startswith(ACCEPTED_TYPES[name]):
            raise RequestError(415, f"{label} is a data URI of type {mime!r}; send {name}/* ({example})")
        value = value[head.end() :]
    elif value[:5].lower() == "data:":
        raise RequestError(400, f"{label} is not a well-formed data URI: send {example}")
    compact = WHITESPACE.sub("", value).translate(URL_SAFE)
    compact += "=" * (-len(compact) % 4 if len(compact) % 4 != 1 else 0)
    size = len(compact) // 4 * 3 - (2 if compact.endswith("==") else 1 if compact.endswith("=") else 0)
    limit = limits.max_upload_bytes
    if size > limit:
        raise RequestError(413, f"{label} is {size:,} bytes decoded, over the {limit:,}-byte limit (max_upload_mb)")
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as err:
        raise RequestError(
            400, f"{label} is not valid base64 ({err}); send the file's bytes base64-encoded, or a data URI {example}"
        ) from None
    if not data:
        raise RequestError(400, f"{label} is empty; send the file's bytes base64-encoded")
    _named(label, lambda: check_media(name, data, limits))
    return data


def prepare(query: s.QueryIn, where: str, limits: Limits) -> dict[str, Any]:
    """One JSON query checked and decoded for the Retriever: {"payloads"} | {"vector"} | {"item_id", ...}, with
    "where" (its place in the request, for error messages)."""
    place = where or "the query"
    label = (lambda name: f"{where}.{name}") if where else (lambda name: name)
    has_media = bool(query.text and query.text.strip()) or query.image is not None or query.audio is not None
    given = (("media", has_media), ("vector", query.vector is not None), ("item_id", query.item_id is not None))
    forms = [name for name, present in given if present]
    if not forms:
        raise RequestError(400, f"{place} is empty: send text, image or audio (base64), a vector or an item_id")
    if len(forms) > 1:
        raise RequestError(
            400, f"{place} mixes {' and '.join(forms)}: send one of media (text/image/audio), a vector, an item_id"
        )
    if query.item_modality is not None and query.item_id is None:
        raise RequestError(400, f"{label('item_modality')} goes with item_id; send both or neither")
    if query.vector is not None:
        return {"where": where, "vector": query.vector}
    if query.item_id is not None:
        modality = query.item_modality.value if query.item_modality is not None else None
        return {"where": where, "item_id": query.item_id, "item_modality": modality}
    payloads: dict[str, Any] = {}
    text = _named(label("text"), lambda: check_text(query.text, limits))
    if text is not None:
        payloads["text"] = text
    for name in ("audio", "image"):  # the multipart routes' order: the same fused embedding
        value = getattr(query, name)
        if value is not None:
            payloads[name] = decode_media(name, value, label(name), limits)
    return {"where": where, "payloads": payloads}


def batch_of(body: s.QueryIn, queries: list | None, settings: V1Settings) -> list[tuple[Any, str]]:
    """The request's queries with their places: `queries[i]` of a batch, or the top-level query ("")."""
    if queries is None:
        return [(body, "")]
    fields = ("text", "image", "audio", "vector", "item_id", "item_modality")
    given = [name for name in fields if getattr(body, name) is not None]
    if given:
        raise RequestError(400, f"{', '.join(given)} given beside queries: send one query at the top level or a batch")
    if len(queries) > settings.max_batch_queries:
        raise RequestError(
            413, f"{len(queries)} queries, over the limit of {settings.max_batch_queries} (serve.max_batch_queries)"
        )
    return [(q, f"queries[{i}]") for i, q in enumerate(queries)]


# ---- routes --------------------------------------------------------------------------------------------------------
V1_QUERY_ERRORS = s.errors(400, 404, 413, 415, 422)
ItemId = Annotated[str, Path(pattern=s.ITEM_ID_PATTERN, max_length=128, description=s.ITEM_ID_RULE)]


def _service(request: Request) -> Any:
    return request.app.state.ingress  # the Ingress replica (serve_app.ingress.Ingress)


@router.post(
    "/search",
    operation_id="search_v1",
    tags=["query"],
    response_model=s.SearchV1Response,
    response_model_exclude_none=True,
    responses=V1_QUERY_ERRORS,
)
async def search_v1(request: Request, body: s.SearchRequest) -> Any:
    """Search a gallery with a JSON query: `text`, base64 `image` / `audio` (any combination), a `vector` or a
    stored `item_id`; or with `queries` (a batch, answered in order as `{"answers": [...]}`)."""
    service = _service(request)
    settings: V1Settings = request.app.state.v1
    prepared = []
    for query, where in batch_of(body, body.queries, settings):
        target = query.target or body.target
        if target is None:
            name = f"{where}.target" if where else "target"
            raise RequestError(422, f"{name} is missing: send target (text, audio or image) per query or for all")
        k = query.k or body.k or 10
        prepared.append({**prepare(query, where, settings.limits), "target": s.Target(target).value, "k": k})
    answers = await service.call_deployment(request, lambda: service.retriever.search_batch.remote(prepared), "search")
    return {"answers": answers} if body.queries is not None else answers[0]


@router.post(
    "/embed", operation_id="embed_v1", tags=["query"], response_model=s.EmbedV1Response, responses=V1_QUERY_ERRORS
)
async def embed_v1(request: Request, body: s.EmbedRequest) -> Any:
    """The embedding of a JSON query (as for /v1/search), or of each of `queries` (`{"answers": [...]}`, in order)."""
    service = _service(request)
    settings: V1Settings = request.app.state.v1
    prepared = [prepare(q, where, settings.limits) for q, where in batch_of(body, body.queries, settings)]
    answers = await service.call_deployment(
        request, lambda: service.retriever.embed_batch.remote(prepared), "embedding"
    )
    return {"answers": answers} if body.queries is not None else answers[0]


@router.get(
    "/items",
    operation_id="list_items_v1",
    tags=["items"],
    response_model=s.ItemPage,
    response_model_exclude_none=True,
    responses=s.errors(422),
)
async def list_items_v1(
    request: Request,
    offset: Annotated[int, Query(ge=0, le=2**31, description="items to skip")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"items per page, 1-{MAX_PAGE}")] = 100,
) -> Any:
    """The gallery's items, a page at a time, in the order they were added (a new item goes last)."""
    service = _service(request)
    make = lambda: service.retriever.list_items.remote(offset, limit)  # noqa: E731
    return await service.call_deployment(request, make, "item listing")


@router.get(
    "/items/{item_id}",
    operation_id="get_item_v1",
    tags=["items"],
    response_model=s.ItemInfo,
    response_model_exclude_none=True,
    responses=s.errors(404, 422),
)
async def get_item_v1(request: Request, item_id: ItemId) -> Any:
    """An item's metadata: the galleries it is in, its caption and group, and the URLs of its media."""
    service = _service(request)
    return await service.call_deployment(request, lambda: service.retriever.item_info.remote(item_id), "item lookup")


@router.delete(
    "/items/{item_id}",
    operation_id="delete_item_v1",
    tags=["items"],
    response_model=s.DeleteResponse,
    responses=s.errors(403, 404, 422, 507),
)
async def delete_item_v1(request: Request, item_id: ItemId) -> Any:
    """Remove an item from the gallery, durably (answered after the store commits); 404 if there is none."""
    service = _service(request)
    make = lambda: service.retriever.delete_item.remote(item_id)  # noqa: E731
    return await service.call_deployment(request, make, "item deletion", idempotent=False)
