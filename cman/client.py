"""A Python client of the CMAN HTTP API (`cman serve`): search, embed, add, get, delete and list gallery items.

    from cman.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as client:
        hits = client.search(text="a dog runs on the beach", target="image", k=5)["results"]
        client.add("my-photo", image="photo.jpg", text="my dog")
        client.search(item_id="my-photo", target="image")        # its nearest neighbours
        answers = client.search_batch([{"text": "a cat"}, {"image": "cat.png"}], target="image")

Media (`image=`, `audio=`) may be a path, bytes, a PIL image, a numpy image array (height, width[, 3]) or, for audio,
a `(waveform, sampling_rate)` pair. Errors raise `CMANError` with the HTTP status and the service's
`{"error": ...}` message; a 503 is retried after its Retry-After (at most `retries` times, `max_wait_s` each).
`AsyncClient` has the same methods as coroutines. Needs httpx (`pip install httpx`, part of `cman[ray]`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

try:
    import httpx
except ImportError as err:  # pragma: no cover - httpx comes with cman[ray]
    raise ImportError("cman.client needs httpx: pip install httpx (or cman[ray])") from err

DEFAULT_URL = "http://127.0.0.1:8000"
MEDIA_TYPES = {"image": "image/png", "audio": "audio/wav"}


class CMANError(Exception):
    """An answer other than 2xx (or no answer: `status` 0): `status` and the service's error `message`."""

    def __init__(self, status: int, message: str, url: str = "") -> None:
        self.status, self.message, self.url = status, message, url
        super().__init__(f"{status}: {message}" if status else message)


def media_bytes(value: Any, kind: str) -> bytes:
    """The bytes of an image or audio given as a path, bytes, a PIL image, a numpy image or (waveform, rate)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str | os.PathLike):
        with open(value, "rb") as f:
            return f.read()
    buf = io.BytesIO()
    if kind == "audio" and isinstance(value, tuple) and len(value) == 2:
        import soundfile as sf

        sf.write(buf, value[0], int(value[1]), format="WAV")
        return buf.getvalue()
    if kind == "image" and (hasattr(value, "save") or hasattr(value, "__array_interface__")):
        from PIL import Image

        image = value if hasattr(value, "save") else Image.fromarray(value)
        image.save(buf, format="PNG")
        return buf.getvalue()
    allowed = "a path, bytes, a PIL image or a numpy array" if kind == "image" else "a path, bytes or (waveform, rate)"
    raise TypeError(f"{kind} must be {allowed}, not {type(value).__name__}")


def query_json(
    text: str | None = None,
    image: Any = None,
    audio: Any = None,
    vector: Any = None,
    item_id: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One query as the /v1 JSON API takes it: media base64-encoded, a vector as a list of floats."""
    body: dict[str, Any] = {k: v for k, v in extra.items() if v is not None}
    if text is not None:
        body["text"] = text
    for kind, value in (("image", image), ("audio", audio)):
        if value is not None:
            body[kind] = base64.b64encode(media_bytes(value, kind)).decode("ascii")
    if vector is not None:
        body["vector"] = [float(x) for x in (vector.tolist() if hasattr(vector, "tolist") else vector)]
    if item_id is not None:
        body["item_id"] = item_id
    return body


def retry_after(response: httpx.Response, max_wait_s: float) -> float:
    """The response's Retry-After in seconds (1 if absent or a date), at most `max_wait_s`."""
    value = response.headers.get("retry-after", "1")
    try:
        return min(max(float(value), 0.0), max_wait_s)
    except ValueError:
        return min(1.0, max_wait_s)


def _answer(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    try:
        message = str(response.json().get("error", response.text))
    except (ValueError, AttributeError):
        message = response.text[:500] or response.reason_phrase
    if response.status_code == 401:
        message += " (pass api_key= to the client)"
    raise CMANError(response.status_code, message, str(response.request.url))


def _finish(response: httpx.Response, read: Callable[[Any], Any], missing_ok: bool) -> Any:
    return None if missing_ok and response.status_code == 404 else read(_answer(response))


def _unreachable(url: str, err: Exception) -> CMANError:
    return CMANError(0, f"could not reach {url}: {err or type(err).__name__} (is `cman serve` running there?)", url)


class _Api:
    """The routes, shared by Client and AsyncClient: each builds a request and says how to read its answer."""

    def __init__(self, url: str, api_key: str | None, timeout: float, retries: int, max_wait_s: float) -> None:
        self.url = url.rstrip("/")
        self.retries, self.max_wait_s = max(0, int(retries)), float(max_wait_s)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout

    def _send(self, method: str, path: str, read: Callable[[Any], Any] = lambda a: a, **kwargs: Any) -> Any:
        raise NotImplementedError

    def health(self) -> Any:
        """`{"status": "ok"}` when the service is up."""
        return self._send("GET", "/healthz")

    def search(
        self,
        text: str | None = None,
        image: Any = None,
        audio: Any = None,
        *,
        vector: Any = None,
        item_id: str | None = None,
        item_modality: str | None = None,
        target: str = "image",
        k: int = 10,
    ) -> Any:
        """Search the `target` gallery: any of text/image/audio (a composed query), or a vector, or a stored item.
        Returns `{"query_modalities", "target", "results": [{"id", "score", "caption"?, ...}]}`."""
        body = query_json(text, image, audio, vector, item_id, item_modality=item_modality, target=target, k=k)
        return self._send("POST", "/v1/search", json=body)

    def search_batch(self, queries: list[dict[str, Any]], *, target: str = "image", k: int = 10) -> Any:
        """Many queries in one request (each a dict of `search`'s keywords; `target` and `k` are defaults);
        the answers in order."""
        body = {"queries": [query_json(**q) for q in queries], "target": target, "k": k}
        return self._send("POST", "/v1/search", lambda a: a["answers"], json=body)

    def embed(
        self,
        text: str | None = None,
        image: Any = None,
        audio: Any = None,
        *,
        vector: Any = None,
        item_id: str | None = None,
        item_modality: str | None = None,
    ) -> Any:
        """The embedding of a query: `{"modalities": [...], "embedding": [floats]}`."""
        body = query_json(text, image, audio, vector, item_id, item_modality=item_modality)
        return self._send("POST", "/v1/embed", json=body)

    def embed_batch(self, queries: list[dict[str, Any]]) -> Any:
        """The embeddings of many queries (dicts of `embed`'s keywords), in order."""
        return self._send(
            "POST", "/v1/embed", lambda a: a["answers"], json={"queries": [query_json(**q) for q in queries]}
        )

    def add(self, id: str, text: str | None = None, image: Any = None, audio: Any = None) -> Any:  # noqa: A002
        """Add an item (durable when answered; the same item again is fine, another one under `id` a 409)."""
        files = {
            kind: (f"{kind}.bin", media_bytes(value, kind), "application/octet-stream")
            for kind, value in (("image", image), ("audio", audio))
            if value is not None
        }
        data = {"id": id, **({"text": text} if text is not None else {})}
        return self._send("POST", "/items", data=data, files=files or None)

    def get(self, id: str) -> Any:  # noqa: A002
        """An item's metadata: `{"id", "modalities", "caption"?, "group"?, "image_url"?, "audio_url"?}`."""
        return self._send("GET", f"/v1/items/{quote(id, safe='')}")

    def delete(self, id: str, missing_ok: bool = False) -> Any:  # noqa: A002
        """Remove an item (durable when answered). A missing item raises CMANError 404, or returns None with
        `missing_ok` (also what a delete retried after a 503 may meet: the first attempt may have removed it)."""
        return self._send("DELETE", f"/v1/items/{quote(id, safe='')}", missing_ok=missing_ok)

    def items(self, offset: int = 0, limit: int = 100) -> Any:
        """A page of the gallery's items (in the order they were added): `{"items", "offset", "limit", "total"}`."""
        return self._send("GET", "/v1/items", params={"offset": offset, "limit": limit})


class Client(_Api):
    """A synchronous client of one CMAN service (an httpx.Client; use it as a context manager or call close())."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        max_wait_s: float = 30.0,
    ) -> None:
        super().__init__(url, api_key, timeout, retries, max_wait_s)
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def _send(self, method: str, path: str, read: Callable[[Any], Any] = lambda a: a, **kwargs: Any) -> Any:
        missing_ok = kwargs.pop("missing_ok", False)
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as err:
                raise _unreachable(self.url + path, err) from err
            if response.status_code != 503 or attempt == self.retries:
                return _finish(response, read, missing_ok)
            time.sleep(retry_after(response, self.max_wait_s))

    def iter_items(self, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every item of the gallery, a page at a time."""
        offset = 0
        while True:
            page = self.items(offset, page_size)
            yield from page["items"]
            offset += len(page["items"])
            if not page["items"] or offset >= page["total"]:
                return

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Api):
    """The asynchronous twin of `Client` (an httpx.AsyncClient): the same methods, awaited."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        max_wait_s: float = 30.0,
    ) -> None:
        super().__init__(url, api_key, timeout, retries, max_wait_s)
        self.http = httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=timeout)

    async def _send(self, method: str, path: str, read: Callable[[Any], Any] = lambda a: a, **kwargs: Any) -> Any:
        missing_ok = kwargs.pop("missing_ok", False)
        for attempt in range(self.retries + 1):
            try:
                response = await self.http.request(method, path, **kwargs)
            except httpx.TransportError as err:
                raise _unreachable(self.url + path, err) from err
            if response.status_code != 503 or attempt == self.retries:
                return _finish(response, read, missing_ok)
            await asyncio.sleep(retry_after(response, self.max_wait_s))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
