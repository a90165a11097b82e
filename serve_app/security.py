"""What the ingress checks before a route runs: the API key, the Host of every request, the origin of state-changing
requests, the body's size, how long it takes to arrive, and how much upload data all requests hold at once.

A pure ASGI middleware (`Guard`), so the body limit counts the bytes as they stream in (chunked uploads included)
and stops reading at the limit, before a multipart parser spools the rest to disk. A body that has not fully arrived
`body_timeout_s` after the request started gets 408 (a trickling client cannot hold the front end), and while the
bodies being received add up to more than `max_inflight_bytes`, a new upload gets 503 with Retry-After.
Every answer carries `X-Content-Type-Options: nosniff`; the demo page also a Content-Security-Policy that forbids
framing. Without its settings (the Ingress not yet constructed) the guard refuses everything: it fails closed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

OPEN_PATHS = frozenset({"/healthz", "/"})  # the demo page itself asks for the key
STATE_CHANGING = frozenset({("POST", "/items"), ("POST", "/stats/reset")})
FORM_ROUTES = frozenset({"/search", "/embed", "/items"})
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
JSON_ROUTES = frozenset({"/v1/search", "/v1/embed"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def key_digest(key: str | None) -> bytes | None:
    """SHA-256 of the key: what the ingress holds and compares (the key itself is never stored or logged)."""
    return hashlib.sha256(key.encode()).digest() if key else None


def resolve_api_key(configured: str | None) -> str | None:
    """`CMAN_API_KEY` if set (non-empty), else `serve.api_key`."""
    return os.environ.get("CMAN_API_KEY") or configured or None


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff")]
# The demo page: its own script and style only (inline ones are allowed by hash in `page_policy`), media from this
# origin or from blobs the page makes of the user's files, no framing by any other site (clickjacking).
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self' {scripts}; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


def page_policy(html: str) -> str:
    """The demo page's Content-Security-Policy, allowing its inline <script> blocks by their sha256."""
    import base64
    import re

    hashes = [
        f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
        for body in re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    ]
    return PAGE_POLICY.format(scripts=" ".join(hashes) or "'none'")


@dataclass(frozen=True)
class GuardSettings:
    key_sha256: bytes | None = None
    bind_host: str = "127.0.0.1"
    max_body_bytes: int = 31 * 1024 * 1024
    body_timeout_s: float = 60.0
    max_inflight_bytes: int = 256 * 1024 * 1024
    page_policy: str = PAGE_POLICY.format(scripts="'none'")
    max_form_fields: int = 8

    def authorized(self, headers: dict[str, str]) -> bool:
        if self.key_sha256 is None:
            return True
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(presented.strip().encode()).digest()
        return hmac.compare_digest(digest, self.key_sha256) and scheme.lower() == "bearer"

    def host_refusal(self, headers: dict[str, str]) -> str | None:
        """Why any request is refused (403) for its Host header, or None: a service bound to loopback without a key
        answers only loopback names, so a DNS-rebinding page (evil.example resolving to 127.0.0.1) reads nothing."""
        if self.key_sha256 is not None or not is_loopback(self.bind_host):
            return None
        host = headers.get("host", "")
        if not is_loopback(urlsplit(f"//{host}").hostname or ""):
            return f"Host {host!r} is not a loopback name for a service bound to {self.bind_host}"
        return None

    def state_change_refusal(self, headers: dict[str, str]) -> str | None:
        """Why a state-changing request is refused (403), or None."""
        if self.key_sha256 is None and not is_loopback(self.bind_host):
            return (
                f"this service listens on {self.bind_host} without an API key: adding or deleting items and "
                "resetting stats are refused; set CMAN_API_KEY (or serve.api_key) and send Authorization: Bearer <key>"
            )
        host = headers.get("host", "")
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            return f"cross-origin request from {origin!r} refused: state-changing routes accept same-origin requests"
        return None


def is_json(content_type: str) -> bool:
    kind, _, subtype = content_type.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def route_path(scope: dict) -> str:
    """The path below the application's route prefix (Serve passes the prefix as `root_path`)."""
    path, root = scope.get("path", ""), scope.get("root_path", "").rstrip("/")
    return (path[len(root) :] or "/") if root and path.startswith(root) else path


class BodyRefused(Exception):
    """The body stopped being read: over the size limit (413), too slow (408) or no memory for it now (503)."""

    def __init__(self, status: int, message: str, extra: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


async def send_error(send: Any, status: int, message: str, extra: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += SECURITY_HEADERS
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class FieldCounter:
    """Counts the fields of a form body as it streams in (multipart boundaries, or `&` of a urlencoded form), so a
    form of thousands of fields is refused before any parser builds them (Starlette would parse up to 1000)."""

    def __init__(self, delimiter: bytes, max_fields: int, first_free: bool) -> None:
        self.delimiter, self.max_fields = delimiter, max_fields
        self.seen, self.tail = 0, b""
        # n fields: n delimiters CRLF--boundary (the first boundary has no CRLF, the closing one has) / n-1 `&`
        self.allowed = max_fields if first_free else max_fields - 1
        self.message = f"more than {max_fields} form fields (max_form_fields); send fewer"

    @classmethod
    def for_type(cls, content_type: str, max_fields: int) -> FieldCounter | None:
        kind, _, params = content_type.partition(";")
        kind = kind.strip().lower()
        if kind == "application/x-www-form-urlencoded":
            return cls(b"&", max_fields, first_free=False)
        if kind == "multipart/form-data":
            for param in params.split(";"):
                name, _, value = param.strip().partition("=")
                if name.lower() == "boundary" and value:
                    return cls(b"\r\n--" + value.strip('"').encode("latin-1"), max_fields, first_free=True)
        return None

    def over(self, chunk: bytes) -> bool:
        """Count the delimiters in `chunk` (one split across two chunks counts once); True once over the limit."""
        data = self.tail + chunk
        self.seen += data.count(self.delimiter) - self.tail.count(self.delimiter)
        self.tail = data[-(len(self.delimiter) - 1) :] if len(self.delimiter) > 1 else b""
        return self.seen > self.allowed


class Guard:
    """ASGI middleware: 401 without the key, 403 for a refused Host or state change, 413 once the body passes the
    limit, 408 for a body too slow to arrive, 503 while too much upload data is in flight."""

    inflight = 0  # bytes of request bodies being received now, over all requests of this replica

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings = getattr(scope["app"].state, "guard", None) if scope.get("app") is not None else None
        if not isinstance(settings, GuardSettings):  # fail closed: no settings, no service
            await send_error(send, 503, "the service is starting; retry in a moment", {"retry-after": "1"})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path, method = route_path(scope), scope.get("method", "GET")
        refusal = self._refusal(settings, headers, path, method)
        if refusal is not None:
            await send_error(send, *refusal)
            return
        extra = [*SECURITY_HEADERS, *([(b"content-security-policy", settings.page_policy.encode())] * (path == "/"))]
        parts = FieldCounter.for_type(headers.get("content-type", ""), settings.max_form_fields)
        await self._limited(scope, receive, send, settings, headers.get("content-length"), extra, parts)

    @staticmethod
    def _refusal(settings: GuardSettings, headers: dict[str, str], path: str, method: str) -> tuple | None:
        """(status, message[, headers]) of a request refused before the route runs, or None."""
        if path not in OPEN_PATHS and not settings.authorized(headers):
            return 401, "missing or wrong API key: send Authorization: Bearer <key>", {"www-authenticate": "Bearer"}
        refusal = settings.host_refusal(headers)
        if refusal is None and ((method, path) in STATE_CHANGING or method == "DELETE"):
            refusal = settings.state_change_refusal(headers)
        if refusal:
            return 403, refusal
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if method == "POST" and path in FORM_ROUTES and ctype not in FORM_TYPES:
            return 415, f"content type {ctype or 'none'!r} is not supported: send multipart/form-data (curl -F k=v)"
        if method == "POST" and path in JSON_ROUTES and not is_json(ctype):
            return 415, f"content type {ctype or 'none'!r} is not supported: send application/json (a JSON object)"
        return None

    async def _limited(
        self,
        scope: dict,
        receive: Any,
        send: Any,
        settings: GuardSettings,
        length: str | None,
        extra: list,
        parts: FieldCounter | None,
    ) -> None:
        limit = settings.max_body_bytes
        if length and length.isdigit() and int(length) > limit:
            await send_error(send, 413, f"request body of {int(length):,} bytes is over the {limit:,}-byte limit")
            return
        state = {"received": 0, "refused": None, "started": False, "body_done": False}
        deadline = time.monotonic() + settings.body_timeout_s

        async def counted_receive() -> dict:
            if state["body_done"]:
                return await receive()  # after the body: disconnect notices, no deadline
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                state["refused"] = BodyRefused(
                    408, f"request body not received within {settings.body_timeout_s:g} s (request_timeout_s)"
                )
                raise state["refused"] from None
            if message["type"] == "http.request":
                self._count(state, len(message.get("body", b"")), settings)
                if parts is not None and parts.over(message.get("body", b"")):
                    state["refused"] = BodyRefused(413, parts.message)
                    raise state["refused"]
                state["body_done"] = not message.get("more_body", False)
            return message

        async def guarded_send(message: dict) -> None:
            if state["refused"] is not None:
                return  # the app's answer to a body cut short is replaced by the refusal below
            state["started"] = True
            if message["type"] == "http.response.start":
                added = list(extra)
                if scope.get("state", {}).get("retried"):
                    added.append((b"x-cman-retried", b"1"))
                message = {**message, "headers": [*message.get("headers", []), *added]}
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyRefused:
            pass
        finally:
            Guard.inflight -= state["received"]
        refused = state["refused"]
        if refused is not None and not state["started"]:
            await send_error(send, refused.status, refused.message, refused.extra)

    @staticmethod
    def _count(state: dict, size: int, settings: GuardSettings) -> None:
        """Count `size` more body bytes of this request against its limit and the replica's in-flight budget."""
        limit = settings.max_body_bytes
        if state["received"] + size > limit:
            state["refused"] = BodyRefused(
                413, f"request body is over the {limit:,}-byte limit (counted while streaming); send less"
            )
        elif Guard.inflight + size > settings.max_inflight_bytes:
            message = f"over {settings.max_inflight_bytes:,} bytes of uploads are being received right now; retry"
            state["refused"] = BodyRefused(503, message, {"retry-after": "1"})
        if state["refused"] is not None:
            raise state["refused"]
        state["received"] += size
        Guard.inflight += size
