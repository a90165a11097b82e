"""FastAPI ingress: the HTTP contract (see ARCHITECTURE.md) on top of the Retriever and encoder deployments.

Every error is JSON `{"error": "..."}`: 400 bad field, 404 unknown item, 413 too large, 415 undecodable media or wrong
content type, 422 validation. Bad input never reaches a replica as an exception it could die of.
"""

import asyncio
import logging
from importlib import resources
from typing import Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.errors import RequestError, raise_if_error

logger = logging.getLogger(__name__)

MAX_TEXT_CHARS = 2000
TARGETS = ("text", "audio", "image")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
ACCEPTED_TYPES = {
    "image": ("image/",),
    "audio": ("audio/", "video/webm", "video/ogg", "application/ogg"),
}
ANY_BINARY = ("application/octet-stream", "")

app = FastAPI(
    title="CMAN cross-modal retrieval",
    description="Search a gallery of images, spoken audio and captions with any combination of text, audio and "
    'image (composed queries). Errors are JSON {"error": ...}.',
    version="0.1.0",
)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@app.exception_handler(RequestError)
async def _request_error(_: Request, err: RequestError) -> JSONResponse:
    return _error(err.status, err.message)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {e.get('msg', 'invalid')}")
    return _error(422, "invalid request: " + "; ".join(parts))


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    return _error(err.status_code, str(err.detail))


@app.exception_handler(Exception)
async def _unexpected(_: Request, err: Exception) -> JSONResponse:
    cause = _request_error_cause(err)
    if cause is not None:
        return _error(cause.status, cause.message)
    logger.exception("unexpected error")
    return _error(500, f"internal error ({type(err).__name__}); the request was not processed, please retry")


def _request_error_cause(err: BaseException) -> RequestError | None:
    """A RequestError raised in another replica may arrive wrapped (RayTaskError); find it."""
    seen = 0
    while err is not None and seen < 5:
        if isinstance(err, RequestError):
            return err
        err = getattr(err, "cause", None) or err.__cause__
        seen += 1
    return None


@app.middleware("http")
async def _limit_body(request: Request, call_next: Any) -> Response:
    """Refuse bodies that cannot fit three uploads before they are parsed (413 instead of reading them)."""
    limit = getattr(request.app.state, "max_body_bytes", None)
    length = request.headers.get("content-length")
    if limit and length and length.isdigit() and int(length) > limit:
        return _error(413, f"request body of {int(length):,} bytes is over the {limit:,}-byte limit")
    return await call_next(request)


def _check_form(request: Request) -> None:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in FORM_TYPES:
        raise RequestError(
            415, f"content type {ctype or 'none'!r} is not supported: send multipart/form-data (curl -F field=value)"
        )


def _checked(result: Any) -> Any:
    raise_if_error(result)
    return result


def _example(name: str) -> str:
    return "image/png, image/jpeg" if name == "image" else "audio/wav"


# Everything the class uses must be defined above it: Serve pickles the class when the decorator runs.
@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    """HTTP front end; holds handles to the Retriever and the encoder deployments."""

    def __init__(self, retriever: DeploymentHandle, encoders: dict[str, DeploymentHandle], serve_cfg: dict) -> None:
        self.retriever = retriever
        self.encoders = encoders
        self.max_upload_bytes = int(float(serve_cfg.get("max_upload_mb", 10.0)) * 1024 * 1024)
        app.state.max_body_bytes = 3 * self.max_upload_bytes + 1024 * 1024
        self.page = resources.files("serve_app").joinpath("static/index.html").read_text(encoding="utf-8")

    async def _payloads(self, text: str | None, audio: UploadFile | None, image: UploadFile | None) -> dict[str, Any]:
        payloads: dict[str, Any] = {}
        if text is not None and text.strip():
            if len(text) > MAX_TEXT_CHARS:
                raise RequestError(413, f"text is {len(text):,} characters; send at most {MAX_TEXT_CHARS:,}")
            payloads["text"] = text
        for name, upload in (("audio", audio), ("image", image)):
            data = await self._read_upload(name, upload)
            if data is not None:
                payloads[name] = data
        return payloads

    async def _read_upload(self, name: str, upload: UploadFile | None) -> bytes | None:
        if upload is None:
            return None
        if not upload.filename and not upload.size:
            return None  # an empty file input of an HTML form
        size = upload.size if upload.size is not None else None
        if size is not None and size > self.max_upload_bytes:
            raise RequestError(
                413,
                f"{name} upload is {size:,} bytes, over the {self.max_upload_bytes:,}-byte limit; send a smaller one",
            )
        ctype = (upload.content_type or "").split(";")[0].strip().lower()
        if ctype not in ANY_BINARY and not ctype.startswith(ACCEPTED_TYPES[name]):
            raise RequestError(415, f"{name} upload has content type {ctype!r}; send {name}/* (e.g. {_example(name)})")
        data = await upload.read(self.max_upload_bytes + 1)
        if len(data) > self.max_upload_bytes:
            raise RequestError(413, f"{name} upload is over the {self.max_upload_bytes:,}-byte limit")
        if not data:
            raise RequestError(400, f"{name} upload {upload.filename!r} is empty; send a non-empty file")
        return data

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/search")
    async def search(
        self,
        request: Request,
        text: str | None = Form(None, description="query text"),
        audio: UploadFile | None = File(None, description="query audio (WAV/FLAC/OGG)"),
        image: UploadFile | None = File(None, description="query image (PNG/JPEG/...)"),
        target: str | None = Form(None, description="text | audio | image"),
        k: int = Form(10, description="number of results, 1-100"),
    ) -> dict[str, Any]:
        """Search the `target` gallery with any combination of text, audio and image (a composed query)."""
        _check_form(request)
        if target is None or target not in TARGETS:
            raise RequestError(400, f"target must be one of {', '.join(TARGETS)}; got {target!r}")
        if not 1 <= k <= 100:
            raise RequestError(400, f"k must be between 1 and 100; got {k}")
        payloads = await self._payloads(text, audio, image)
        if not payloads:
            raise RequestError(400, "empty query: send at least one of text, audio (file), image (file)")
        return _checked(await self.retriever.search.remote(payloads, target, k))

    @app.post("/embed")
    async def embed(
        self,
        request: Request,
        text: str | None = Form(None),
        audio: UploadFile | None = File(None),
        image: UploadFile | None = File(None),
    ) -> dict[str, Any]:
        """The 512-d embedding of any combination of text, audio and image."""
        _check_form(request)
        payloads = await self._payloads(text, audio, image)
        if not payloads:
            raise RequestError(400, "empty query: send at least one of text, audio (file), image (file)")
        return _checked(await self.retriever.embed.remote(payloads))

    @app.post("/items")
    async def add_item(
        self,
        request: Request,
        id: str | None = Form(None, description="unique item id"),  # noqa: A002 - the contract's field name
        text: str | None = Form(None),
        audio: UploadFile | None = File(None),
        image: UploadFile | None = File(None),
    ) -> dict[str, Any]:
        """Add an item (any of caption, audio, image) to the gallery; it is saved to disk at once."""
        _check_form(request)
        if id is None or not id.strip():
            raise RequestError(400, "id is required: send a unique item id (form field `id`)")
        payloads = await self._payloads(text, audio, image)
        return _checked(await self.retriever.add_item.remote(id.strip(), payloads))

    @app.get("/items/{item_id}/image")
    async def item_image(self, item_id: str) -> Response:
        data, media_type = _checked(await self.retriever.media.remote(item_id, "image"))
        return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    @app.get("/items/{item_id}/audio")
    async def item_audio(self, item_id: str) -> Response:
        data, media_type = _checked(await self.retriever.media.remote(item_id, "audio"))
        return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    @app.get("/stats")
    async def stats(self) -> dict[str, Any]:
        """Batch sizes each encoder replica has run, and the gallery sizes (for benchmarks and tests)."""
        names = list(self.encoders)
        stats = await asyncio.gather(*(self.encoders[m].stats.remote() for m in names))
        return {"encoders": dict(zip(names, stats, strict=True)), "index": await self.retriever.counts.remote()}

    @app.post("/stats/reset", include_in_schema=False)
    async def reset_stats(self) -> dict[str, str]:
        await asyncio.gather(*(handle.reset_stats.remote() for handle in self.encoders.values()))
        return {"status": "ok"}
