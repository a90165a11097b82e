"""FastAPI ingress: the HTTP contract (see ARCHITECTURE.md) on top of the Retriever and encoder deployments: the
multipart routes here, the JSON `/v1` routes in `serve_app.v1` (the same guard, limits and error handlers).

Every error is JSON `{"error": "..."}` (`ErrorResponse`): 400 bad field, 401 no/wrong API key, 403 refused state
change, 404 unknown item, 409 another item under this id, 413 over a limit, 415 undecodable media or wrong content
type, 422 validation, 503 busy, a replica restarting or a store error, 504 timeout, 507 the gallery store is out of
space. Bad input never reaches a replica as an exception it could die of.
"""

import asyncio
import logging
from importlib import metadata, resources
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Path, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import schemas as s
from serve_app.calls import ServiceUnavailable, call
from serve_app.errors import RequestError
from serve_app.security import Guard, GuardSettings, is_loopback, page_policy
from serve_app.uploads import Limits, payloads
from serve_app.v1 import V1Settings, bearer, router

logger = logging.getLogger(__name__)


def package_version() -> str:
    """The installed cman's version (the source tree's `cman.__version__` when it is not installed)."""
    try:
        return metadata.version("cman")
    except metadata.PackageNotFoundError:
        from cman import __version__

        return __version__


TAGS = [
    {"name": "query", "description": "search a gallery, or embed a query (multipart forms, or JSON under /v1)"},
    {"name": "items", "description": "the gallery's items: add, read, list, delete, their media"},
    {"name": "service", "description": "health and batching statistics"},
]
app = FastAPI(
    title="CMAN cross-modal retrieval",
    description="Search a gallery of images, spoken audio and captions with any combination of text, audio and "
    "image (composed queries), as multipart forms or JSON under /v1 (base64 media, vectors, stored items, batches). "
    'Errors are JSON {"error": ...}. When an API key is configured, send `Authorization: Bearer <key>` on every '
    "route but /healthz (the Authorize button).",
    version=package_version(),
    openapi_tags=TAGS,
)
app.add_middleware(Guard)
app.include_router(router)
FIELD_HINTS = {
    "k": f"k must be between 1 and {s.MAX_K}",
    "target": "target must be one of text, audio, image",
    "id": f"bad id: use {s.ITEM_ID_RULE}",
    "item_id": f"bad item id: use {s.ITEM_ID_RULE}",
    "item_modality": "item_modality must be one of text, audio, image",
    "offset": "offset must be a whole number >= 0",
    "limit": "limit must be between 1 and 1000",
}
AUTH = [Security(bearer)]  # declares the bearer scheme on a route (the Guard checks the key)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@app.exception_handler(RequestError)
async def _request_error(_: Request, err: RequestError) -> JSONResponse:
    if isinstance(err, ServiceUnavailable):
        return _error(err.status, err.message, {"Retry-After": str(max(1, round(err.retry_after_s)))})
    return _error(err.status, err.message)


def _where(loc: tuple) -> str:
    """`queries[3].k` for the location ("body", "queries", 3, "k") of a validation error."""
    out = ""
    for part in loc[1:]:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "body"


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    errors = err.errors()
    if errors and errors[0].get("type") == "json_invalid":
        reason = (errors[0].get("ctx") or {}).get("error", "JSON decode error")
        position = next((p for p in errors[0].get("loc", ())[1:] if isinstance(p, int)), 0)
        return _error(400, f"the body is not valid JSON ({reason} at character {position}); send a JSON object")
    parts = []
    for e in errors[:10]:
        loc = tuple(e.get("loc", ()))
        field = str(next((p for p in reversed(loc) if isinstance(p, str)), ""))
        given = e.get("input")
        hint = FIELD_HINTS.get(field)
        shown = repr(given)[:80] if isinstance(given, str | int | float) else "missing"
        where = _where(loc)
        if hint:
            parts.append(f"{hint}; got {shown}" if where == field else f"{where}: {hint}; got {shown}")
        else:
            parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return _error(422, "invalid request: " + "; ".join(parts))


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    return _error(err.status_code, str(err.detail))


@app.exception_handler(Exception)
async def _unexpected(_: Request, err: Exception) -> JSONResponse:
    logger.exception("unexpected error")
    return _error(500, f"internal error ({type(err).__name__}); the request was not processed, please retry")


async def _count_fields(request: Request, max_fields: int) -> None:
    form = await request.form()  # already parsed (and cached) by FastAPI for the route's parameters
    if len(form.multi_items()) > max_fields:
        raise RequestError(
            413, f"{len(form.multi_items())} form fields, over the {max_fields} limit (max_form_fields); send fewer"
        )


SERVE_CONTROLLER = ("SERVE_CONTROLLER_ACTOR", "serve")  # Serve's controller actor: name, namespace


def bound_host(declared: str) -> str:
    """The host to guard for: the one Serve's HTTP proxies really bind (asked of Serve's controller), or `declared`
    if that one is exposed (not loopback) and the bound one is not. The declared host alone can be stale: when Serve
    already ran, `serve.start` ignored its `http_options`; a `serve deploy` config's `args.host` may differ from its
    `http_options.host`. If the controller cannot say, a non-loopback bind is assumed (fail closed)."""
    import ray

    try:
        controller = ray.get_actor(SERVE_CONTROLLER[0], namespace=SERVE_CONTROLLER[1])
        host = str(ray.get(controller.get_http_config.remote(), timeout=30).host)
    except Exception as err:  # noqa: BLE001 - no controller to ask: guard as if exposed
        logger.warning("could not read Serve's HTTP bind address (%s): guarding as for 0.0.0.0", err)
        return "0.0.0.0"
    guarded = declared if is_loopback(host) and not is_loopback(declared) else host
    if host != declared:
        logger.warning("told Serve binds %s, Serve's proxies bind %s: guarding for %s", declared, host, guarded)
    return guarded


ItemId = Annotated[str, Path(pattern=s.ITEM_ID_PATTERN, max_length=128, description=s.ITEM_ID_RULE)]
TextField = Annotated[str | None, Form(description="query text (Unicode-normalised; control characters removed)")]
AudioField = Annotated[UploadFile | None, File(description="audio (WAV/FLAC/OGG)")]
ImageField = Annotated[UploadFile | None, File(description="image (PNG/JPEG/...)")]
QUERY_ERRORS = s.errors(400, 413, 415, 422)


# Everything the class uses must be defined above it: Serve pickles the class when the decorator runs.
@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """HTTP front end; holds handles to the Retriever and the encoder deployments."""

    def __init__(
        self, retriever: DeploymentHandle, encoders: dict[str, DeploymentHandle], settings: dict[str, Any]
    ) -> None:
        self.retriever = retriever
        self.encoders = encoders
        self.limits = Limits.from_settings(settings)
        self.timeout_s = float(settings.get("request_timeout_s", 60.0))
        self.page = resources.files("serve_app").joinpath("static/index.html").read_text(encoding="utf-8")
        app.state.ingress = self  # for the /v1 routes (serve_app.v1)
        app.state.v1 = V1Settings(self.limits, int(settings.get("max_batch_queries", s.DEFAULT_MAX_BATCH_QUERIES)))
        max_body = 3 * self.limits.max_upload_bytes + 1024 * 1024
        app.state.guard = GuardSettings(
            key_sha256=settings.get("api_key_sha256"),
            bind_host=bound_host(str(settings.get("bind_host", "127.0.0.1"))),
            max_body_bytes=max_body,
            body_timeout_s=float(settings.get("body_timeout_s", 30.0)),
            max_inflight_bytes=8 * max_body,  # 8 full-size uploads at once, then 503 + Retry-After
            page_policy=page_policy(self.page),
            max_form_fields=self.limits.max_form_fields,
        )

    async def _query(self, request: Request, text: Any, audio: Any, image: Any, *, empty_ok: bool = False) -> dict:
        await _count_fields(request, self.limits.max_form_fields)
        found = await payloads(self.limits, text, audio, image)
        if not found and not empty_ok:
            raise RequestError(400, "empty query: send at least one of text, audio (file), image (file)")
        return found

    async def call_deployment(self, request: Request, make: Any, what: str, idempotent: bool = True) -> Any:
        """`make()` (a deployment call) within the request's timeout, retried if idempotent and a replica died."""
        state = request.scope.setdefault("state", {})
        return await call(make, timeout_s=self.timeout_s, idempotent=idempotent, what=what, state=state)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @app.get(
        "/healthz", operation_id="healthz", tags=["service"], response_model=s.StatusResponse, responses=s.errors()
    )
    async def healthz(self) -> dict[str, str]:
        """Liveness of the HTTP front end (Serve checks each deployment's own health)."""
        return {"status": "ok"}

    @app.post(
        "/search",
        operation_id="search",
        tags=["query"],
        dependencies=AUTH,
        response_model=s.SearchResponse,
        response_model_exclude_none=True,
        responses=QUERY_ERRORS,
    )
    async def search(
        self,
        request: Request,
        target: Annotated[s.Target, Form(description="the gallery to search")],
        text: TextField = None,
        audio: AudioField = None,
        image: ImageField = None,
        k: Annotated[int, Form(ge=1, le=s.MAX_K, description=f"number of results, 1-{s.MAX_K}")] = 10,
    ) -> dict[str, Any]:
        """Search the `target` gallery with any combination of text, audio and image (a composed query)."""
        found = await self._query(request, text, audio, image)
        target_name = s.Target(target).value
        return await self.call_deployment(
            request, lambda: self.retriever.search.remote(found, target_name, k), "search"
        )

    @app.post(
        "/embed",
        operation_id="embed",
        tags=["query"],
        dependencies=AUTH,
        response_model=s.EmbedResponse,
        responses=QUERY_ERRORS,
    )
    async def embed(
        self, request: Request, text: TextField = None, audio: AudioField = None, image: ImageField = None
    ) -> dict[str, Any]:
        """The 512-d embedding of any combination of text, audio and image."""
        found = await self._query(request, text, audio, image)
        return await self.call_deployment(request, lambda: self.retriever.embed.remote(found), "embedding")

    @app.post(
        "/items",
        operation_id="add_item",
        tags=["items"],
        dependencies=AUTH,
        response_model=s.ItemResponse,
        responses=s.errors(400, 403, 409, 413, 415, 422, 507),
    )
    async def add_item(
        self,
        request: Request,
        id: Annotated[str, Form(pattern=s.ITEM_ID_PATTERN, max_length=128, description=s.ITEM_ID_RULE)],  # noqa: A002
        text: TextField = None,
        audio: AudioField = None,
        image: ImageField = None,
    ) -> dict[str, Any]:
        """Add an item (any of caption, audio, image) to the gallery, durably (answered after the store commits).

        Idempotent: the same item again answers 200 with the stored item; another item under this id 409."""
        found = await self._query(request, text, audio, image, empty_ok=True)
        if not found:
            raise RequestError(400, "an item needs at least one of text, audio (file), image (file)")
        make = lambda: self.retriever.add_item.remote(id, found)  # noqa: E731
        return await self.call_deployment(request, make, "item addition")

    async def _media(self, request: Request, item_id: str, kind: str) -> Response:
        data, media_type = await self.call_deployment(request, lambda: self.retriever.media.remote(item_id, kind), kind)
        return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    @app.get(
        "/items/{item_id}/image",
        operation_id="item_image",
        tags=["items"],
        dependencies=AUTH,
        response_class=Response,
        responses={200: {"content": s.MEDIA_CONTENT["image"], "description": "the item's image"}, **s.errors(404, 422)},
    )
    async def item_image(self, request: Request, item_id: ItemId) -> Response:
        return await self._media(request, item_id, "image")

    @app.get(
        "/items/{item_id}/audio",
        operation_id="item_audio",
        tags=["items"],
        dependencies=AUTH,
        response_class=Response,
        responses={200: {"content": s.MEDIA_CONTENT["audio"], "description": "the item's audio"}, **s.errors(404, 422)},
    )
    async def item_audio(self, request: Request, item_id: ItemId) -> Response:
        return await self._media(request, item_id, "audio")

    @app.get(
        "/stats",
        operation_id="stats",
        tags=["service"],
        dependencies=AUTH,
        response_model=s.StatsResponse,
        responses=s.errors(),
    )
    async def stats(self, request: Request) -> dict[str, Any]:
        """Batch sizes each encoder replica has run, and the gallery sizes (for benchmarks and tests)."""
        names = list(self.encoders)

        async def gather() -> list[Any]:
            return await asyncio.gather(*(self.encoders[m].stats.remote() for m in names))

        stats = await self.call_deployment(request, gather, "stats request")
        counts = await self.call_deployment(request, lambda: self.retriever.counts.remote(), "stats request")
        return {"encoders": dict(zip(names, stats, strict=True)), "index": counts}

    @app.post(
        "/stats/reset",
        operation_id="reset_stats",
        tags=["service"],
        dependencies=AUTH,
        response_model=s.StatusResponse,
        responses=s.errors(403),
    )
    async def reset_stats(self, request: Request) -> dict[str, str]:
        """Zero the encoders' batch counters."""

        async def reset() -> list[Any]:
            return await asyncio.gather(*(handle.reset_stats.remote() for handle in self.encoders.values()))

        await self.call_deployment(request, reset, "stats reset")
        return {"status": "ok"}
